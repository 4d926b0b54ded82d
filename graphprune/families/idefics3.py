"""Idefics3 and SmolVLM: SigLIP tower, pixel-shuffle connector (scale_factor), Llama LM held as the
body's `text_model`.

The processor splits an image into rows x cols tiles plus a downscaled global view, each tile
`image_seq_len` `<image>` placeholders, and writes

    <fake_token_around_image> <row_1_col_1> <image> x n ... (each row closed by "\\n")
    "\\n" <fake_token_around_image> <global-img> <image> x n <fake_token_around_image>

(an unsplit image: the global view alone). pixel_values is (samples, tiles, C, H, W), all-zero
tiles padding a sample with fewer. The config names none of the markers, so they are found by place:
a tile is a run of placeholders, its marker the token just ahead of it, and the global view, the
last tile of every image, is the run whose marker is the one ahead of the prompt's last run. An image
(its tiles and global view) is a unit; every token of its span that is not a placeholder is a separator.
"""
from __future__ import annotations

import torch

from graphprune.errors import InputError
from graphprune.families.base import MODALITIES, Family, VisionLayout, blocks_layout, markers_around, runs_of


class Idefics3Family(Family):
    name = "idefics3"
    model_types = ("idefics3", "smolvlm")
    vision_has_cls = False
    vision_inputs = ("pixel_values", "pixel_attention_mask")
    image_feature_inputs = ("pixel_attention_mask",)
    eager_vision = "tiled images padded per sample with all-zero tiles, which get_image_features drops"
    compile_refused = ("the compile frame sees only the image-token mask, whose runs are tiles: it cannot tell "
                       "which tiles and global view make one image")

    def body(self):
        inner = getattr(self.model, "model", None)
        return inner if hasattr(inner, "text_model") else self.model

    def language_model(self):
        return self._require(getattr(self.body(), "text_model", None), "language model (text_model)")

    def tokens_per_tile(self) -> int:
        cfg = self.config()
        return (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 // cfg.scale_factor ** 2

    def vision_layout(self, input_ids, video_unit: str = "frame", modalities=MODALITIES, pixel_values=None,
                      **inputs) -> VisionLayout | None:
        is_image = self.image_mask(input_ids, pixel_values) if "image" in modalities else None
        if is_image is None:
            return None
        b, per_tile = input_ids.shape[0], self.tokens_per_tile()
        if pixel_values.dim() != 5 or pixel_values.shape[0] != b:
            raise InputError(f"pixel_values of shape {tuple(pixel_values.shape)}: {self.model_class} takes "
                             f"(samples={b}, tiles, C, H, W), as its processor returns them")
        real_tiles = pixel_values.flatten(2).ne(0).any(-1).sum(-1).tolist()
        per_sample = []
        for i, row in enumerate(is_image):
            at = row.nonzero()[:, 0]
            runs = runs_of(at)
            if len(runs) != real_tiles[i] or any(r.numel() != per_tile for r in runs):
                raise InputError(f"sample {i}: image placeholders in runs of {[r.numel() for r in runs]} but "
                                 f"pixel_values holds {real_tiles[i]} tiles of {per_tile} tokens each")
            marks = input_ids[i, torch.stack([r[0] - 1 for r in runs])]
            ends = (marks == marks[-1]).nonzero()[:, 0].add(1).tolist()          # after each global view
            images = [torch.cat(runs[s:e]) for s, e in zip([0] + ends[:-1], ends)]
            per_sample.append([(f"image {j}", image) for j, image in enumerate(images)])
        layout = blocks_layout(per_sample, torch.zeros_like(is_image))
        layout.separators = markers_around(layout.pos, is_image, before=2, after=1)
        return layout
