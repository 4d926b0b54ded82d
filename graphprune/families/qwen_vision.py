"""The Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision encoder as a capturable module, one patch grid (a shape bucket) each.

The model's own vision transformer derives its rotary tables, window permutation and attention
segments (cu_seqlens) from grid_thw with data-dependent Python (`.tolist()`, `int(...)`), which
torch.export cannot trace, and its SDPA path runs one attention call per window. For a fixed grid
those are constants: `probe_grid` runs the model's own encoder once on that grid and records what it
hands its blocks (the rotary (cos, sin), each block's cu_seqlens, and the window order, read from an
index-coded patch embedding). `QwenVisionStage` then runs the model's own submodules (patch embedding,
each block's norms / qkv / proj / MLP, the merger's norm and MLP, the model's rotary function) in the
processor's patch order, each block's attention as one SDPA whose boolean mask allows exactly the
segments (window or whole frame) the model's block attends within. That is one attention node per
layer, a batch of images of one grid on dim 0, and the features in get_image_features' order; the
capture is checked against get_image_features (graphprune.verify) before any pass touches it.

Qwen3-VL adds a learned position grid, interpolated to the image's grid, to the patch embeddings: for a
fixed grid that is a constant too, read off the same probe (what the first block receives when the patch
embedding is zero). Its DeepStack taps (vision_config.deepstack_visual_indexes) send the outputs of some
blocks, each through its own merger, to the language model: QwenVisionStage returns them as a second
output, `deepstack_features` (images, tokens, levels, D), one row per feature token like the features.

A video's temporal patches are encoded independently by the model (cu_seqlens splits them, window and
rotary tables repeat per temporal patch), so a video frame is encoded here as an image of grid (1, h, w).
A whole video (prune(video_unit="video")) is a unit of `frames` such encoder sequences: the graph encodes
them as a batch of frames and lays each video's tokens out frame after frame, through a constant gather
(`token_patches` (tokens, 4): each token's patches, frame x h*w + patch; `graphprune_crops` = frames in
its meta), as the anyres stage gathers crops, so that signals computed per frame are gathered to the
video's tokens the same way (tokenops.crop_tokens) and one top-k runs over every frame's tokens.
"""
from __future__ import annotations

import math
import sys

import torch
from torch import nn

# index coding of the probe: base-64 digits, one channel each. In bf16 a digit plus Qwen3-VL's added position
# embedding rounds by at most 0.25 (spacing 0.5 below 128): subtracting that embedding in fp32 and rounding
# gives the digit back exactly
CODE_BASE = 64


def _first_block_inputs(visual: nn.Module, h: int, w: int, patches) -> dict:
    """Run the model's encoder on one image of grid (1, h, w) with its patch embedding's output replaced by
    patches(out), and return what each block is handed: `hidden` (first block), `rotary`, `cu_seqlens`."""
    first = visual.blocks[0]
    seen: dict = {"blocks": []}

    def record(module, args, kwargs):
        if module is first:
            seen["hidden"] = args[0] if args else kwargs["hidden_states"]
            seen["rotary"] = kwargs.get("position_embeddings")
        seen["blocks"].append(kwargs["cu_seqlens"])

    hooks = [visual.patch_embed.register_forward_hook(lambda module, args, out: patches(out))]
    hooks += [blk.register_forward_pre_hook(record, with_kwargs=True) for blk in visual.blocks]
    vc = visual.config
    dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    param = next(visual.parameters())
    try:
        with torch.no_grad():
            visual(torch.zeros(h * w, dim, device=param.device, dtype=param.dtype),
                   grid_thw=torch.tensor([[1, h, w]], device=param.device))
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def probe_grid(visual: nn.Module, h: int, w: int) -> dict:
    """What the model's encoder hands its blocks for one image of grid (1, h, w), in the processor's
    patch order: cos / sin (P, head_dim), per block its attention segment of each patch (P,), and `added`
    (P, D), what the encoder adds to the patch embeddings before its first block (Qwen3-VL's interpolated
    position grid; None where that is nothing)."""
    p = h * w
    added = _first_block_inputs(visual, h, w, torch.zeros_like)["hidden"]

    places = CODE_BASE ** torch.arange(max(1, math.ceil(math.log(p, CODE_BASE))) - 1, -1, -1)    # most significant first

    def code_patches(out):
        coded = torch.zeros_like(out)
        digits = torch.arange(p)[:, None] // places % CODE_BASE
        coded[:, :places.numel()] = digits.to(out.device, out.dtype)
        return coded

    seen = _first_block_inputs(visual, h, w, code_patches)
    digits = (seen["hidden"][:, :places.numel()].float() - added[:, :places.numel()].float()).round().long()
    order = (digits.cpu() * places).sum(-1).to(digits.device)   # order[j]: the processor's index of the patch at place j
    if seen["rotary"] is None or sorted(order.tolist()) != list(range(p)):
        raise RuntimeError("the vision encoder did not hand its blocks rotary tables and a patch permutation")
    back = torch.empty_like(order)
    back[order] = torch.arange(p, device=order.device)
    segments = []
    for cu in seen["blocks"]:
        at = torch.bucketize(torch.arange(p, device=cu.device), cu[1:].to(cu.device), right=True)
        segments.append(at[back.to(at.device)])
    cos, sin = (t[back.to(t.device)] for t in seen["rotary"])
    added = None if not bool(added.any()) else added[back.to(added.device)]
    return {"cos": cos, "sin": sin, "segments": segments, "added": added}


class QwenVisionBlock(nn.Module):
    """One vision block of the model, its attention as a single (masked) SDPA over a batch of images."""

    def __init__(self, block: nn.Module, rotary):
        super().__init__()
        self.norm1, self.norm2, self.mlp = block.norm1, block.norm2, block.mlp
        self.qkv, self.proj = block.attn.qkv, block.attn.proj
        self.heads = block.attn.num_heads
        self.rotary = rotary

    def forward(self, x, cos, sin, mask):
        n, p, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, p, 3, self.heads, -1).unbind(2)     # (n, P, H, hd)
        q, k = self.rotary(q, k, cos, sin)
        out = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                         attn_mask=mask)
        x = x + self.proj(out.transpose(1, 2).reshape(n, p, d))
        return x + self.mlp(self.norm2(x))


class MergerMLP(nn.Module):
    """Qwen3-VL's merger after its norm: linear_fc1, act_fn, linear_fc2 (the model's own modules)."""

    def __init__(self, merger: nn.Module):
        super().__init__()
        self.linear_fc1, self.act_fn, self.linear_fc2 = merger.linear_fc1, merger.act_fn, merger.linear_fc2

    def forward(self, x):
        return self.linear_fc2(self.act_fn(self.linear_fc1(x)))


class QwenVisionStage(nn.Module):
    """pixel_values (images, h*w, patch_dim) of one grid (1, h, w) -> projected features
    (images, h*w / merge^2, D), as get_image_features returns them per image, and for Qwen3-VL its
    DeepStack features (images, h*w / merge^2, levels, D). frames: whole videos of that many frames of
    the grid, (videos, frames*h*w, patch_dim) -> (videos, frames*h*w / merge^2, D), as get_video_features."""

    def __init__(self, visual: nn.Module, h: int, w: int, frames: int | None = None):
        super().__init__()
        tables = probe_grid(visual, h, w)
        rotary = sys.modules[type(visual.blocks[0].attn).__module__].apply_rotary_pos_emb_vision
        self.patch_embed = visual.patch_embed
        self.blocks = nn.ModuleList(QwenVisionBlock(blk, rotary) for blk in visual.blocks)
        merger = visual.merger
        qwen3 = hasattr(merger, "linear_fc1")      # Qwen3-VL's merger: norm, fc1, act, fc2; Qwen2(.5)-VL's: ln_q, mlp
        self.merge_norm = merger.norm if qwen3 else merger.ln_q
        # "projector": where anatomy finds the features (the deepstack mergers must not carry that name)
        self.multi_modal_projector = MergerMLP(merger) if qwen3 else merger.mlp
        self.deepstack_at = list(getattr(visual, "deepstack_visual_indexes", None) or [])
        self.deepstack_mergers = visual.deepstack_merger_list if self.deepstack_at else None
        self.group = visual.spatial_merge_size ** 2
        self.grid = (h // visual.spatial_merge_size, w // visual.spatial_merge_size)
        self.frames, self.whole_video = frames or 1, frames is not None
        if self.whole_video:      # a video's tokens: each frame's merge groups in order, frame after frame
            self.crops = frames
            self.grid = (frames * self.grid[0], self.grid[1])
            patches = torch.arange(frames * h * w, device=tables["cos"].device)
            self.register_buffer("token_patches", patches.reshape(-1, self.group), persistent=False)
        self.register_buffer("cos", tables["cos"], persistent=False)
        self.register_buffer("sin", tables["sin"], persistent=False)
        self.register_buffer("added", tables["added"], persistent=False)    # None: nothing is added
        # per block: None where it attends over the whole image, else same-segment (window) pairs
        self.masks = [None if bool((seg == seg[0]).all()) else (seg[:, None] == seg[None, :]) for seg in tables["segments"]]
        for i, mask in enumerate(self.masks):
            if mask is not None:
                self.register_buffer(f"mask_{i}", mask, persistent=False)

    @property
    def per_token_outputs(self) -> tuple[str, ...]:
        """Outputs of one row per feature token, which a selection takes at its kept tokens (capture marks them)."""
        return ("deepstack_features",) if self.deepstack_at else ()

    @property
    def output_names(self) -> list[str]:
        """The captured graph's outputs (graphprune_outputs), in the order forward returns them."""
        return ["features"] + (["deepstack_features"] if self.deepstack_at else [])

    def forward(self, pixel_values):
        n, f = pixel_values.shape[0], self.frames
        p = pixel_values.shape[1] // f          # each frame is its own encoder sequence
        x = self.patch_embed(pixel_values.reshape(n * f * p, -1)).reshape(n * f, p, -1)
        if self.added is not None:
            x = x + self.added
        deepstack, levels = None, []
        for i, blk in enumerate(self.blocks):
            x = blk(x, self.cos, self.sin, None if self.masks[i] is None else getattr(self, f"mask_{i}"))
            if i in self.deepstack_at:          # the model's merger of that level (its norm after the 2x2 shuffle)
                merger = self.deepstack_mergers[self.deepstack_at.index(i)]
                # rows of x as they are (no n x patches size: a merge before this tap has fewer patches)
                levels.append(merger(x.reshape(-1, x.shape[-1])).reshape(n, f * p // self.group, -1))
                if len(levels) == len(self.deepstack_at):
                    # stacked here, among the encoder's layers: each selection, in the encoder or at the
                    # features, takes these rows (a per-token output) at its kept tokens
                    deepstack = torch.stack(levels, 2)
        feats = self.merge_norm(x)
        if self.whole_video:        # a video's frames: its tokens gathered frame after frame
            feats = feats.reshape(n, f * p, -1).index_select(1, self.token_patches.flatten())
        feats = feats.reshape(n, f * p // self.group, -1)      # each LLM token's merge group
        feats = self.multi_modal_projector(feats)
        return feats if deepstack is None else (feats, deepstack)


class QwenImageFeatures(nn.Module):
    """The model's own get_image_features on images of one grid (1, h, w) (get_video_features on videos of
    grid (frames, h, w)), laid out as QwenVisionStage takes them: what its capture is checked against."""

    def __init__(self, body: nn.Module, h: int, w: int, frames: int | None = None):
        super().__init__()
        self.body, self.grid, self.video = body, (frames or 1, h, w), frames is not None

    def forward(self, pixel_values):
        n, p, dim = pixel_values.shape
        grid = torch.tensor([self.grid] * n, device=pixel_values.device)
        features = self.body.get_video_features if self.video else self.body.get_image_features
        out = features(pixel_values.reshape(n * p, dim), grid)
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], (list, tuple)):
            feats, deepstack = out          # transformers 4.57's Qwen3-VL: (features, deepstack features)
        else:                               # transformers 4.x Qwen2(.5)-VL: the split features (a tuple)
            feats, deepstack = getattr(out, "pooler_output", out), getattr(out, "deepstack_features", None)
        feats = torch.stack(list(feats))
        if not deepstack:
            return feats
        per_level = [torch.cat(list(level)) if isinstance(level, (tuple, list)) else level for level in deepstack]
        return feats, torch.stack(per_level, 1).reshape(n, -1, len(per_level), feats.shape[-1])
