"""Video-LLaVA: two CLIP towers (`image_tower`, `video_tower`: no `vision_tower` attribute) sharing
one projector, Llama LM. The processor writes an image as `<image>` x patches (+ CLS with the "full"
strategy) and a video as `<video>` x frames x (patches + CLS), with no separators. Its image
processor names the images `pixel_values_images` (transformers 5.23 also takes `pixel_values`)."""
from __future__ import annotations

from graphprune.compat import video_llava_video_features
from graphprune.families.base import MODALITIES, Family, VisionLayout, check_video_unit


class VideoLlavaFamily(Family):
    name = "video_llava"
    model_types = ("video_llava",)
    vision_inputs = ("pixel_values", "pixel_values_images", "pixel_values_videos")
    image_pixels_alias = "pixel_values_images"
    eager_vision = "two vision towers (images, video frames) behind the model's own feature methods"
    compile_refused = ("it merges images and videos by two masked_scatters, and the compile backend reads one "
                       "image-token mask")

    def video_features(self, body, pixel_values_videos, **kw):
        return video_llava_video_features(body, pixel_values_videos, **kw)

    def vision_layout(self, input_ids, video_unit: str = "frame", modalities=MODALITIES,
                      **inputs) -> VisionLayout | None:
        """Images as the generic layout, then each video's `<video>` block split into its frames."""
        check_video_unit(video_unit)
        if inputs.get("pixel_values") is None:
            inputs["pixel_values"] = inputs.pop(self.image_pixels_alias, None)
        return self.with_videos(input_ids, super().vision_layout(input_ids, **inputs), video_unit,
                                inputs.get("pixel_values_videos"), modalities)
