"""What graphprune knows about each model family: where the parts are and how inputs are laid out.

This package is the only place that touches a model's Python classes; everything downstream
works on the captured graphs and their anatomy. One short module per family.
"""
from __future__ import annotations

from torch import nn

from graphprune.errors import UnsupportedModelError
from graphprune.families.base import Family
from graphprune.families.llava import LlavaFamily, LlavaInnerFamily
from graphprune.families.qwen2_vl import Qwen2VLFamily

__all__ = ["FAMILIES", "Family", "family_of"]

FAMILIES = {
    "LlavaForConditionalGeneration": LlavaFamily,
    "Qwen2VLForConditionalGeneration": Qwen2VLFamily,
    "LlavaModel": LlavaInnerFamily,
}


def family_of(model: nn.Module) -> Family:
    cls = type(model).__name__
    if cls not in FAMILIES:
        raise UnsupportedModelError(cls, "model family",
                                    f"graphprune reads these classes: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[cls](model)
