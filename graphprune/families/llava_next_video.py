"""LLaVA-NeXT-Video: LLaVA-NeXT's anyres images, plus video: each frame's patch grid average-pooled
(spatial_pool_stride) by the model's vision_resampler; the processor writes a video as `<video>` x
frames x pooled patches, with no newline slot."""
from __future__ import annotations

from graphprune.families.llava_next import LlavaNextFamily


class LlavaNextVideoFamily(LlavaNextFamily):
    name = "llava_next_video"
    model_types = ("llava_next_video",)
    vision_inputs = ("pixel_values", "image_sizes", "pixel_values_videos")
    video_stage_refused = "its vision_resampler pools each frame's patches before the projector (not captured)"

    def frame_video_tokens(self) -> int:
        """Its vision_resampler pools each frame's patch grid with kernel = stride = spatial_pool_stride."""
        cfg = self.config()
        return (cfg.vision_config.image_size // cfg.vision_config.patch_size // cfg.spatial_pool_stride) ** 2
