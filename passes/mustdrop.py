"""MustDrop: "Multi-Stage Vision Token Dropping" (Liu et al., 2024): four passes, three stages.

1. mustdrop_merge (vision encoder, after layer 0): tile the patch grid into window x window
   tiles; a tile whose tokens are alike (mean pairwise cosine >= tau) becomes one token, the
   mean of its members, at its first member's slot. CLS is never merged.
   ANYRES IMAGES (LLaVA-NeXT, LLaVA-OneVision) MERGE AT THE FEATURES, NOT INSIDE THE ENCODER: each crop runs
   as its own encoder sequence and an image's tokens exist only after the packing gather that follows the
   encoder, so mustdrop_merge(layer=None) (mustdrop(merge_layer=None)) tiles each crop's patch grid (windows
   never cross crops; patches unpadded away are no tokens) and merges the feature layer's states there; the
   encoder runs unmerged. The key set then comes first, off the unmerged tokens (a key merged away hands its
   protection to its tile's merged token). Or in place inside the encoder (layer=1, positions="keep",
   order="raster", static): the same tiles merge after encoder layer 0, each token written back to its crop's
   patch row, merged-away patches masked as keys in the later layers of their crop (no encoder compute saved:
   the paper's semantics only) and as padding in the LLM; compact / exact there are refused naming both.
   QWEN2-VL / QWEN2.5-VL / QWEN3-VL MERGE WHOLE 2x2 GROUPS INSIDE THE ENCODER (positions="keep", order="raster",
   required with M-RoPE): a token is a merge group, a group's state its 4 patches' states concatenated (score:
   the mean pairwise cosine of those; merged patch by patch), tiles of the group grid never cross an attention
   window of the blocks that follow (CropTiles there). DeepStack taps before the merge keep each kept group's
   own rows. Details: docs/methods.md.
2. mustdrop_keys (vision encoder, feature layer): the patches the CLS token attends to most
   (top ceil(8%)) become a protected key set that no later pass drops.
3. mustdrop_filter (prefill, layers 2, 6, 10, 14): with A the attention the instruction tokens
   pay each image's vision tokens in the layer before, drop token j when both its column sum
   < gamma x total and its column max < alpha; key-set tokens always stay.
4. mustdrop_cache (prefill outputs): the caches of the layers between the first and the last
   filter keep only the tokens that survived the last filter (output-aware cache).

Threshold rules keep a data-dependent number of tokens. mode="exact" does exactly that (eager,
one count per batch); mode="static" (the default) keeps a fixed capacity per image, masks the
slots the rule would have dropped, and so exports and batches. Exact semantics and how the
modes differ: docs/methods.md. The vision stage compacts positions by default, as the authors' code does.
"""
import math
from dataclasses import dataclass

import torch

from graphprune.errors import InputError, PassConfigError, PassNotApplicable
from graphprune.rewrite.blocks import grid_side, tile_members, tile_rows, tile_scores
from graphprune.rewrite.pass_api import (
    LAST_VISION_LAYER,
    AttentionRows,
    Choose,
    CropTiles,
    Hidden,
    KeepCache,
    Plan,
    Protect,
    TokenPass,
    fill_preset,
)
from graphprune.rewrite.registry import register_pass, register_pipeline
from graphprune.tokenops import true_positions

MODES = ("static", "exact")
MERGE_ORDERS = ("authors", "raster")
PLACEMENTS = ("authors", "before")      # filter layer L: its own attention, L+1.. reduced | L-1's attention, L..
POSITIONS = ("compact", "keep")
KEY_LAYERS = ("feature", "last")          # CLS attention of the layer LLaVA reads | the last one (authors)
FILTER_PRESETS = {192: (0.001, 0.001), 128: (0.0012, 0.001), 64: (0.011, 0.01)}   # keep -> (gamma, alpha)


def _check_mode(name, mode):
    _check_choice(name, "mode", mode, MODES)


def _check_choice(name, option, value, allowed):
    if value not in allowed:
        raise PassConfigError(f"{name}: {option} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _same_count(name, counts):
    if bool((counts != counts.reshape(-1)[0]).any()):
        raise InputError(f"{name}: exact thresholds kept {sorted(set(counts.reshape(-1).tolist()))} tokens in "
                         "different images of the batch; use mode='static' to batch them")
    return int(counts.reshape(-1)[0])


def merge_windows(*, k, protected, valid, vision_pos, hidden, window, tau, mode, order, tiles=None):
    b, n, v = vision_pos.shape
    d = hidden.shape[-1]
    if tiles is None:               # one square patch grid: its tiles, the same for every image
        members, real = tile_members(grid_side(v), window, hidden.device)             # (tiles, w*w)
        members, real = members.expand(b, n, *members.shape), real.expand(b, n, *real.shape)
    else:                           # an anyres image's crops: each image's own tiles, tokens first then -1
        members, real = tiles.clamp(min=0), tiles >= 0
    score = tile_scores(hidden, members, real)                                    # (B, n, tiles)
    by_score = score.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(by_score).scatter(-1, by_score, torch.arange(by_score.shape[-1], device=score.device)
                                              .expand_as(by_score))               # each tile's place by score
    merge = score >= tau
    size = real.sum(-1)                                                           # (B, n, tiles); 0: no token
    if mode == "static":
        # below tau too, most similar first, until at most `k` (the capacity) tokens survive; requires()
        # checked that merging every tile reaches it
        shrink = (size - 1).clamp(min=0).gather(-1, by_score).cumsum(-1)
        needed = ((v - shrink) > k).sum(-1, keepdim=True) + int(v > k)
        merge = merge | (rank < needed) & (score > float("-inf"))
    # a tile's representative: its first member in raster order, or (the authors') its last
    rep_slot = torch.zeros_like(size) if order == "raster" else (size - 1).clamp(min=0)
    rep = members.gather(-1, rep_slot[..., None])[..., 0]
    rep = torch.where(size > 0, rep, v)              # a tile without tokens writes to a spare slot, dropped
    others = real & (torch.arange(members.shape[-1], device=real.device) != rep_slot[..., None])
    gone = torch.zeros(b, n, v, dtype=torch.long, device=hidden.device).scatter_add(
        -1, members.flatten(-2), (merge[..., None] & others).flatten(-2).long()) > 0
    survive = ~gone
    means = (tile_rows(hidden, members) * real[..., None]).sum(-2) / size.clamp(min=1)[..., None]
    spare = torch.cat([hidden, hidden[..., :1, :]], -2)
    own = spare.gather(-2, rep[..., None].expand(*rep.shape, d))
    values = spare.scatter(-2, rep[..., None].expand(*rep.shape, d), torch.where(merge[..., None], means, own))[..., :v, :]
    count = survive.sum(-1)
    if mode == "exact":
        count = _same_count("mustdrop_merge", count)
    # emitted order: raster slot order, or (the authors') merged tokens by descending window
    # similarity, then the unmerged ones in raster order; static fillers (merged-away slots) last
    slot = torch.arange(v, device=hidden.device).expand(b, n, v)
    key = torch.where(survive, slot, slot + 2 * v)
    if order == "authors":
        merged_rep = torch.zeros(b, n, v + 1, dtype=torch.long, device=hidden.device).scatter(
            -1, rep, torch.where(merge, rank - v, 0))[..., :v]
        key = torch.where(survive & (merged_rep < 0), merged_rep, key)
    emitted = key.argsort(dim=-1, stable=True)
    picked = emitted[..., :count if mode == "exact" else k]
    if order == "raster":
        picked = picked.sort(-1).values
    out = {"picked": picked, "values": values.gather(2, picked[..., None].expand(*picked.shape, d))}
    if mode == "static":
        out["valid"] = survive.gather(-1, picked)
    if protected is not None:       # a key token merged away hands its protection to its tile's merged token
        held = (tile_rows(protected[..., None], members)[..., 0] & real).any(-1)
        spare_prot = torch.cat([protected, protected[..., :1]], -1)
        at_rep = spare_prot.scatter(-1, rep, torch.where(merge, held, spare_prot.gather(-1, rep)))[..., :v]
        out["protected"] = (at_rep & survive).gather(-1, picked)
    return out


@register_pass
class MustDropMerge(TokenPass):
    name = "mustdrop_merge"
    stage = "vision"

    @dataclass
    class Config:
        layer: int | None = 1           # the encoder layer that first sees the merged tokens; None: merged at
        #                                 the features (the feature layer's states; anyres images: or in place)
        window: int = 3
        tau: float = 0.8
        mode: str = "static"
        capacity: int | None = None     # static mode: patch slots kept per image (default: all, masked)
        order: str = "authors"          # "authors": merged token at the window's last member, merged tokens
        #                                 first (descending similarity); "raster": first member, raster order
        positions: str = "compact"      # "compact" (the authors'): renumbered; "keep": each kept token keeps its
        #                                 position ids (order="raster"; Qwen's M-RoPE takes this only)

    whole_groups = True                 # on Qwen a token is a 2x2 merge group: a tile merges whole groups

    def validate(self):
        super().validate()
        c = self.config
        _check_mode(self.name, c.mode)
        _check_choice(self.name, "order", c.order, MERGE_ORDERS)
        _check_choice(self.name, "positions", c.positions, POSITIONS)
        if c.positions == "keep" and c.order == "authors":
            raise PassConfigError("mustdrop_merge: order='authors' moves the merged tokens first, but positions='keep' "
                                  "leaves every kept token at its own slot; give order='raster' (a merged token at "
                                  "its tile's first member)")
        if c.window < 2:
            raise PassConfigError(f"mustdrop_merge: window={c.window}: a window needs at least 2x2 patches")
        if not -1.0 <= c.tau <= 1.0:       # a mean cosine similarity: tau > 1 would never merge a tile
            raise PassConfigError(f"mustdrop_merge: tau={c.tau} must lie in [-1, 1] (tiles merge when the mean "
                                  "cosine similarity of their tokens reaches tau)")
        if c.capacity is not None and (isinstance(c.capacity, bool) or not isinstance(c.capacity, int) or c.capacity < 1):
            raise PassConfigError(f"mustdrop_merge: capacity must be a positive int, got {c.capacity!r}")
        if c.capacity is not None and c.mode == "exact":
            raise PassConfigError("mustdrop_merge: capacity applies to mode='static' only")

    def requires(self, anatomy):
        g, c = anatomy.grid, self.config
        if anatomy.token_patches is not None:
            return _require_crop_grids(c, anatomy)
        if g is None:
            return
        if c.window > min(g):
            raise PassConfigError(f"mustdrop_merge: window={c.window} is larger than the {g[0]}x{g[1]} patch grid")
        tiles = math.ceil(g[0] / c.window) * math.ceil(g[1] / c.window)
        if anatomy.patches_per_token > 1 and c.capacity is not None:
            # Qwen: each image or frame is its own grid, captured per grid; one slot count cannot suit them all
            raise PassConfigError(f"mustdrop_merge: capacity={c.capacity} on {anatomy.model_class}, whose images and "
                                  "video frames come in grids of many sizes: static mode keeps every token's slot "
                                  "there (capacity=None), merged-away slots masked")
        if c.capacity is not None and not tiles <= c.capacity <= g[0] * g[1]:
            raise PassConfigError(f"mustdrop_merge: capacity={c.capacity} must lie in {tiles}..{g[0] * g[1]} "
                                  f"(merging all {tiles} tiles of the {g[0]}x{g[1]} grid leaves {tiles} tokens)")

    def plan(self) -> Plan:
        c = self.config
        capacity = None if c.mode == "exact" else (1.0 if c.capacity is None else c.capacity)
        # tiles: an anyres image's crop tiles, or on Qwen its grid of 2x2 groups (None on one patch grid)
        signals = {"hidden": Hidden(-1 if c.layer is None else c.layer - 1), "tiles": CropTiles(c.window)}
        return Plan(layer=c.layer, signals=signals, positions=c.positions,
                    select=Choose(capacity, merge_windows, (("window", c.window), ("tau", c.tau), ("mode", c.mode),
                                                            ("order", c.order)),
                                  static_mask=c.mode == "static", ordered=c.order == "authors", merges=True))


def _require_crop_grids(c, anatomy):
    """mustdrop_merge on anyres images (several crops, each its own encoder sequence): at the features, or in
    place inside the encoder (every slot kept, merged-away ones masked crop by crop)."""
    if anatomy.patches_per_token > 1:
        raise PassNotApplicable(f"mustdrop_merge: {anatomy.model_class}'s tokens here are pooled from "
                                f"{anatomy.patches_per_token} encoder patches each (a video frame's or, on Gemma 3, an "
                                "image's patch block), no cells of a crop grid to tile; prune them with vision_topk, "
                                "random(stage='vision') or an LLM-stage pass")
    inside = c.layer is not None and c.layer < anatomy.num_layers
    if inside and (c.positions != "keep" or c.mode != "static"):
        raise PassNotApplicable(
            f"mustdrop_merge: layer={c.layer} merges inside the vision encoder, where an anyres image of "
            f"{anatomy.model_class} is {anatomy.crops} crops, each run as its own encoder sequence, and its tokens "
            "exist only after the packing gather that follows the encoder, so a merge there keeps every slot in "
            f"place and masks the merged-away ones (got positions={c.positions!r}, mode={c.mode!r}): give "
            "positions='keep', order='raster', mode='static' (mustdrop(merge_positions='keep')), or layer=None "
            "(mustdrop(merge_layer=None)): each crop's windows then merge at the features, on the feature layer's "
            "states, not after encoder layer 0 as in the paper")
    if c.capacity is not None:
        raise PassConfigError(f"mustdrop_merge: capacity={c.capacity} on {anatomy.model_class}'s anyres images: "
                              "static mode keeps every token's slot there (capacity=None), merged-away slots masked")


@register_pass
class MustDropKeys(TokenPass):
    name = "mustdrop_keys"
    stage = "vision"

    @dataclass
    class Config:
        ratio: float = 0.08             # share of the patches kept as the key set
        key_layer: str = "feature"      # CLS attention of "feature": the layer LLaVA reads; "last": the
                                        # encoder's last layer, as the authors' code (captured on request)

    def validate(self):
        super().validate()
        if not 0.0 < self.config.ratio <= 1.0:
            raise PassConfigError(f"mustdrop_keys: ratio must lie in (0, 1], got {self.config.ratio!r}")
        _check_choice(self.name, "key_layer", self.config.key_layer, KEY_LAYERS)

    def requires(self, anatomy):
        if not anatomy.has_cls:
            raise PassNotApplicable(f"mustdrop_keys needs the CLS token of the vision encoder; {anatomy.model_class} "
                                    "has none: use mustdrop(keys=False) (merge, filters and cache; on M-RoPE models "
                                    "such as Qwen2.5-VL / Qwen3-VL with positions='keep', merge_positions='keep') or "
                                    "mustdrop_filter alone")
        if not anatomy.num_layers:          # a model-level check before any encoder is captured (bucketed families)
            return
        changed = anatomy.tokens[-1].layer if len(anatomy.tokens) > 1 else 0
        last = anatomy.num_layers - 1 + (len(anatomy.post_layers) if self.config.key_layer == "last" else 0)
        if changed > last:
            raise PassConfigError(f"mustdrop_keys: the key set reads the CLS attention of vision layer "
                                  f"{last}, but the tokens changed after it (at layer {changed}, mustdrop_merge): "
                                  f"this {anatomy.num_layers}-layer feature encoder is too shallow for both; use "
                                  "mustdrop(merge=False) or mustdrop(keys=False), or mustdrop_merge(layer=...) earlier")

    def plan(self) -> Plan:
        layer = LAST_VISION_LAYER if self.config.key_layer == "last" else -1
        return Plan(signals={"cls": AttentionRows(layer, "cls")}, select=Protect(float(self.config.ratio)),
                    positions="compact")


def filter_tokens(*, k, protected, valid, vision_pos, attn, gamma, alpha, mode):
    col_sum, col_max = attn.sum(1), attn.amax(1)                                   # (B, n, V)
    total = col_sum.sum(-1, keepdim=True)
    keep = (col_sum >= gamma * total) | (col_max >= alpha)
    if protected is not None:
        keep = keep | protected
    if mode == "exact":
        return true_positions(keep, _same_count("mustdrop_filter", keep.sum(-1)))
    c = k
    tier = keep.long() + (protected.long() if protected is not None else 0)      # 2 protected, 1 rule, 0 rest
    by_sum = col_sum.argsort(dim=-1, descending=True, stable=True)
    by_tier = tier.gather(-1, by_sum).argsort(dim=-1, descending=True, stable=True)
    picked = by_sum.gather(-1, by_tier)[..., :c].sort(-1).values
    return {"picked": picked, "valid": keep.gather(-1, picked)}


@register_pass
class MustDropFilter(TokenPass):
    name = "mustdrop_filter"

    @dataclass
    class Config:
        layers: tuple = (2, 6, 10, 14)
        keep: int | None = None         # budget preset (192, 128, 64): gamma/alpha and the static capacity
        gamma: float | None = None
        alpha: float | None = None
        mode: str = "static"
        capacity: int | None = None     # static mode: vision slots per image (default: keep)
        placement: str = "authors"      # "authors": layer L filters with its own attention, L+1.. run reduced;
        #                                 "before": layer L-1's attention, L.. run reduced (one layer earlier)
        positions: str = "compact"      # "compact" (the authors': renumbered after each filter) or "keep"

    def validate(self):
        c = self.config
        _check_mode(self.name, c.mode)
        _check_choice(self.name, "placement", c.placement, PLACEMENTS)
        _check_choice(self.name, "positions", c.positions, POSITIONS)
        if isinstance(c.layers, int):
            c.layers = (c.layers,)
        c.layers = tuple(c.layers)
        lowest = 0 if c.placement == "authors" else 1
        if not c.layers or list(c.layers) != sorted(set(c.layers)) or any(l < lowest for l in c.layers):
            raise PassConfigError(f"mustdrop_filter: layers must be increasing layer indices >= {lowest} "
                                  f"(placement={c.placement!r}), got {c.layers!r}")
        if c.keep is not None:
            from graphprune.rewrite.pass_api import check_budget
            check_budget(self.name, c.keep)
        fill_preset(self.name, c, FILTER_PRESETS, ("gamma", "alpha"))
        if c.gamma < 0 or c.alpha < 0:
            raise PassConfigError(f"mustdrop_filter: thresholds must be >= 0 (gamma={c.gamma}, alpha={c.alpha})")
        if c.mode == "static":
            cap = c.capacity if c.capacity is not None else c.keep
            if cap is None or isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
                raise PassConfigError("mustdrop_filter: static mode needs capacity (or keep) as a positive int, "
                                      f"got {cap!r}")
            c.capacity = cap

    def requires(self, anatomy):
        c, n = self.config, anatomy.num_layers
        last = first_reduced(c.layers, c.placement)[-1]
        if last >= n:
            fit = tuple(l for l in c.layers if first_reduced([l], c.placement)[0] < n)
            raise PassConfigError(f"mustdrop_filter: layers={c.layers!r} (placement={c.placement!r}) need a language "
                                  f"model of more than {last} layers; this one has {n}: set layers= within it, e.g. "
                                  f"layers={fit or (max(n - 2, 0),)!r}")

    def plan(self) -> list[Plan]:
        c = self.config
        options = (("gamma", c.gamma), ("alpha", c.alpha), ("mode", c.mode))
        capacity = c.capacity if c.mode == "static" else None
        return [Plan(layer=reduced, signals={"attn": AttentionRows(reduced - 1, query="text")}, positions=c.positions,
                     select=Choose(capacity, filter_tokens, options, static_mask=c.mode == "static"))
                for reduced in first_reduced(c.layers, c.placement)]


def first_reduced(layers, placement):
    """The first layer that runs on each filter's output."""
    return [l + 1 if placement == "authors" else l for l in layers]


@register_pass
class MustDropCache(TokenPass):
    name = "mustdrop_cache"

    @dataclass
    class Config:
        layers: tuple = (2, 6, 10, 14)  # the filter layers: caches from the first to the last are cut
        placement: str = "authors"      # as mustdrop_filter's: caches of layers first..last (authors) or
        #                                 first..last-1 ("before") keep only the final tokens

    def validate(self):
        _check_choice(self.name, "placement", self.config.placement, PLACEMENTS)
        if isinstance(self.config.layers, int) or len(self.config.layers) < 2:
            raise PassConfigError("mustdrop_cache: layers needs the first and last filter layer, e.g. (2, 14)")
        self.config.layers = tuple(self.config.layers)

    def plan(self) -> Plan:
        reduced = first_reduced(sorted(self.config.layers), self.config.placement)
        first = sorted(self.config.layers)[0]
        return Plan(layer=reduced[-1], select=KeepCache(first, reduced[-1]))


@register_pipeline("mustdrop")
def mustdrop(keep: int = 64, *, mode: str = "static", layers=(2, 6, 10, 14), window: int = 3, tau: float = 0.8,
             ratio: float = 0.08, gamma: float | None = None, alpha: float | None = None,
             merge_capacity: int | None = None, capacity: int | None = None, cache: bool = True,
             merge: bool = True, keys: bool = True, order: str | None = None, placement: str = "authors",
             positions: str = "compact", key_layer: str = "feature", merge_layer: int | None = 1,
             merge_positions: str = "compact"):
    """The whole MustDrop pipeline: merge -> key set -> dual-attention filters -> output-aware cache.

    merge_layer=None (anyres images: LLaVA-NeXT, LLaVA-OneVision) merges at the features, after the key set
    has been read off the unmerged tokens: key set -> merge -> filters -> cache (see mustdrop_merge); there
    merge_positions='keep' merges inside the encoder in place instead (merged-away patches masked per crop).
    positions numbers the tokens the filters keep, merge_positions those the merge keeps; order (the merge's)
    defaults to the authors' with merge_positions='compact' and to "raster" with 'keep'. Qwen2-VL / Qwen2.5-VL /
    Qwen3-VL (no CLS, M-RoPE): mustdrop(keys=False, positions='keep', merge_positions='keep'): merge inside the
    encoder on 2x2 groups, filters and cache."""
    order = order if order is not None else "raster" if merge_positions == "keep" else "authors"
    merging = [MustDropMerge(layer=merge_layer, window=window, tau=tau, mode=mode, capacity=merge_capacity,
                             order=order, positions=merge_positions)] if merge else []
    keying = [MustDropKeys(ratio=ratio, key_layer=key_layer)] if keys else []
    passes = keying + merging if merge_layer is None else merging + keying
    passes.append(MustDropFilter(layers=tuple(layers), keep=keep, gamma=gamma, alpha=alpha, mode=mode,
                                 capacity=capacity, placement=placement, positions=positions))
    if cache and len(layers) > 1:
        passes.append(MustDropCache(layers=tuple(layers), placement=placement))
    return passes
