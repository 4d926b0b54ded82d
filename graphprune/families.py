"""What graphprune knows about each model family: where the parts are and how inputs are laid out.

This is the only module that touches a model's Python classes. Everything downstream works on
the captured graphs and their anatomy. Adding a family means adding one `Family` here.
"""
from __future__ import annotations


import torch
from torch import nn

from .errors import UnsupportedModelError


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


class LlavaFamily(Family):
    """LLaVA-1.5 (and LLaVA-style models): CLIP tower with CLS, MLP projector, Llama LM."""
    name = "llava"

    def language_model(self):
        return self._require(getattr(self.model.model, "language_model", None), "language model")

    def lm_head(self):
        return self._require(getattr(self.model, "lm_head", None), "lm_head")

    def image_token_id(self):
        return self.model.config.image_token_id

    def vision_module(self):
        return LlavaVisionStage(self.model)


class LlavaInnerFamily(LlavaFamily):
    """LlavaModel, the LLaVA body without the LM head: what a torch.compile frame holds. Its
    prefill "logits" output is the final-normed hidden state (the head is the identity)."""

    def language_model(self):
        return self._require(getattr(self.model, "language_model", None), "language model")

    def lm_head(self):
        return nn.Identity()

    def vision_module(self):
        return None


class LlavaVisionStage(nn.Module):
    """pixel_values -> projected image features, as LlavaModel.get_image_features does.

    Written as a module of its own so that torch.export captures exactly the vision tower up to
    the feature layer, the CLS drop and the projector (nothing of the LM).
    """

    def __init__(self, model):
        super().__init__()
        cfg = model.config
        self.vision_tower = model.model.vision_tower
        self.multi_modal_projector = model.model.multi_modal_projector
        self.feature_layer = cfg.vision_feature_layer
        if not isinstance(self.feature_layer, int):
            raise UnsupportedModelError(type(model).__name__, "single vision feature layer",
                                        "multi-layer feature concatenation is not supported yet")
        self.strategy = cfg.vision_feature_select_strategy

    def forward(self, pixel_values):
        out = self.vision_tower(pixel_values, output_hidden_states=True)
        feats = out.hidden_states[self.feature_layer]
        if self.strategy == "default":
            feats = feats[:, 1:]
        return self.multi_modal_projector(feats)


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

    def image_features(self, pixel_values, image_grid_thw):
        out = self.model.model.get_image_features(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
        feats = getattr(out, "pooler_output", out)
        if isinstance(feats, (tuple, list)):
            feats = torch.cat(list(feats), 0)
        return feats


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
