"""Gemma 3: SigLIP tower, average-pooled projector (mm_tokens_per_image per image), Gemma 3 LM
with sliding-window and full-attention layers.

The processor writes an image as "\\n\\n" <start_of_image> <image_soft_token> x mm_tokens_per_image
<end_of_image> "\\n\\n" and returns token_type_ids, 1 at the image tokens. The LM attends
bidirectionally inside each image: every run of token_type_ids == 1 is one attention group
(Hugging Face's get_block_sequence_ids_for_mask, transformers 5; image_group_ids, 4.x); the rest is
causal. Without token_type_ids Hugging Face attends causally everywhere, and so does this family.
Its sliding window (1024 tokens in the released models) is shorter than its context: a run is
accepted while prompt and generated tokens stay inside it (the window never binds), and refused
before any work once they could reach it.
"""
from __future__ import annotations

import torch

from graphprune.compat import transformers_major
from graphprune.families.base import Family, token_types

# transformers 4.x gives Gemma 3 a HybridCache: static tensors written in place, which the decoder
# frame does not return, so the backend cannot tell which outputs are each layer's keys and values
HYBRID_CACHE = ("on transformers 4.x its HybridCache (static, written in place) is not among the decoder frame's "
                "outputs, so the backend cannot give each layer the keys and values it kept; transformers 5 returns "
                "them")


class Gemma3Family(Family):
    name = "gemma3"
    model_types = ("gemma3",)
    vision_has_cls = False
    vision_inputs = ("pixel_values", "token_type_ids")
    separator_tokens = ("boi_token_id", "eoi_token_id")     # <start_of_image>, <end_of_image>
    attention_groups_input = True
    eager_vision = "SigLIP features average-pooled to mm_tokens_per_image by the projector"

    def __init__(self, model):
        super().__init__(model)
        if transformers_major() < 5:
            self.compile_refused = HYBRID_CACHE

    def attention_groups(self, attention_mask, token_type_ids=None, **inputs) -> torch.Tensor:
        types = token_types(attention_mask, token_type_ids)
        if types is None:
            return torch.full_like(attention_mask, -1, dtype=torch.long)
        is_image = types == 1
        starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
        return torch.where(is_image, starts.long().cumsum(1) - 1, -1)
