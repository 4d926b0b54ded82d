"""Qwen2-VL: ViT without CLS, 2x2 patch merger, Qwen2 LM with 3-D M-RoPE positions."""
from __future__ import annotations

import torch

from graphprune.compat import qwen2vl_rope_index
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
        return qwen2vl_rope_index(self.model, input_ids, mm_token_type_ids, image_grid_thw, attention_mask)

    def image_features(self, pixel_values, image_grid_thw):
        out = self.model.model.get_image_features(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
        feats = getattr(out, "pooler_output", out)
        if isinstance(feats, (tuple, list)):
            feats = torch.cat(list(feats), 0)
        return feats
