"""Independent references for VisPruner and ToMe on Qwen2.5-VL's vision encoder. Nothing here imports graphprune.

The encoder's per-token tensors come from reference_vision_qwen (the model's own encoder run, scores recomputed
by hand per attention segment); the selection rules are written here from the authors' descriptions:

* VisPruner (important="attention", the authors' answer for CLS-free towers, VisPruner issue #1): per unit,
  the int(keep x important_ratio) tokens receiving the most last-block attention (its 4 patches' sum: the same
  order as their mean), then the rest, in descending attention, lose duplicates in rounds until keep - important
  remain: A = even places, B = odd places, each A token's best cosine match in B (the merger MLP's input
  features); the min(8, rest - needed) A tokens with the highest match go; A's survivors (in descending match)
  then B are the next round's order. The kept tokens keep their prompt slots and M-RoPE positions.
* ToMe (positions="keep", merged in place; ToMe's bipartite soft matching without CLS): the encoder run by hand
  on each unit (an image, a video frame) in the processor's patch order from its own modules (norms, qkv, proj,
  MLP, merger), its attention written out: softmax over each block's segment (window or whole frame, from the
  model's cu_seqlens), plus log(size) of every key patch once tokens merged. After each merging block, over
  the 2x2 groups in raster order: A = even places, B = odd; each A group's best B group by cosine of their
  mean keys (that block's post-RoPE keys, heads concatenated), only within the same segment; the r A groups
  with the best matches (r = ceil(rest / layers left), at most half) join their B group, patch by patch,
  size-weighted; the groups left stay in raster order, each at its own slot, with its own rotary angles.
  Qwen3-VL's DeepStack taps read the output of their block, before a merge after that block: each kept group
  takes its row of every tap, through that level's own merger (deepstack_merger_list), from the groups as they
  were there (merged states where a merge came before the tap).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from reference_families import deepstack, family_inputs
from reference_vision_qwen import _window_index, keep_index, unit_tokens, units
from torch import Tensor


def vispruner_choice(score: Tensor, feats: Tensor, keep: int, important_ratio: float = 0.5) -> Tensor:
    """Local indices (ascending) VisPruner keeps of one unit's tokens: score (V,), feats (V, D)."""
    order = torch.argsort(score, descending=True, stable=True)
    n_imp = int(keep * important_ratio)
    important, rest = order[:n_imp].tolist(), order[n_imp:].tolist()
    needed = keep - n_imp
    while needed > 0 and len(rest) - needed > 0:
        drop = min(8, len(rest) - needed)
        a, b = rest[0::2], rest[1::2]
        sim = F.normalize(feats[a].float(), dim=-1) @ F.normalize(feats[b].float(), dim=-1).T
        ranked = torch.argsort(sim.max(-1).values, descending=True, stable=True).tolist()
        rest = [a[i] for i in ranked[drop:]] + b
    kept = important + (rest if needed > 0 else [])
    return torch.tensor(sorted(kept))


@torch.no_grad()
def vispruner(model, example, keep: int, important_ratio: float = 0.5, video_unit: str = "frame") -> Tensor:
    """VisPruner with attention-received importance on each unit: the kept prompt indices (B, S')."""
    choices = [[vispruner_choice(unit["score"], unit["hidden"], keep, important_ratio) for unit in row]
               for row in unit_tokens(model, example, -1, video_unit)]
    return keep_index(model, example, choices, video_unit)


@torch.no_grad()
def encoder_tables(visual, frame: dict) -> dict:
    """What the model's encoder hands its blocks for one frame of grid (1, h, w), in the processor's patch
    order: the patch embeddings, rotary (cos, sin) and per block each patch's segment id."""
    seen = {"segments": []}

    def record(module, args, kwargs):
        if module is visual.blocks[0]:
            seen.update(x=args[0] if args else kwargs["hidden_states"], rotary=kwargs["position_embeddings"])
        seen["segments"].append(kwargs["cu_seqlens"])

    hooks = [blk.register_forward_pre_hook(record, with_kwargs=True) for blk in visual.blocks]
    try:
        visual(frame["pixels"], grid_thw=frame["thw"])
    finally:
        for hook in hooks:
            hook.remove()
    p, group = seen["x"].shape[0], visual.spatial_merge_size ** 2
    place = torch.arange(p)
    window = _window_index(visual, frame["thw"])
    if window is not None:                      # window order -> the processor's patch order
        place = (window[:, None] * group + torch.arange(group)).flatten()

    def processor(t):
        return torch.zeros_like(t).index_copy(0, place, t)

    segments = [processor(torch.bucketize(torch.arange(p), cu[1:], right=True)) for cu in seen["segments"]]
    return {"x": processor(seen["x"]).float(), "cos": processor(seen["rotary"][0]).float(),
            "sin": processor(seen["rotary"][1]).float(), "segments": segments}


def _attention(block, x, cos, sin, allowed, log_size):
    """One block's attention by hand: (P, d) -> (P, d); allowed (P, P) bool, log_size (P,) key bias."""
    s, heads = x.shape[0], block.attn.num_heads
    qkv = block.attn.qkv(block.norm1(x)).reshape(s, 3, heads, -1)

    def rope(t):
        half = t.shape[-1] // 2
        return t * cos[:, None] + torch.cat([-t[..., half:], t[..., :half]], -1) * sin[:, None]

    q, k, v = rope(qkv[:, 0]).transpose(0, 1), rope(qkv[:, 1]).transpose(0, 1), qkv[:, 2].transpose(0, 1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + log_size
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = block.attn.proj((probs @ v).transpose(0, 1).reshape(s, -1))
    return out, k.transpose(0, 1).reshape(s, -1)


def tome_bipartite(keys: Tensor, states: Tensor, sizes: Tensor, together: Tensor, count: int):
    """One ToMe step without CLS on groups: keys (V, K) their mean keys, states (V, 4d), sizes (V,), together
    (V, V). Returns the kept groups (ascending), their states and sizes."""
    v = keys.shape[0]
    a, b = list(range(0, v, 2)), list(range(1, v, 2))
    metric = F.normalize(keys, dim=-1)
    sim = (metric[a] @ metric[b].T).masked_fill(~together[a][:, b], float("-inf"))
    best, match = sim.max(-1)
    ranked = torch.argsort(best, descending=True, stable=True).tolist()
    assert bool(torch.isfinite(best[ranked[:count]]).all())
    total, weight = states * sizes[:, None], sizes.clone()
    gone = set()
    for i in ranked[:count]:
        src, dst = a[i], b[int(match[i])]
        total[dst] += states[src] * sizes[src]
        weight[dst] += sizes[src]
        gone.add(src)
    kept = [j for j in range(v) if j not in gone]
    return torch.tensor(kept), total[kept] / weight[kept, None], weight[kept]


@torch.no_grad()
def tome_frame(model, frame: dict, keep: int, layers: tuple, windows: bool = True) -> tuple[Tensor, Tensor, list]:
    """One frame (pixels (h*w, dim), thw (1, 3)) through the encoder with ToMe after each of `layers`:
    the kept groups (ascending local indices), their merger outputs (k, D) and, per DeepStack level, their
    rows (k, D). windows=False lets groups of different segments merge (to show that the rule matters)."""
    visual = model.model.visual
    t = encoder_tables(visual, frame)
    group = visual.spatial_merge_size ** 2
    x, v = t["x"], t["x"].shape[0] // group
    slots, sizes = torch.arange(v), torch.ones(v)                 # each group's original index and size
    taps, tapped = list(getattr(visual, "deepstack_visual_indexes", None) or []), []      # (slots there, rows)
    for i, block in enumerate(visual.blocks):
        patches = (slots[:, None] * group + torch.arange(group)).flatten()
        seg = t["segments"][i][patches]
        log_size = sizes.log().repeat_interleave(group)
        out, k = _attention(block, x, t["cos"][patches], t["sin"][patches], seg[:, None] == seg[None, :], log_size)
        x = x + out
        x = x + block.mlp(block.norm2(x))
        if i in taps:
            tapped.append((slots, visual.deepstack_merger_list[taps.index(i)](x).float()))
        if i in layers:
            left = len(layers) - layers.index(i)
            count = min(math.ceil(max(slots.numel() - keep, 0) / left), slots.numel() // 2)
            seg_group = seg.reshape(-1, group)[:, 0]
            kept, states, sizes = tome_bipartite(k.reshape(-1, group, k.shape[-1]).mean(1), x.reshape(-1, group * x.shape[-1]),
                                                 sizes, (seg_group[:, None] == seg_group[None, :]) | (not windows), count)
            slots, x = slots[kept], states.reshape(-1, x.shape[-1])
    rows = [level[torch.searchsorted(there, slots)] for there, level in tapped]    # slots stay ascending
    return slots, visual.merger(x).float(), rows      # the model's own merger: norm, 2x2 concatenation, MLP


def frames(model, example) -> dict:
    """Per vision token type, each unit's (pixels, thw) in the encoder's order (a video: frame by frame)."""
    cfg, kw = model.config, example.as_kwargs()
    out = {}
    for token, pixels, grid in ((cfg.image_token_id, "pixel_values", "image_grid_thw"),
                                (cfg.video_token_id, "pixel_values_videos", "video_grid_thw")):
        if kw.get(pixels) is None:
            continue
        start, out[token] = 0, []
        for t, h, w in kw[grid].tolist():
            for _ in range(t):
                out[token].append({"pixels": kw[pixels][start:start + h * w], "thw": torch.tensor([[1, h, w]])})
                start += h * w
    return out


@torch.no_grad()
def tome(model, example, keep: int, layers: tuple, windows: bool = True) -> tuple[Tensor, Tensor]:
    """ToMe in place on every unit: the kept prompt indices (B, S') and the pruned prompt's embeddings (B, S', D)."""
    return tome_deepstack(model, example, keep, layers, windows)[:2]


@torch.no_grad()
def tome_deepstack(model, example, keep: int, layers: tuple, windows: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """tome, and the kept tokens' DeepStack rows (levels, B, S', D) (zero at text; None off Qwen3-VL)."""
    emb, deep = family_inputs(model, example)[0], deepstack(model, example)
    per_type = {token: [tome_frame(model, f, keep, layers, windows) for f in fs]
                for token, fs in frames(model, example).items()}
    picks, rows = [], []
    for i, blocks in enumerate(units(model, example)):
        row, chosen = emb[i].clone(), []
        for blk in blocks:
            kept, values, levels = per_type[int(example.input_ids[i, blk[0]])].pop(0)
            row[blk[kept]] = values
            for level, tap in enumerate(levels):
                deep[level, i, blk[kept]] = tap
            chosen.append(kept)
        picks.append(chosen)
        rows.append(row)
    index = keep_index(model, example, picks)
    embeds = torch.stack(rows).gather(1, index[..., None].expand(-1, -1, emb.shape[-1]))
    if deep is not None:
        deep = deep.gather(2, index[None, ..., None].expand(deep.shape[0], -1, -1, deep.shape[-1]))
    return index, embeds, deep
