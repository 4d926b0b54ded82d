"""What graphprune knows about each model family: where the parts are and how inputs are laid out.

This package is the only place that touches a model's Python classes; everything downstream
works on the captured graphs and their anatomy. `base.Family` is the generic default; one short
module per family declares what differs (README: "Adding a family").
"""
from __future__ import annotations

from torch import nn

from graphprune.errors import UnsupportedModelError
from graphprune.families.aya_vision import AyaVisionFamily
from graphprune.families.base import Family, VisionLayout
from graphprune.families.gemma3 import Gemma3Family
from graphprune.families.glm4v import Glm4vFamily
from graphprune.families.idefics3 import Idefics3Family
from graphprune.families.internvl import InternVLFamily
from graphprune.families.llava import LlavaFamily
from graphprune.families.llava_next import LlavaNextFamily
from graphprune.families.llava_next_video import LlavaNextVideoFamily
from graphprune.families.llava_onevision import LlavaOnevisionFamily
from graphprune.families.mistral3 import Mistral3Family
from graphprune.families.paligemma import PaliGemmaFamily
from graphprune.families.qwen2_5_vl import Qwen2_5_VLFamily
from graphprune.families.qwen2_vl import Qwen2VLFamily
from graphprune.families.qwen3_vl import Qwen3VLFamily
from graphprune.families.refused import MllamaFamily, hybrid_layers
from graphprune.families.video_llava import VideoLlavaFamily

__all__ = ["FAMILIES", "Family", "VisionLayout", "family_of", "supported_model_types"]

FAMILIES: dict[str, type[Family]] = {f.name: f for f in (
    LlavaFamily, LlavaNextFamily, LlavaOnevisionFamily, Qwen2VLFamily, Qwen2_5_VLFamily, Qwen3VLFamily, Mistral3Family,
    AyaVisionFamily, LlavaNextVideoFamily, VideoLlavaFamily, InternVLFamily, Glm4vFamily,
    Idefics3Family, Gemma3Family, PaliGemmaFamily,
    MllamaFamily)}
_BY_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}


def supported_model_types() -> list[str]:
    return sorted(t for t, f in _BY_TYPE.items() if not f.refused)


def family_of(model: nn.Module) -> Family:
    """The family reading `model`: by its config's model_type (so subclasses and renamed classes are
    recognised), the model's structure deciding the rest (a full XForConditionalGeneration or its
    body, as a torch.compile frame holds it). Unknown and unprunable models are refused here."""
    cls = type(model).__name__
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    hybrid = hybrid_layers(config) if config is not None else []
    if hybrid:
        raise UnsupportedModelError(cls, f"{model_type} family support",
                                    f"its language model has {', '.join(hybrid)} layers (a hybrid LM): they keep "
                                    "no per-token keys and values, so vision tokens cannot be pruned from them")
    family = _BY_TYPE.get(model_type)
    if family is None:
        raise UnsupportedModelError(cls, "model family",
                                    f"model_type {model_type!r} is not a family graphprune reads; supported: "
                                    f"{', '.join(supported_model_types())} (README: Adding a family)")
    return family(model)
