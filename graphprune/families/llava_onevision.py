"""LLaVA-OneVision: LLaVA-NeXT's anyres images (crop grids capped at `vision_aspect_ratio`), plus
video: each frame's patch grid pooled 2x2, all frames of a video in one `<video>` block closed by
one image_newline slot (LlavaOnevisionProcessor: frames x pooled^2 + 1 placeholders)."""
from __future__ import annotations

import math

import torch

from graphprune.compat import onevision_video_features
from graphprune.families.anyres_vision import pooled_index
from graphprune.families.llava_next import LlavaNextFamily


class LlavaOnevisionFamily(LlavaNextFamily):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    vision_inputs = ("pixel_values", "image_sizes", "pixel_values_videos")
    video_newline = 1         # the image_newline closing each video
    vision_has_cls = False    # SigLIP

    def pack_markers(self, body, marker, image_size) -> torch.Tensor:
        packed, _ = body.pack_image_features([marker], image_size[None], image_newline=torch.zeros(1, device=marker.device),
                                             vision_aspect_ratio=self.config().vision_aspect_ratio)
        return packed[0]

    def separator_embeds(self, embeds, input_ids, separators):
        """image_newline at an image's newline slots and at the slot closing each video."""
        at = separators & ((input_ids == self.image_token_id()) | (input_ids == self.video_token_id()))
        return torch.where(at[..., None], self.body().image_newline.to(embeds.dtype), embeds)

    def video_features(self, body, pixel_values_videos, **kw):
        return onevision_video_features(body, pixel_values_videos, **kw)

    def video_token_patches(self) -> torch.Tensor:
        """Each pooled frame token's 2 x 2 patch block (apply_pooling after the projector)."""
        return pooled_index(self)

    def frame_video_tokens(self) -> int:
        """apply_pooling interpolates each frame's patch grid to ceil(side / 2) a side."""
        vc = self.config().vision_config
        return math.ceil(vc.image_size // vc.patch_size / 2) ** 2
