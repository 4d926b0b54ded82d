"""LLaVA-NeXT-Video: LLaVA-NeXT's anyres images, plus video: each frame's patch grid average-pooled
(spatial_pool_stride) by the model's vision_resampler; the processor writes a video as `<video>` x
frames x pooled patches, with no newline slot."""
from __future__ import annotations

from graphprune.families.llava_next import LlavaNextFamily


class LlavaNextVideoFamily(LlavaNextFamily):
    name = "llava_next_video"
    model_types = ("llava_next_video",)
    vision_inputs = ("pixel_values", "image_sizes", "pixel_values_videos")
