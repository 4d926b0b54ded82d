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

import torch

from graphprune.errors import InputError
from graphprune.families.base import Family, VisionLayout, blocks_layout, markers_around


class AyaVisionFamily(Family):
    name = "aya_vision"
    model_types = ("aya_vision",)
    vision_has_cls = False
    eager_vision = "tiled images whose tiles per image only the prompt's markers tell"
    compile_refused = ("the compile frame sees only the image-token mask, whose runs are tiles: which tiles make "
                       "one image only the tile markers tell")

    def __init__(self, model):
        super().__init__(model)
        self.refuse_sliding_window()

    def tokens_per_tile(self) -> int:
        vc = self.config().vision_config
        return (vc.image_size // (vc.patch_size * self.config().downsample_factor)) ** 2

    def vision_layout(self, input_ids, video_unit: str = "frame", **inputs) -> VisionLayout | None:
        pixel_values = inputs.get("pixel_values")
        is_image = self.image_mask(input_ids, pixel_values)
        if is_image is None:
            return None
        per_tile = self.tokens_per_tile()
        per_sample = []
        for i, row in enumerate(is_image):
            at = row.nonzero()[:, 0]
            tiles = at.reshape(-1, per_tile) if at.numel() % per_tile == 0 else None
            if tiles is None or not bool((tiles[:, -1] - tiles[:, 0] == per_tile - 1).all()):
                raise InputError(f"sample {i}: its {at.numel()} image tokens are not runs of {per_tile} (one tile "
                                 "each) as the processor writes them")
            starts = torch.cat([torch.ones(1, dtype=torch.bool), tiles[1:, 0] - tiles[:-1, -1] > 2])
            image_of = starts.long().cumsum(0) - 1
            per_sample.append([(f"image {j}", tiles[image_of == j].reshape(-1)) for j in range(int(image_of[-1]) + 1)])
        tiles = is_image.sum() // per_tile
        if pixel_values.shape[0] != tiles:
            raise InputError(f"{pixel_values.shape[0]} tiles in pixel_values but the prompts' image tokens make "
                             f"{int(tiles)} tiles of {per_tile}")
        layout = blocks_layout(per_sample, torch.zeros_like(is_image))
        layout.separators = markers_around(layout.pos, is_image, before=2, after=1)
        return layout
