"""LLaVA-1.5 and LLaVA-style models: CLIP tower with CLS, MLP projector, Llama LM; one fixed block
of `<image>` tokens per image. The vision stage is captured, so vision-stage passes apply."""
from __future__ import annotations

from torch import nn

from graphprune.errors import InputError, UnsupportedModelError
from graphprune.families.base import Family


class LlavaFamily(Family):
    name = "llava"
    model_types = ("llava",)
    reads_feature_layer = True

    def vision_module(self, through_last: bool = False):
        return None if self.is_body() else LlavaVisionStage(self.model, through_last)

    def image_token_counts(self, pixel_values, image_grid_thw=None):
        vc = self.model.config.vision_config
        shape = (vc.num_channels, vc.image_size, vc.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != shape:
            raise InputError(f"pixel_values of shape {tuple(pixel_values.shape)}: this model takes (images, "
                             f"{', '.join(map(str, shape))}); resize the images with the model's processor")
        tokens = (vc.image_size // vc.patch_size) ** 2 + (self.model.config.vision_feature_select_strategy == "full")
        return [tokens] * pixel_values.shape[0]


class LlavaVisionStage(nn.Module):
    """pixel_values -> projected image features, as LlavaModel.get_image_features does.

    Written as a module of its own so that torch.export captures exactly the vision tower up to
    the feature layer, the CLS drop and the projector (nothing of the LM).
    """

    def __init__(self, model, through_last: bool = False):
        super().__init__()
        self.through_last = through_last
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
        projected = self.multi_modal_projector(feats)
        # HF never uses the layers after the feature layer, so export drops them unless they are returned
        return (projected, out.last_hidden_state) if self.through_last else projected
