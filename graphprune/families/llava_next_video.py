"""LLaVA-NeXT-Video: LLaVA-NeXT's anyres images, plus video: each frame's patch grid average-pooled
(spatial_pool_stride) by the model's vision_resampler *before* the projector; the processor writes a video as
`<video>` x frames x pooled patches, with no newline slot. Its vision stage (anyres_vision.AnyresVisionStage)
captures a video unit as the tower per frame, each token the mean of its patch block, then the projector; a
token's encoder signals are the means over its block's patches (its CLS attention: the mean of its frame's CLS
attention to them; keys, attention received alike)."""
from __future__ import annotations

import torch

from graphprune.families.anyres_vision import resampled_index
from graphprune.families.llava_next import LlavaNextFamily


class LlavaNextVideoFamily(LlavaNextFamily):
    name = "llava_next_video"
    model_types = ("llava_next_video",)
    vision_inputs = ("pixel_values", "image_sizes", "pixel_values_videos")
    video_pooled_before_projector = True

    def video_token_patches(self) -> torch.Tensor:
        """Each pooled frame token's stride x stride patch block (the vision_resampler's average pooling)."""
        return resampled_index(self)

    def frame_video_tokens(self) -> int:
        """Its vision_resampler pools each frame's patch grid with kernel = stride = spatial_pool_stride."""
        cfg = self.config()
        return (cfg.vision_config.image_size // cfg.vision_config.patch_size // cfg.spatial_pool_stride) ** 2
