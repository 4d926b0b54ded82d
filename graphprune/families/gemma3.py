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

Its vision stage is captured (Gemma3VisionStage): the SigLIP tower (no CLS), then each of the
mm_tokens_per_image tokens the mean of its k x k block of the last_hidden_state's patches (the projector's
AvgPool2d, kernel = stride = k; the block index is checked on the model's own avg_pool), then the
projector's RMSNorm and input projection. A token's encoder signals are the means over its block's patches
(attention received, keys); its hidden state is the pooled feature that enters the projector's norm (the
tower's post_layernorm output, so not the mean of the last layer's outputs). Pan-and-scan crops are images
of their own to graphprune, as to the model: the processor gives each its pixel_values row and its own
<start_of_image> block, so `keep` counts per crop.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from graphprune.compat import transformers_major
from graphprune.errors import PassNotApplicable, UnsupportedModelError
from graphprune.families.anyres_vision import block_index
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

    def vision_module(self, through_last: bool = False):
        if self.is_body():
            return None
        if through_last:        # the projector reads the tower's last layer: no layer lies past it
            raise PassNotApplicable(f"{self.model_class}: its features come from the vision encoder's last layer; "
                                    "no signal reads a layer past it")
        return Gemma3VisionStage(self)

    def vision_eager_module(self, bucket):
        return Gemma3ImageFeatures(self)


def pooled_index(family) -> torch.Tensor:
    """(tokens, k^2) the raster patches of each image token: the k x k block the projector's AvgPool2d (kernel =
    stride = k) averages, checked on the model's own avg_pool."""
    projector = family.body().multi_modal_projector
    side, k = projector.patches_per_image, projector.kernel_size
    index = block_index(side, k)
    probe = torch.randn(1, side * side, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pool = projector.avg_pool
    pooled = pool(probe.transpose(1, 2).reshape(1, 3, side, side)).flatten(2).transpose(1, 2)
    if not isinstance(pool, nn.AvgPool2d) or pooled.shape[1:] != (index.shape[0], 3) \
            or not torch.allclose(pooled[0], probe[0, index].mean(1)):
        raise UnsupportedModelError(family.model_class, "image tokens that are averages of patch blocks",
                                    f"its projector's avg_pool does not average {k} x {k} blocks of the {side} x "
                                    f"{side} patch grid; prune it with an LLM-stage pass")
    return index


class PooledProjection(nn.Module):
    """The projector's steps after its pooling: mm_soft_emb_norm, then the mm_input_projection_weight matmul
    (Gemma3MultiModalProjector.forward), on tokens already pooled."""

    def __init__(self, projector):
        super().__init__()
        self.projector = projector

    def forward(self, pooled):
        normed = self.projector.mm_soft_emb_norm(pooled)
        return torch.matmul(normed, self.projector.mm_input_projection_weight).type_as(pooled)


class Gemma3VisionStage(nn.Module):
    """pixel_values (images, C, H, W) -> projected features (images, mm_tokens_per_image, D), as the model's
    get_image_features: the tower's last_hidden_state, each token the mean of its patch block (token_patches,
    the gather anatomy reads as one crop per image), the projector's norm and projection. `pool_before_projector`
    is False: a pooled token's hidden state is what enters the norm (captured_features), not the mean of the last
    layer's outputs, which the tower's post_layernorm follows."""
    crops = 1
    pool_before_projector = False
    pooled_tokens = True

    def __init__(self, family):
        super().__init__()
        body = family.body()
        self.vision_tower = body.vision_tower
        self.multi_modal_projector = PooledProjection(body.multi_modal_projector)
        index = pooled_index(family)
        device = next(self.vision_tower.parameters()).device
        self.register_buffer("token_patches", index.to(device), persistent=False)      # (tokens, k^2)
        side = math.isqrt(index.shape[0])
        self.grid = (side, side)

    def forward(self, pixel_values):
        hidden = self.vision_tower(pixel_values=pixel_values).last_hidden_state
        t, group = self.token_patches.shape
        blocks = hidden.index_select(1, self.token_patches.flatten()).reshape(hidden.shape[0], t, group, -1)
        # accumulated in fp32, as AvgPool2d accumulates low-precision inputs
        return self.multi_modal_projector(blocks.mean(2, dtype=torch.float32).to(hidden.dtype))


class Gemma3ImageFeatures(nn.Module):
    """The model's own get_image_features, (images, tokens, D): what the capture is checked against."""

    def __init__(self, family):
        super().__init__()
        self.family = family

    def forward(self, pixel_values):
        rows = self.family.vision_feature_rows(pixel_values=pixel_values)
        return rows.reshape(pixel_values.shape[0], -1, rows.shape[-1])
