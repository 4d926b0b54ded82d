"""The Qwen2-VL / Qwen2.5-VL vision encoder as a capturable module, one patch grid (a shape bucket) each.

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

A video's temporal patches are encoded independently by the model (cu_seqlens splits them, window and
rotary tables repeat per temporal patch), so a video frame is encoded here as an image of grid (1, h, w).
"""
from __future__ import annotations

import sys

import torch
from torch import nn

CODE_BASE = 256      # index coding of the probe: two channels of base-256 digits, exact in bf16 too


def probe_grid(visual: nn.Module, h: int, w: int) -> dict:
    """What the model's encoder hands its blocks for one image of grid (1, h, w), in the processor's
    patch order: cos / sin (P, head_dim), and per block its attention segment of each patch (P,)."""
    p = h * w
    first = visual.blocks[0]
    seen: dict = {"blocks": []}

    def code_patches(module, args, out):
        coded = torch.zeros_like(out)
        index = torch.arange(p, device=out.device)
        coded[:, 0], coded[:, 1] = (index // CODE_BASE).to(out.dtype), (index % CODE_BASE).to(out.dtype)
        return coded

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if module is first:
            seen["order"] = (hidden[:, 0].round().long() * CODE_BASE + hidden[:, 1].round().long())
            seen["rotary"] = kwargs.get("position_embeddings")
        seen["blocks"].append(kwargs["cu_seqlens"])

    hooks = [visual.patch_embed.register_forward_hook(code_patches)]
    hooks += [blk.register_forward_pre_hook(record, with_kwargs=True) for blk in visual.blocks]
    vc = visual.config
    dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    param = next(visual.parameters())
    try:
        with torch.no_grad():
            visual(torch.zeros(p, dim, device=param.device, dtype=param.dtype),
                   grid_thw=torch.tensor([[1, h, w]], device=param.device))
    finally:
        for hook in hooks:
            hook.remove()
    order = seen["order"]                        # order[j]: the processor's index of the patch at place j
    if seen["rotary"] is None or sorted(order.tolist()) != list(range(p)):
        raise RuntimeError("the vision encoder did not hand its blocks rotary tables and a patch permutation")
    back = torch.empty_like(order)
    back[order] = torch.arange(p, device=order.device)
    segments = []
    for cu in seen["blocks"]:
        at = torch.bucketize(torch.arange(p, device=cu.device), cu[1:].to(cu.device), right=True)
        segments.append(at[back.to(at.device)])
    cos, sin = (t[back.to(t.device)] for t in seen["rotary"])
    return {"cos": cos, "sin": sin, "segments": segments}


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


class QwenVisionStage(nn.Module):
    """pixel_values (images, h*w, patch_dim) of one grid (1, h, w) -> projected features
    (images, h*w / merge^2, D), as get_image_features returns them per image."""

    def __init__(self, visual: nn.Module, h: int, w: int):
        super().__init__()
        tables = probe_grid(visual, h, w)
        rotary = sys.modules[type(visual.blocks[0].attn).__module__].apply_rotary_pos_emb_vision
        self.patch_embed = visual.patch_embed
        self.blocks = nn.ModuleList(QwenVisionBlock(blk, rotary) for blk in visual.blocks)
        self.merge_norm = visual.merger.ln_q
        self.multi_modal_projector = visual.merger.mlp       # "projector": where anatomy finds the features
        self.group = visual.spatial_merge_size ** 2
        self.grid = (h // visual.spatial_merge_size, w // visual.spatial_merge_size)
        self.register_buffer("cos", tables["cos"], persistent=False)
        self.register_buffer("sin", tables["sin"], persistent=False)
        # per block: None where it attends over the whole image, else same-segment (window) pairs
        self.masks = [None if bool((seg == seg[0]).all()) else (seg[:, None] == seg[None, :]) for seg in tables["segments"]]
        for i, mask in enumerate(self.masks):
            if mask is not None:
                self.register_buffer(f"mask_{i}", mask, persistent=False)

    def forward(self, pixel_values):
        n, p, _ = pixel_values.shape
        x = self.patch_embed(pixel_values.reshape(n * p, -1)).reshape(n, p, -1)
        for i, blk in enumerate(self.blocks):
            x = blk(x, self.cos, self.sin, None if self.masks[i] is None else getattr(self, f"mask_{i}"))
        feats = self.merge_norm(x).reshape(n, p // self.group, -1)      # each LLM token's merge group
        return self.multi_modal_projector(feats)


class QwenImageFeatures(nn.Module):
    """The model's own get_image_features on images of one grid (1, h, w), laid out as QwenVisionStage
    takes them: what its capture is checked against."""

    def __init__(self, body: nn.Module, h: int, w: int):
        super().__init__()
        self.body, self.grid = body, (1, h, w)

    def forward(self, pixel_values):
        n, p, dim = pixel_values.shape
        grid = torch.tensor([self.grid] * n, device=pixel_values.device)
        out = self.body.get_image_features(pixel_values.reshape(n * p, dim), grid)
        return torch.stack(list(getattr(out, "pooler_output", out)))       # transformers 4.x: the split features
