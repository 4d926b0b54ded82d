"""Aya Vision: SigLIP tower, pixel-shuffle projector (downsample_factor^2 patches -> one token),
Cohere / Cohere2 LM.

Images are tiled, and pixel_values holds every tile of every image: the processor does not pass how
many tiles each image has. It writes an image as `<|START_OF_IMG|>`, then per tile one tile marker
(`TILE_i`; the global view last, after `TILE_GLOBAL`) and that tile's `<|IMG_PATCH|>` placeholders,
then `<|END_OF_IMG|>`. So the tiles of one image are placeholder runs one marker apart, and the next
image starts at least three tokens later (end, start, tile marker). The markers are separators;
their ids are not in the config, so they are found by place. `keep` counts per image.
"""
from __future__ import annotations

from torch import nn

from graphprune.compat import aya_vision_logit_scale
from graphprune.families.base import MODALITIES, Family, VisionLayout


class ScaledHead(nn.Module):
    """The LM head (its own weight), its logits times a constant, as the model's forward scales them.
    One module, no nested head, so every node of it sits under the `head` path the rewrites look for."""

    def __init__(self, head: nn.Linear, scale: float):
        super().__init__()
        self.weight, self.bias, self.scale = head.weight, head.bias, scale

    def forward(self, hidden):
        return nn.functional.linear(hidden, self.weight, self.bias) * self.scale


class AyaVisionFamily(Family):
    name = "aya_vision"
    model_types = ("aya_vision",)
    vision_has_cls = False
    eager_vision = "tiled images whose tiles per image only the prompt's markers tell"
    compile_refused = ("the compile frame sees only the image-token mask, whose runs are tiles: which tiles make "
                       "one image only the tile markers tell")

    def lm_head(self) -> nn.Module:
        head = super().lm_head()
        scale = aya_vision_logit_scale(self.config().text_config)
        return head if self.is_body() or scale == 1.0 else ScaledHead(head, scale)

    def tokens_per_tile(self) -> int:
        vc = self.config().vision_config
        return (vc.image_size // (vc.patch_size * self.config().downsample_factor)) ** 2

    def vision_layout(self, input_ids, video_unit: str = "frame", modalities=MODALITIES,
                      **inputs) -> VisionLayout | None:
        if "image" not in modalities:
            return None
        return self.tiled_layout(input_ids, inputs.get("pixel_values"), self.tokens_per_tile(), joined=2, before=2)
