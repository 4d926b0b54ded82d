"""Mistral 3 (Mistral Small 3.1): Pixtral vision tower (each image at its own size, image_sizes),
a patch merger (spatial_merge_size^2 patches -> one token), Mistral LM.

The processor writes an image as rows of `[IMG]` placeholders, each row closed by `[IMG_BREAK]` and
the last by `[IMG_END]`. Those markers are separators (never dropped, never counted); the config
does not name their ids, so they are found by place: the tokens inside an image's span that are
not its placeholders, and the one token closing it.
"""
from __future__ import annotations

import torch

from graphprune.errors import InputError
from graphprune.families.base import MODALITIES, Family, VisionLayout, blocks_layout, markers_around


class Mistral3Family(Family):
    name = "mistral3"
    model_types = ("mistral3",)
    vision_has_cls = False
    vision_inputs = ("pixel_values", "image_sizes")
    image_feature_inputs = ("image_sizes",)
    eager_vision = "images at their own size (image_sizes), through Pixtral's 2-D rotary patch grid"
    compile_refused = ("the compile frame sees only the image-token mask, which [IMG_BREAK] cuts into rows: "
                       "it cannot tell where one image ends and the next begins")

    def tokens_per_image(self, image_size) -> int:
        h, w = (int(x) for x in image_size)
        side = self.config().vision_config.patch_size * self.config().spatial_merge_size
        return (h // side) * (w // side)

    def grid_free(self, layout, image_sizes=None, **inputs) -> str:
        """Each image is its own rows x cols grid (image_sizes): square ones only."""
        side = self.config().vision_config.patch_size * self.config().spatial_merge_size
        for j, (h, w) in enumerate([] if image_sizes is None else image_sizes[:len(layout.units)].tolist()):
            if h // side != w // side:
                return f"{self.model_class}'s image {j} is a {h // side} x {w // side} token grid, not a square one"
        return super().grid_free(layout)

    def vision_layout(self, input_ids, video_unit: str = "frame", modalities=MODALITIES, image_sizes=None,
                      **inputs) -> VisionLayout | None:
        if "image" not in modalities:
            return None
        found = self.sized_images(input_ids, image_sizes, inputs.get("pixel_values"))
        if found is None:
            return None
        is_image, per = found
        per_sample = []
        for i, row in enumerate(is_image):
            at = row.nonzero()[:, 0]
            sizes = [self.tokens_per_image(s) for s in image_sizes[i * per:(i + 1) * per]]
            if sum(sizes) != at.numel():
                raise InputError(f"sample {i}: {at.numel()} image tokens but image_sizes "
                                 f"{image_sizes[i * per:(i + 1) * per].tolist()} make {sum(sizes)}")
            per_sample.append([(f"image {j}", blk) for j, blk in enumerate(at.split(sizes))])
        layout = blocks_layout(per_sample, torch.zeros_like(is_image))
        layout.separators = markers_around(layout.pos, is_image, before=0, after=1)
        return layout

