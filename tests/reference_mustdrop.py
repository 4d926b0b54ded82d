"""Independent reference for MustDrop (Liu et al. 2024, "Multi-stage vision token dropping"), written from
docs/methods.md (the contract) in plain PyTorch on top of ``reference.llava_vision`` / ``lm_generate``.

Nothing here imports graphprune. Pieces:
  * ``merge_hook``: local spatial merging, an ``after_layer`` hook for ``llava_vision``;
  * ``key_set``: the protected key set from the feature layer's CLS attention;
  * ``filter_select``: dual-attention filtering, a select fn for ``lm_generate``;
  * ``mustdrop_reference``: the whole pipeline (merge -> keys -> compact inputs -> filters -> cache cut).

Readings of the contract that it leaves open (stated again where they apply):
  * merge, static mode: the output has exactly ``1 + C`` rows (CLS + C slots): every surviving slot
    (representatives and untouched tokens) plus the lowest-index non-surviving slots (merged-away members)
    to fill up to C, in ascending slot order. The filler slots are invalid and hold their own unmerged
    hidden state. If the merges leave more than C survivors even with every multi-token tile merged, it
    raises ``ValueError``.
  * merge tiles are scored on layer 0's output hidden states as they are (no extra norm).
  * key set size: ``ceil(ratio * N)`` with N = the image's *valid* patch tokens when ``valid`` is given
    (static mode: padding slots are not tokens and are never chosen), else N = V' (all columns).
  * filter: "vision tokens" of an image include slots that an earlier static stage invalidated (their
    attention columns are 0); such a slot stays invalid whatever the rule says. Static capacity is
    ``min(C, tokens of the image)``; more protected tokens than C is a ``ValueError``.
  * exact modes need the same count in every image/sample, otherwise ``ValueError`` (graphprune's
    ``InputError``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # tests/ on sys.path (conftest puts it there), as the test modules import it
    import reference as R
except ImportError:
    from tests import reference as R

__all__ = ["merge_hook", "tile_members", "tile_scores", "key_set", "filter_select", "mustdrop_reference",
           "FILTER_PRESETS"]

# keep -> (gamma, alpha): the authors' script values
FILTER_PRESETS = {192: (0.001, 0.001), 128: (0.0012, 0.001), 64: (0.011, 0.01)}


# -------------------------------------------------------------------------------- local spatial merge

def tile_members(grid: int, window: int) -> list[Tensor]:
    """Patch indices (raster order) of each ``window x window`` tile of a ``grid x grid`` patch grid, tiles in
    raster order; the last row/column of tiles may be smaller. Member 0 is the tile's representative."""
    tiles = []
    for r0 in range(0, grid, window):
        for c0 in range(0, grid, window):
            rows = torch.arange(r0, min(r0 + window, grid))
            cols = torch.arange(c0, min(c0 + window, grid))
            tiles.append((rows[:, None] * grid + cols[None, :]).reshape(-1))
    return tiles


def tile_scores(x: Tensor, tiles: list[Tensor]) -> Tensor:
    """x (V, d) patch states -> (n_tiles,) mean cosine similarity over ordered pairs i != j of each tile;
    ``nan`` for one-token tiles (they never merge)."""
    out = torch.full((len(tiles),), float("nan"))
    for t, m in enumerate(tiles):
        n = m.numel()
        if n < 2:
            continue
        u = F.normalize(x[m].float(), dim=-1)
        g = u @ u.t()
        out[t] = (g.sum() - g.diagonal().sum()) / (n * (n - 1))
    return out


def merge_hook(window: int = 3, tau: float = 0.8, mode: str = "exact", capacity: int | None = None):
    """MustDrop local spatial merging as an ``after_layer`` hook for ``reference.llava_vision``.

    Runs on the full sequence (CLS + the V = grid^2 patches, grid = sqrt(V)); CLS (row 0) is never merged.
    A merged tile becomes the mean of its members (sizes are all 1 here, so the size-weighted mean is the
    plain mean) at its representative's slot (first member in raster order).

    ``mode="exact"``: every tile with score >= tau merges; all images must end with the same count.
    ``mode="static"`` (capacity C patch slots, default V): tiles merge in descending score while score >= tau,
    then further tiles in descending score (below tau) while more than C tokens survive; the output has
    exactly C patch slots = the survivors plus the lowest-index merged-away slots as invalid fillers (which
    keep their own unmerged state), in ascending slot order.
    """
    if mode not in ("exact", "static"):
        raise ValueError(f"mode must be 'exact' or 'static', not {mode!r}")

    def hook(h: Tensor, ctx: dict):
        n, t, d = h.shape
        v = t - 1
        grid = math.isqrt(v)
        assert grid * grid == v, "merging needs the full square patch grid"
        assert bool((ctx["index"] == torch.arange(t)).all()), "merging runs once, on the unreduced sequence"
        tiles = tile_members(grid, window)
        cap = v if capacity is None else int(capacity)
        new_h, new_idx, new_valid = [], [], []
        for i in range(n):
            x = h[i, 1:]
            score = tile_scores(x, tiles)
            mergeable = ~torch.isnan(score)
            order = torch.topk(score.masked_fill(~mergeable, float("-inf")), int(mergeable.sum())).indices
            merged: list[int] = []
            if mode == "exact":
                merged = [int(j) for j in order if score[j] >= tau]
            else:
                alive = v
                for j in order.tolist():
                    if score[j] >= tau or alive > cap:
                        merged.append(j)
                        alive -= tiles[j].numel() - 1
                    else:
                        break  # descending order: nothing later is >= tau, and the count already fits
                if alive > cap:
                    raise ValueError(f"cannot reach capacity {cap}: {alive} tokens remain after merging all tiles")
            xs = x.clone()
            survive = torch.ones(v, dtype=torch.bool)
            for j in merged:
                m = tiles[j]
                xs[m[0]] = x[m].mean(dim=0)
                survive[m[1:]] = False
            slots = survive.clone()
            valid = survive.clone()
            if mode == "static":
                fill = cap - int(survive.sum())
                fillers = (~survive).nonzero(as_tuple=True)[0][:fill]  # lowest-index merged-away slots
                slots[fillers] = True
            keep = slots.nonzero(as_tuple=True)[0]
            new_h.append(torch.cat([h[i, :1], xs[keep]]))
            new_idx.append(torch.cat([torch.zeros(1, dtype=torch.long), keep + 1]))
            new_valid.append(torch.cat([torch.ones(1, dtype=torch.bool), valid[keep]]))
        counts = {r.shape[0] for r in new_h}
        if len(counts) != 1:
            raise ValueError(f"exact merging left different token counts per image {sorted(counts)}; use static mode")
        return torch.stack(new_h), torch.stack(new_idx), torch.stack(new_valid)

    return hook


# ---------------------------------------------------------------------------------------- key set

def key_set(cls_attn: Tensor, ratio: float = 0.08, valid: Tensor | None = None) -> Tensor:
    """Protected key set: per image the top ``ceil(ratio * N)`` patches by head-averaged CLS attention
    ``cls_attn`` (n, V'). N = V', or the image's valid count when ``valid`` (n, V') is given (invalid slots
    are then never chosen). Returns (n, V') bool."""
    n, v = cls_attn.shape
    valid = torch.ones(n, v, dtype=torch.bool) if valid is None else valid.bool()
    out = torch.zeros(n, v, dtype=torch.bool)
    for i in range(n):
        k = math.ceil(ratio * int(valid[i].sum()))
        score = cls_attn[i].float().masked_fill(~valid[i], float("-inf"))
        out[i, torch.topk(score, k).indices] = True
    return out


# ------------------------------------------------------------------------------ dual-attention filter

def filter_select(gamma: float, alpha: float, mode: str = "exact", capacity: int | None = None,
                  images: int | None = None):
    """MustDrop dual-attention filter as a select fn for ``lm_generate`` (returns dict(keep=, valid=)).

    Per image, A = layer L-1's head-averaged attention from the text tokens (``ctx["text_mask"]`` rows) to the
    image's current vision tokens (columns). Token j passes the rule if ``col_sum_j >= gamma * total`` or
    ``col_max_j >= alpha``; protected tokens are always kept. Exact: keep protected ∪ rule. Static (capacity
    C): rank protected first, then rule-kept by col_sum, then the rest by col_sum; keep the top
    ``min(C, V)``; a slot is valid iff protected or rule-kept. Non-vision tokens are always kept (valid as
    they were).
    """
    if mode not in ("exact", "static"):
        raise ValueError(f"mode must be 'exact' or 'static', not {mode!r}")
    if mode == "static" and capacity is None:
        raise ValueError("static mode needs a capacity")

    def select(ctx: dict) -> dict:
        vm = ctx["vision_mask"].bool()
        tm = ctx["text_mask"].bool()
        prot = ctx["protected"].bool()
        a = ctx["attn"].float().mean(dim=1)  # (B,S,S)
        b = vm.shape[0]
        keeps, valids = [], []
        for bi in range(b):
            text = tm[bi].nonzero(as_tuple=True)[0]
            parts = [(~vm[bi]).nonzero(as_tuple=True)[0]]
            part_valid = [torch.ones(parts[0].numel(), dtype=torch.bool)]
            for blk in R.image_blocks(vm[bi], images):
                sub = a[bi][text][:, blk]  # (T, V)
                col_sum, col_max, total = sub.sum(0), sub.amax(0), sub.sum()
                p = prot[bi, blk]
                rule = (col_sum >= gamma * total) | (col_max >= alpha)
                if mode == "exact":
                    chosen = (rule | p).nonzero(as_tuple=True)[0]
                else:
                    c = min(int(capacity), blk.numel())
                    if int(p.sum()) > c:
                        raise ValueError(f"{int(p.sum())} protected tokens exceed the capacity {c}")
                    # lexicographic ranking (tier, col_sum): fill from each tier in turn by topk on col_sum
                    taken = torch.zeros_like(p)
                    for tier in (p, rule & ~p, ~rule & ~p):
                        room = c - int(taken.sum())
                        cnt = min(room, int(tier.sum()))
                        if cnt > 0:
                            taken[torch.topk(col_sum.masked_fill(~tier, float("-inf")), cnt).indices] = True
                    chosen = taken.nonzero(as_tuple=True)[0]
                parts.append(blk[chosen])
                part_valid.append((rule | p)[chosen])
            idx = torch.cat(parts)
            order = idx.argsort()
            keeps.append(idx[order])
            valids.append(torch.cat(part_valid)[order])
        counts = {k.numel() for k in keeps}
        if len(counts) != 1:
            raise ValueError(f"exact filtering kept different counts per sample {sorted(counts)}; use static mode")
        if mode == "exact":
            per_image = {int(x.numel()) for bi in range(b) for x in _kept_per_image(vm[bi], keeps[bi], images)}
            if len(per_image) != 1:
                raise ValueError(f"exact filtering kept different counts per image {sorted(per_image)}; "
                                 "use static mode")
        return {"keep": torch.stack(keeps), "valid": torch.stack(valids)}

    return select


def _kept_per_image(vm_row: Tensor, keep_row: Tensor, images: int | None) -> list[Tensor]:
    blocks = R.image_blocks(vm_row, images)
    return [keep_row[torch.isin(keep_row, blk)] for blk in blocks]


# ------------------------------------------------------------------------------------- whole pipeline

@torch.no_grad()
def mustdrop_reference(model, example, *, window: int = 3, tau: float = 0.8, merge_layer: int = 0,
                       ratio: float = 0.08, filter_layers=(2, 3), gamma: float, alpha: float,
                       mode: str = "exact", capacity_merge: int | None = None, capacity_filter: int | None = None,
                       cut: bool = True, max_new_tokens: int = 16) -> dict:
    """The MustDrop pipeline on LLaVA, by hand.

    1. ``llava_vision`` with ``merge_hook`` after encoder layer ``merge_layer``;
    2. key set from the feature layer's CLS attention (``key_set`` with the slots' validity);
    3. LM inputs with compact positions (invalid slots masked like padding), protected mask mapped on;
    4. ``filter_select`` at every layer of ``filter_layers`` (same ``mode``), protected honoured;
    5. ``cut_to_final=(first filter, last filter)`` when ``cut``.
    Returns ``lm_generate``'s dict plus ``patch_index``, ``protected`` (n_images, V'), ``vision`` (the
    ``llava_vision`` output) and ``inputs`` (the LM input tuple).
    """
    hook = merge_hook(window, tau, mode, capacity_merge)
    vision = R.llava_vision(model, example.pixel_values, after_layer={merge_layer: hook})
    protected = key_set(vision["cls_attn"], ratio, valid=vision["valid"])
    inputs = R.llava_inputs_from_vision(model, example, vision, positions="compact", protected=protected)
    emb, mask, pos, vm, prot = inputs
    layers = sorted(filter_layers)
    selects = {layer: filter_select(gamma, alpha, mode, capacity_filter) for layer in layers}
    out = R.lm_generate(model, emb, mask, pos, selects=selects, protected=prot,
                        cut_to_final=(layers[0], layers[-1]) if cut and layers else None,
                        max_new_tokens=max_new_tokens, vision_mask=vm)
    out.update(patch_index=vision["patch_index"], protected=protected, vision=vision, inputs=inputs)
    return out
