"""The LLaVA-NeXT / LLaVA-OneVision anyres vision stage as a capturable module, one image size (a shape bucket) each.

For one image size the model's get_image_features is constant bookkeeping around its tower: how many
crops (a base view, then a grid of high-resolution crops), how the crops' patches are laid out on the
image's patch grid and unpadded to its aspect ratio, and where image_newline rows close each grid row
(pack_image_features). `packed_index` runs the model's own pack_image_features once on index-coded
features to read that bookkeeping off as one constant gather: the patch (crop x patch, the tower's
order) behind every feature token, newline rows left out (the runtime writes image_newline at those
separator slots). A packing that interpolates (LLaVA-OneVision's vision_aspect_ratio cap on large crop
grids) is no gather, and is refused for a vision-stage pass.

`AnyresVisionStage` then runs the model's own tower on every crop of a batch of images of that size
(images x crops encoder sequences), takes the feature layer (CLS dropped by the "default" strategy),
gathers the image's tokens in prompt order and runs the projector: (images, tokens, D). The graph
holds the gather (its `token_patches` buffer; `graphprune_crops` in its meta), so that anatomy finds it and
signals computed per crop patch (CLS attention, attention received, keys, hidden states) are gathered to
the tokens the same way (tokenops.crop_tokens).
The capture is checked against `AnyresImageFeatures`, the model's own get_image_features.

Video frames are one crop each, a token a group of patches (`token_patches` (tokens, G)), its signals the means
over them. Bucket ("video", frames a unit). LLaVA-OneVision pools each frame's *projected* patch features 2 x 2
(apply_pooling: bilinear to half the side, for an even side exactly each 2 x 2 block's mean; pooled_index);
LLaVA-NeXT-Video's vision_resampler average-pools the feature layer's patches (kernel = stride =
spatial_pool_stride) *before* the projector (resampled_index). The family says which (video_token_patches,
video_pooled_before_projector).
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from graphprune.errors import InputError, PassNotApplicable, UnsupportedModelError


def crop_count(family, image_size) -> int:
    """Crops of an image of image_size (H, W): its base view plus its anyres grid (the model's own rule)."""
    body, cfg = family.body(), family.config()
    return sys.modules[type(body).__module__].image_size_to_num_patches(
        image_size=torch.as_tensor(image_size), grid_pinpoints=cfg.image_grid_pinpoints,
        patch_size=cfg.vision_config.image_size)


def packed_index(family, image_size) -> torch.Tensor:
    """(tokens,) for an image of image_size (H, W): the tower patch (crop * patches + patch) each of its
    feature tokens is, in prompt order, image_newline rows left out. Read off the model's own
    pack_image_features run on features coding each patch as (i + 1, (i + 1)^2), newline 0: a packed row
    that is not such a pair mixed patches (interpolated) and is refused."""
    vc = family.config().vision_config
    side = vc.image_size // vc.patch_size
    crops = crop_count(family, image_size)
    code = torch.arange(1, crops * side * side + 1, dtype=torch.float64)
    marker = torch.stack([code, code * code], -1).reshape(crops, side * side, 2)
    packed = family.pack_markers(family.body(), marker, torch.as_tensor(image_size)).double()
    rows = packed[packed[:, 0] != 0]
    index = rows[:, 0].round()
    if not (torch.equal(rows[:, 0], index) and torch.equal(rows[:, 1], index * index)):
        raise InputError(f"{family.model_class}: an image of size {tuple(int(s) for s in image_size)} is packed by "
                         "interpolating its crops' patches (vision_aspect_ratio caps the tokens of large crop grids), "
                         "so its feature tokens are no encoder patches a vision-stage pass could score; resize the "
                         "image to a smaller crop grid, or use a feature-level pass (divprune, vision_topk("
                         "score='norm')) or an LLM-stage one")
    return index.long() - 1


def pooled_index(family) -> torch.Tensor:
    """(tokens, 4) for a LLaVA-OneVision video frame: the patches of each pooled token (apply_pooling's bilinear
    halving of an even patch grid is the mean of each 2 x 2 block), checked on the model's own apply_pooling; an
    odd side (pooled by true interpolation) is refused."""
    vc = family.config().vision_config
    side = vc.image_size // vc.patch_size
    rows = torch.arange(0, side, 2)
    corner = (rows[:, None] * side + rows[None, :]).reshape(-1, 1)
    index = corner + torch.tensor([0, 1, side, side + 1])
    probe = torch.randn(1, side * side, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pooled = family.body().apply_pooling(probe) if side % 2 == 0 else None
    if pooled is None or not torch.allclose(pooled[0], probe[0, index].mean(1)):
        raise InputError(f"{family.model_class}: its video frames' {side} x {side} patch grid is pooled by "
                         "interpolation, not 2 x 2 averages, so the pooled tokens are no groups of encoder patches a "
                         "vision-stage pass could score; prune its videos with a feature-level pass (divprune, evs) "
                         "or an LLM-stage one")
    return index


def block_index(side: int, stride: int) -> torch.Tensor:
    """(tokens, stride^2) the raster patches (of a side x side grid) each token of an average pooling with
    kernel = stride reads, tokens in raster order; a side the stride does not divide leaves its last patch rows
    and columns out, as the pooling does."""
    starts = torch.arange(0, side - stride + 1, stride)
    corner = (starts[:, None] * side + starts[None, :]).reshape(-1, 1)
    return corner + (torch.arange(stride)[:, None] * side + torch.arange(stride)[None, :]).reshape(1, -1)


def resampled_index(family) -> torch.Tensor:
    """(tokens, stride^2) for a LLaVA-NeXT-Video frame: the patches each token of its vision_resampler averages
    (AvgPool2d, kernel = stride = spatial_pool_stride; a side the stride does not divide leaves its last patch rows
    and columns out, as the pooling does), checked on the model's own vision_resampler. A max or conv resampler
    makes no token a mean of patches, and is refused."""
    cfg = family.config()
    vc, stride = cfg.vision_config, cfg.spatial_pool_stride
    if cfg.spatial_pool_mode != "average":
        raise PassNotApplicable(f"{family.model_class}: spatial_pool_mode={cfg.spatial_pool_mode!r} pools each video "
                                "frame's patches by a max or a learned convolution, so a pooled token is no mean of "
                                "encoder patches a vision-stage pass could score; prune its videos with a feature-level "
                                "pass (divprune, evs) or an LLM-stage one")
    side = vc.image_size // vc.patch_size
    index = block_index(side, stride)
    probe = torch.randn(1, side * side, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pooled = family.body().vision_resampler(probe)
    if pooled.shape[1:] != (index.shape[0], 3) or not torch.allclose(pooled[0], probe[0, index].mean(1)):
        raise PassNotApplicable(f"{family.model_class}: its vision_resampler does not average {stride} x {stride} "
                                f"blocks of the {side} x {side} patch grid; prune its videos with a feature-level pass "
                                "(divprune, evs) or an LLM-stage one")
    return index


class AnyresVisionStage(nn.Module):
    """pixel_values (units, crops, C, h, w) of one bucket -> projected features (units, tokens, D): the model's
    tower on every crop, its feature layer, the tokens gathered in prompt order (no newline rows), the projector.
    An anyres image (image_size (H, W)): its crops, one patch a token. Video units (image_size None, `crops`
    frames a unit): each token the mean of its patch block, before the projector (LLaVA-NeXT-Video's
    vision_resampler) or of the block's projected features (LLaVA-OneVision's apply_pooling)."""
    pooled_tokens = True        # a token of several patches (video) is their mean

    def __init__(self, family, image_size, crops: int | None = None):
        super().__init__()
        body, cfg = family.body(), family.config()
        self.vision_tower, self.multi_modal_projector = body.vision_tower, body.multi_modal_projector
        self.feature_layer, self.strategy = cfg.vision_feature_layer, cfg.vision_feature_select_strategy
        if not isinstance(self.feature_layer, int):
            raise UnsupportedModelError(family.model_class, "single vision feature layer",
                                        f"vision_feature_layer={self.feature_layer!r} concatenates several layers")
        vc = cfg.vision_config
        has_cls = family.vision_has_cls
        if (self.strategy == "default") != has_cls:
            raise UnsupportedModelError(family.model_class, "anyres vision features of whole patch grids",
                                        f"vision_feature_select_strategy={self.strategy!r} on a tower "
                                        f"{'with' if has_cls else 'without'} CLS")
        self.patches = (vc.image_size // vc.patch_size) ** 2
        self.pool_before_projector = family.video_pooled_before_projector
        if image_size is None:              # video: each frame's pooled tokens, frame after frame
            self.crops, frame = crops, family.video_token_patches()
            index = torch.cat([frame + f * self.patches for f in range(crops)])
        else:
            self.crops, index = crop_count(family, image_size), packed_index(family, image_size)[:, None]
        device = next(self.vision_tower.parameters()).device
        self.register_buffer("token_patches", index.to(device), persistent=False)      # (tokens, patches a token)
        # anatomy's token "grid": one row of the unit's tokens (several crop grids, or frames)
        self.grid = (1, int(index.shape[0]))

    def forward(self, pixel_values):
        n, c = pixel_values.shape[:2]
        out = self.vision_tower(pixel_values.reshape(n * c, *pixel_values.shape[2:]), output_hidden_states=True)
        feats = out.hidden_states[self.feature_layer]
        if self.strategy == "default":
            feats = feats[:, 1:]
        t, group = self.token_patches.shape
        feats = feats.reshape(n, c * self.patches, feats.shape[-1]).index_select(1, self.token_patches.flatten())
        if group == 1:
            return self.multi_modal_projector(feats)
        grouped = feats.reshape(n, t, group, -1)
        if self.pool_before_projector:      # the resampler averages the patches, the projector maps the mean
            return self.multi_modal_projector(grouped.mean(2))
        return self.multi_modal_projector(grouped).mean(2)      # each patch projected, then averaged


class AnyresImageFeatures(nn.Module):
    """The model's own get_image_features on images of one size (get_video_features on video units of `crops`
    frames), their newline rows dropped: what the capture of that bucket is checked against."""

    def __init__(self, family, image_size):
        super().__init__()
        self.family, self.image_size = family, None if image_size is None else [int(s) for s in image_size]
        self.newline = None if image_size is None else family.newline_slots(torch.as_tensor(image_size))

    def forward(self, pixel_values):
        n = pixel_values.shape[0]
        if self.image_size is None:          # each unit a video of its frames, closed by video_newline rows
            rows = self.family.vision_feature_rows(pixel_values_videos=pixel_values)
            rows = rows.reshape(n, -1, rows.shape[-1])
            return rows[:, :rows.shape[1] - self.family.video_newline]
        rows = self.family.vision_feature_rows(pixel_values=pixel_values,
                                               image_sizes=torch.tensor([self.image_size] * n, device=pixel_values.device))
        return rows.reshape(n, self.newline.numel(), -1)[:, ~self.newline]
