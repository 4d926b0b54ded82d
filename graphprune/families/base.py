"""The Family interface: where a model's parts are and how its inputs are laid out."""
from __future__ import annotations

import torch
from torch import nn

from graphprune.errors import UnsupportedModelError


class Family:
    name: str
    position_axes: int = 1          # 3 for M-RoPE (temporal, height, width)
    vision_has_cls: bool = True

    def __init__(self, model: nn.Module):
        self.model = model
        self.model_class = type(model).__name__

    # -- parts -------------------------------------------------------------------------------
    def language_model(self) -> nn.Module: ...
    def lm_head(self) -> nn.Module: ...
    def vision_module(self) -> nn.Module | None: ...
    def image_token_id(self) -> int: ...
    def text_config(self):
        return self.model.config.text_config

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model().get_input_embeddings()(input_ids)

    def embed_rows(self) -> int:
        """How many token ids the input embedding has rows for."""
        return self.language_model().get_input_embeddings().num_embeddings

    def image_token_counts(self, pixel_values: torch.Tensor, image_grid_thw=None) -> list[int] | None:
        """How many image tokens each image of pixel_values fills in the prompt (None: this family
        cannot tell); raises InputError when the images have a shape the vision encoder cannot take."""
        return None

    def positions(self, input_ids, attention_mask, **extra) -> torch.Tensor:
        """Position ids as Hugging Face's generate() builds them for left-padded batches."""
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.masked_fill(attention_mask == 0, 0)

    def vision_inputs(self, pixel_values, **extra) -> tuple:
        return (pixel_values,)

    def _require(self, obj, element: str, hint: str = ""):
        if obj is None:
            raise UnsupportedModelError(self.model_class, element, hint)
        return obj
