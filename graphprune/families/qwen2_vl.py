"""Qwen2-VL: ViT without CLS, 2x2 patch merger, Qwen2 LM with 3-D M-RoPE positions."""
from __future__ import annotations

import torch

from graphprune.errors import InputError
from graphprune.families.base import Family


class Qwen2VLFamily(Family):
    """Qwen2-VL: windowed-free ViT without CLS, 2x2 patch merger, Qwen2 LM with 3-D M-RoPE."""
    name = "qwen2_vl"
    position_axes = 3
    vision_has_cls = False

    def language_model(self):
        return self._require(getattr(self.model.model, "language_model", None), "language model")

    def lm_head(self):
        return self._require(getattr(self.model, "lm_head", None), "lm_head")

    def image_token_id(self):
        return self.model.config.image_token_id

    def vision_module(self):
        return None     # data-dependent shapes (grid_thw): run eagerly, see Stage.eager

    def positions(self, input_ids, attention_mask, image_grid_thw=None, mm_token_type_ids=None, **extra):
        if mm_token_type_ids is None:
            mm_token_type_ids = (input_ids == self.image_token_id()).int()
        if image_grid_thw is None:
            pos = super().positions(input_ids, attention_mask)
            return pos[None].expand(3, -1, -1).contiguous()
        pos, _ = self.model.model.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw,
                                                 attention_mask=attention_mask)
        return pos

    def image_token_counts(self, pixel_values, image_grid_thw=None):
        vc = self.model.config.vision_config
        grid = image_grid_thw
        if not isinstance(grid, torch.Tensor) or grid.dim() != 2 or grid.shape[1] != 3 \
                or grid.dtype.is_floating_point or bool((grid < 1).any()):
            raise InputError("Qwen2-VL images need image_grid_thw, an int tensor (images, 3) of positive "
                             f"(t, h, w) patch counts as the processor returns it; got {grid!r}")
        m = vc.spatial_merge_size
        if bool((grid[:, 1:] % m != 0).any()):
            raise InputError(f"image_grid_thw {grid.tolist()}: h and w must be multiples of the {m}x{m} patch merge")
        patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        rows = int(grid.prod(-1).sum())
        if tuple(pixel_values.shape) != (rows, patch):
            raise InputError(f"pixel_values of shape {tuple(pixel_values.shape)}: image_grid_thw {grid.tolist()} "
                             f"needs ({rows}, {patch}) flattened patches, as the processor returns them")
        return (grid.prod(-1) // m ** 2).tolist()

    def image_features(self, pixel_values, image_grid_thw):
        out = self.model.model.get_image_features(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
        feats = getattr(out, "pooler_output", out)
        if isinstance(feats, (tuple, list)):
            feats = torch.cat(list(feats), 0)
        return feats
