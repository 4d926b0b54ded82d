"""Independent reference for MustDrop's merge stage on Qwen2-VL / Qwen2.5-VL / Qwen3-VL (Qwen2-VL: no attention
windows, every block attends over the whole frame). Nothing here imports graphprune.

Per unit (an image, a video frame) the encoder runs by hand from the model's own modules, in the processor's patch
order (reference_vision_qwen_methods.encoder_tables / _attention: softmax within each block's segment, window or
whole frame). After block `layer - 1`, on the grid_h/2 x grid_w/2 grid of 2x2 merge groups (raster order):
  tiles    window x window tiles of the group grid, cut anew in every attention window of the blocks that follow
           (a window's tiles start at its top-left group; windows=False tiles the whole grid, to show it matters);
  score    the mean pairwise cosine (self excluded) of the members' states, each group's 4 patch states
           concatenated (what the merger reads, less its norm);
  merge    a tile scoring >= tau becomes one group: the mean of its members, patch by patch, at its first member's
           slot (raster); the other members leave the sequence. Tiles of one group never merge.
The surviving groups run the later blocks (each keeps its own rotary angles), then the model's own merger.
layer = depth (mustdrop_merge(layer=None): at the features) merges the groups entering the merger's MLP (after its
norm, concatenated) instead, then runs the MLP.
Qwen3-VL's DeepStack taps (deepstack_visual_indexes): a tap before the merge gives each surviving group its own
row, a tap after it the model's tap merger on the merged states.
The pruned prompt keeps every vision slot (static capacity): a merged-away slot stays with attention mask 0, the
kept slots take the merged embeddings and DeepStack rows, all keep their M-RoPE positions; the model's own
forward runs it (reference_vision_qwen.hf_generate).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from reference_families import deepstack, family_inputs
from reference_vision_qwen import merger_mlp, merger_norm, units
from reference_vision_qwen_methods import _attention, encoder_tables, frames
from torch import Tensor


def window_tiles(rows: int, cols: int, window: int, segment: list) -> list[list[int]]:
    """Tiles of a rows x cols group grid, each a list of groups in raster order; segment[t]: group t's attention
    window key (groups of one key form a rectangle), each window tiled from its own top-left group."""
    tiles: dict = {}
    for key in dict.fromkeys(segment):
        members = [t for t in range(rows * cols) if segment[t] == key]
        r0, c0 = min(t // cols for t in members), min(t % cols for t in members)
        for t in members:
            tile = (key, (t // cols - r0) // window, (t % cols - c0) // window)
            tiles.setdefault(tile, []).append(t)
    return sorted(tiles.values())


def tile_score(states: Tensor) -> float:
    """Mean cosine similarity over the ordered pairs of distinct rows of states (m, D), m >= 2."""
    unit = F.normalize(states.float(), dim=-1)
    sim = unit @ unit.T
    m = states.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / (m * (m - 1)))


def _blocks_from(t: dict, visual, first: int, group: int):
    # each group's window key in the blocks first.. (the same key: together in every one of them)
    keys = [t["segments"][i].reshape(-1, group)[:, 0] for i in range(first, len(visual.blocks))]
    return list(zip(*[k.tolist() for k in keys])) if keys else None


@torch.no_grad()
def merge_frame(model, frame: dict, layer: int, window: int, tau: float, windows: bool = True,
                scores: list | None = None) -> dict:
    """One frame through the encoder with the merge before block `layer`: `survive` (V,) bool per group,
    `values` (V, D) the merger outputs at the surviving groups (zero elsewhere), `deepstack` (levels, V, D)
    their DeepStack rows (Qwen3-VL; None else). scores: a list to append every tile's score to."""
    visual = model.model.visual
    t = encoder_tables(visual, frame)
    group = visual.spatial_merge_size ** 2
    x = t["x"]
    v, d = x.shape[0] // group, x.shape[1]
    rows, cols = int(frame["thw"][0, 1]) // visual.spatial_merge_size, int(frame["thw"][0, 2]) // visual.spatial_merge_size
    taps = list(getattr(visual, "deepstack_visual_indexes", None) or [])
    tapped = [None] * len(taps)
    slots = torch.arange(v)                          # the original group index of each group in the sequence
    def merge(states):
        # the tiles of the groups' states (V, group x d): merged tiles at their first group; which groups go
        segment = (_blocks_from(t, visual, layer, group) if windows else None) or [0] * v
        gone = torch.zeros(v, dtype=torch.bool)
        for tile in window_tiles(rows, cols, window, segment):
            if len(tile) < 2:
                continue
            score = tile_score(states[tile])
            if scores is not None:
                scores.append(score)
            if score >= tau:
                states[tile[0]] = states[tile].mean(0)
                gone[tile[1:]] = True
        return states, gone

    for i, block in enumerate(visual.blocks):
        if i == layer:
            states, gone = merge(x.reshape(v, group * d))
            slots, x = slots[~gone], states[~gone].reshape(-1, d)
        patches = (slots[:, None] * group + torch.arange(group)).flatten()
        seg = t["segments"][i][patches]
        out, _ = _attention(block, x, t["cos"][patches], t["sin"][patches], seg[:, None] == seg[None, :], 0.0)
        x = x + out
        x = x + block.mlp(block.norm2(x))
        if i in taps:                                # the tap's rows of the groups present now, at their slots
            level = torch.zeros(v, model.config.text_config.hidden_size)
            level[slots] = visual.deepstack_merger_list[taps.index(i)](x).float()
            tapped[taps.index(i)] = level
    values = torch.zeros(v, model.config.text_config.hidden_size)
    if layer < len(visual.blocks):
        values[slots] = visual.merger(x).float()
    else:                   # at the features: the merger's normed, concatenated groups merge, then its MLP
        states, gone = merge(merger_norm(visual)(x).reshape(v, -1))
        slots = slots[~gone]
        values[slots] = merger_mlp(visual, states[~gone]).float()
    survive = torch.zeros(v, dtype=torch.bool)
    survive[slots] = True
    return {"survive": survive, "values": values, "deepstack": torch.stack(tapped) if taps else None}


@torch.no_grad()
def mustdrop_merge(model, example, layer: int, window: int, tau: float, steps: int, windows: bool = True) -> dict:
    """The merge on every unit, then the model's own forward on the pruned prompt: reference_vision_qwen.hf_generate's
    result, with `survive` (B, S) bool (False at merged-away vision slots), `keep` (every slot), `embeds` (B, S, D)
    and `deepstack` (levels, B, S, D; Qwen3-VL) the pruned prompt's embeddings and DeepStack rows."""
    from reference_vision_qwen import hf_generate
    emb = family_inputs(model, example)[0].clone()
    rows = deepstack(model, example)
    per_type = {token: [merge_frame(model, f, layer, window, tau, windows) for f in fs]
                for token, fs in frames(model, example).items()}
    survive = torch.ones(example.input_ids.shape, dtype=torch.bool)
    for i, blocks in enumerate(units(model, example)):
        for blk in blocks:
            merged = per_type[int(example.input_ids[i, blk[0]])].pop(0)
            at = blk[merged["survive"]]
            emb[i, at] = merged["values"][merged["survive"]]
            survive[i, blk] = merged["survive"]
            if rows is not None:
                rows[:, i, at] = merged["deepstack"][:, merged["survive"]]
    keep = torch.arange(example.input_ids.shape[1]).expand(example.input_ids.shape[0], -1)
    out = hf_generate(model, example, keep, steps, emb, valid=survive, prompt_rows=rows)
    return {**out, "survive": survive, "embeds": emb, "deepstack": rows}


def all_tile_scores(model, example, layer: int, window: int) -> list[float]:
    """Every unit's tile scores (tiles of 2 or more groups), to place tau among them."""
    scores: list = []
    for fs in frames(model, example).values():
        for f in fs:
            merge_frame(model, f, layer, window, 2.0, scores=scores)
    return scores
