"""PaliGemma: SigLIP tower, linear projector, Gemma LM, a prefix LM.

The processor writes <image> x num_image_tokens per image, then <bos>, the prompt and "\\n" (the
prefix), and returns token_type_ids: 0 over the prefix, 1 over a suffix (training targets). The
prefix attends bidirectionally (one attention group), a suffix and generated tokens causally.
transformers 4.x reads every prompt token as prefix when not training (compat.paligemma_prefix).
Positions count from 1. PaliGemma 2 (a Gemma 2 LM) is refused up front while its language model
cannot run scaled_dot_product_attention (transformers' Gemma2Model: eager attention only, for its
logit soft-capping); once it can, its sliding window is handled as Gemma 3's (families/gemma3.py).
"""
from __future__ import annotations

import torch

from graphprune.compat import paligemma_prefix
from graphprune.errors import UnsupportedModelError
from graphprune.families.base import Family, token_types


class PaliGemmaFamily(Family):
    name = "paligemma"
    model_types = ("paligemma",)
    vision_has_cls = False
    vision_inputs = ("pixel_values", "token_type_ids")
    attention_groups_input = True
    eager_vision = "SigLIP features through the model's own get_image_features"

    def __init__(self, model):
        super().__init__(model)
        lm = type(self.language_model())
        if not getattr(lm, "_supports_sdpa", True):
            raise UnsupportedModelError(self.model_class, f"{self.name} family support",
                                        f"its {lm.__name__} language model ({self.text_config().model_type}: PaliGemma 2) "
                                        "runs eager attention only in this transformers, and graphprune prunes at the "
                                        "scaled_dot_product_attention of each layer, which that model never calls")
        if getattr(self.text_config(), "sliding_window", None) is not None:      # PaliGemma 2
            self.compile_refused = ("PaliGemma 2's sliding-window Gemma 2 cache layers in the compile frame are "
                                    "not verified against graphprune.prune (Gemma 3's are)")

    def positions(self, input_ids, attention_mask, **inputs) -> torch.Tensor:
        return super().positions(input_ids, attention_mask) + 1

    def attention_groups(self, attention_mask, token_type_ids=None, **inputs) -> torch.Tensor:
        prefix = paligemma_prefix(token_types(attention_mask, token_type_ids), attention_mask)
        return torch.where(prefix, 0, -1)
