"""SparseVLM: "Visual Token Sparsification for Efficient Vision-Language Model Inference" (Zhang et
al., 2024), version 1 (arXiv v1 / the authors' first release: rank-adaptive counts, compact positions).

Method, per image, at each sparsification layer L (the authors' 2, 6, 15, 19 of 32):
  raters     once, from the language model's input embeddings: m_t = mean over the image's vision
             tokens v of softmax_t(v . t) over the instruction tokens t; the raters are the
             instruction tokens with m_t above the mean of m;
  scores     the raters' rows of layer L's attention (head-averaged softmax) over the current vision
             tokens, averaged over the raters: relation (V,);
  count      r = rank of the (raters x V) attention matrix; when r < V the top
             min(floor(r x scale + bias), V - 1) tokens by relation stay (adaptive deletion), else all;
  recycling  of the deleted tokens, the top int(0.3 x deleted) + 1 by relation are clustered
             (density-peaks clustering on layer L's output, int(that / 10) + 1 clusters) and each
             cluster becomes one token, the mean of its members;
  sequence   layers L+1.. see [kept tokens in prompt order, recycled tokens in cluster order] in place
             of the image, positions renumbered 0..n-1 (positions="compact"), and in decoding each
             layer's new token takes the position = that layer's cache length, as the authors do.
(scale, bias) are the authors' per budget: 192 -> (13.5, 0), 128 -> (9, 6), 64 -> (0.8, 0).

Static capacity: counts are data dependent, so the graph keeps `capacity` slots per image (default
keep) and masks the unused ones; the kept and recycled tokens fill the first slots in the authors'
order. When the authors' count does not fit, the fewest kept tokens are dropped (and recycled) so
that kept + clusters = capacity; a capacity of every vision token reproduces the authors' counts.
For models with fewer layers set `layers` (e.g. (0, 1, 2) for a 4-layer model). positions="keep"
with recycle=False (graphprune's option, for M-RoPE models such as Qwen2.5-VL, where compact
numbering is not defined): the kept tokens stay in their own slots with their own position ids.
Departures from the authors' code (no random tie-break noise, raters when all instruction tokens
tie): docs/methods.md.
"""
import math
from dataclasses import dataclass

import torch

from graphprune.errors import InputError, PassConfigError
from graphprune.rewrite.pass_api import (
    AttentionRows,
    Choose,
    Hidden,
    InputEmbeds,
    Plan,
    TextMask,
    TokenPass,
    fill_preset,
    layer_tuple,
)
from graphprune.rewrite.registry import register_pass
from graphprune.tokenops import true_positions

PRESETS = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}     # keep -> (scale, bias), the authors' scripts
RECYCLE_SHARE = 0.3        # share of the deleted tokens recycled (the most relevant ones)
CLUSTER_DIVISOR = 10       # recycled tokens per cluster


def recycled_count(deleted):
    """Tokens recycled out of `deleted` (a tensor of counts): int(0.3 x deleted) + 1, none when none."""
    return torch.where(deleted > 0, torch.floor(deleted.double() * RECYCLE_SHARE).long() + 1, 0)


def cluster_count(deleted):
    """Clusters the recycled tokens of `deleted` form: int(recycled / 10) + 1, none when none."""
    m = recycled_count(deleted)
    return torch.where(m > 0, m // CLUSTER_DIVISOR + 1, 0)


def no_clusters(deleted):
    return torch.zeros_like(deleted)


def text_raters(vis_emb, text_emb, text_mask):
    """(B, n, T) bool: the instruction tokens each image's vision tokens (B, n, V, D) favour: mean over
    vision tokens of the softmax over the instruction (B, T, D) of their dot products, above its mean.
    When every instruction token ties (one token), all of them rate."""
    real = text_mask[:, None, None, :]
    logits = (vis_emb.float() @ text_emb.float().transpose(-1, -2)[:, None]).masked_fill(~real, float("-inf"))
    m = logits.softmax(-1).mean(-2)                                               # (B, n, T)
    mask = text_mask[:, None, :].expand_as(m)
    mean = (m * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    raters = (m > mean) & mask
    return torch.where(raters.any(-1, keepdim=True), raters, mask)


def density_peak_merge(x, member, clusters):
    """Cluster each image's members of x (B, n, M, D) into `clusters` (B, n) tokens, the authors'
    density-peaks clustering: distance d_ij = |x_i - x_j| / sqrt(D); density = exp(-mean of the squared
    distances to the `clusters` nearest members); a member's parent distance = its distance to the
    nearest denser member (or the largest distance); centres = the top `clusters` by density x parent
    distance; every member joins its nearest centre; a cluster's token = sum of members / (count + 1e-6).
    Returns (B, n, K, D) cluster tokens in centre order (K = the largest count)."""
    b, n, m, d = x.shape
    big = torch.finfo(torch.float32).max
    x = x.float()
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(d)
    pair = member[..., :, None] & member[..., None, :]
    nearest = dist.masked_fill(~pair, big).sort(-1).values                       # ascending per row
    kmax = max(1, int(clusters.max()))
    first = torch.arange(min(kmax, m), device=x.device) < clusters[..., None, None]
    density = torch.exp(-(nearest[..., :kmax].square() * first).sum(-1) / clusters[..., None].clamp(min=1))
    dist_max = dist.masked_fill(~pair, -big).flatten(-2).amax(-1)[..., None, None]
    denser = (density[..., None, :] > density[..., :, None]) & pair
    parent = torch.where(denser, dist, dist_max).amin(-1)
    score = (parent * density).masked_fill(~member, float("-inf"))
    centres = score.argsort(dim=-1, descending=True, stable=True)[..., :kmax]          # (B, n, K)
    is_centre = torch.arange(kmax, device=x.device) < clusters[..., None]
    to_centre = dist.gather(-2, centres[..., None].expand(b, n, kmax, m)).masked_fill(~is_centre[..., None], big)
    assign = to_centre.argmin(-2)                                                   # (B, n, M)
    own = torch.zeros(b, n, m, dtype=torch.long, device=x.device).scatter(-1, centres, torch.arange(
        kmax, device=x.device).expand(b, n, kmax))
    centre_slot = torch.zeros(b, n, m, dtype=torch.bool, device=x.device).scatter(-1, centres, is_centre)
    assign = torch.where(centre_slot, own, assign)
    onehot = torch.nn.functional.one_hot(assign, kmax).to(x.dtype) * member[..., None]
    weight = 1.0 / (onehot.sum(-2) + 1e-6)                                         # (B, n, K)
    return (onehot * weight[..., None, :]).transpose(-1, -2) @ x


def sparsify(*, k, protected, valid, vision_pos, attn, hidden, vis_emb, text_emb, text_mask, scale, bias, recycle,
             in_place=False):
    """One SparseVLM layer on each image: picked = the first k slots, which hold the kept tokens (prompt
    order) then the recycled ones; values = their hidden states; valid = the slots in use. in_place
    (positions='keep', no recycling): picked = the kept tokens' own slots and the lowest others up to k
    (unused), ascending, so each kept token keeps its place and position."""
    if protected is not None and bool(protected.any()):
        raise InputError("sparsevlm: an earlier pass protected vision tokens (a key set); SparseVLM reorders "
                         "its tokens and cannot carry protection: run it without mustdrop_keys")
    b, n, v, dim = hidden.shape
    current = torch.ones(b, n, v, dtype=torch.bool, device=hidden.device) if valid is None else valid
    raters = text_raters(vis_emb, text_emb, text_mask)                           # (B, n, T)
    rows = attn.permute(0, 2, 1, 3).float() * raters[..., None]                  # (B, n, T, V)
    relation = rows.sum(-2) / raters.sum(-1, keepdim=True)
    n_cur = current.sum(-1)
    sv = torch.linalg.svdvals(rows)                                               # matrix_rank's default tolerance
    eps = torch.finfo(torch.float32).eps
    tol = sv[..., :1] * torch.maximum(raters.sum(-1), n_cur)[..., None] * eps
    rank = (sv > tol).sum(-1)
    count = torch.floor(rank.double() * scale + bias).clamp(min=0).long()
    count = torch.where(rank == n_cur, n_cur, torch.minimum(count, n_cur - 1))
    clusters = cluster_count if recycle else no_clusters
    cand = torch.arange(v + 1, device=hidden.device)
    fits = (cand <= count[..., None]) & (cand + clusters(n_cur[..., None] - cand) <= k) & (cand <= n_cur[..., None])
    kept_n = torch.where(fits, cand, -1).amax(-1).clamp(min=0)
    n_clusters = torch.minimum(clusters(n_cur - kept_n), k - kept_n)
    order = relation.masked_fill(~current, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    place = torch.empty_like(order).scatter(-1, order, torch.arange(v, device=order.device).expand_as(order))
    kept = (place < kept_n[..., None]) & current
    kept_slots = true_positions(kept, k)                                          # kept first, ascending
    if in_place:
        picked, order = kept_slots.sort(-1)
        return {"picked": picked, "valid": (torch.arange(k, device=hidden.device) < kept_n[..., None]).gather(-1, order)}
    values = hidden.gather(2, kept_slots[..., None].expand(b, n, k, dim))
    if recycle:
        width = min(v, int(v * RECYCLE_SHARE) + 1)
        window = (kept_n[..., None] + torch.arange(width, device=hidden.device)).clamp(max=v - 1)
        member = torch.arange(width, device=hidden.device) < recycled_count(n_cur - kept_n)[..., None]
        cand_slots = order.gather(-1, window)
        merged = density_peak_merge(hidden.gather(2, cand_slots[..., None].expand(b, n, width, dim)), member,
                                    n_clusters).to(hidden.dtype)
        slot = torch.arange(k, device=hidden.device).expand(b, n, k)
        j = (slot - kept_n[..., None]).clamp(0, merged.shape[2] - 1)
        is_merged = (slot >= kept_n[..., None]) & (slot < (kept_n + n_clusters)[..., None])
        values = torch.where(is_merged[..., None], merged.gather(2, j[..., None].expand(b, n, k, dim)), values)
    picked = torch.arange(k, device=hidden.device).expand(b, n, k)
    return {"picked": picked, "values": values,
            "valid": torch.arange(k, device=hidden.device) < (kept_n + n_clusters)[..., None]}


@register_pass
class SparseVLM(TokenPass):
    name = "sparsevlm"

    @dataclass
    class Config:
        keep: int = 192                 # budget preset: (scale, bias) and the default capacity
        layers: tuple = (2, 6, 15, 19)  # sparsification layers (each uses its own attention; the next runs reduced)
        scale: float | None = None      # kept = floor(rank x scale + bias); default: the preset of keep
        bias: float | None = None
        capacity: int | None = None     # vision slots per image (static capacity); default: keep
        recycle: bool = True            # recycle deleted tokens into clusters (the authors' token recycling)
        positions: str = "compact"     # or "keep" (with recycle=False): kept tokens keep their own positions

    def validate(self):
        super().validate()
        c = self.config
        c.layers = layer_tuple(self.name, c.layers)
        if isinstance(c.keep, float):
            raise PassConfigError(f"sparsevlm: keep must be an int (tokens per image), got {c.keep!r}")
        fill_preset(self.name, c, PRESETS, ("scale", "bias"))
        if c.scale <= 0 or c.bias < 0:
            raise PassConfigError(f"sparsevlm: scale must be > 0 and bias >= 0 (scale={c.scale}, bias={c.bias})")
        cap = c.keep if c.capacity is None else c.capacity
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise PassConfigError(f"sparsevlm: capacity must be a positive int (vision slots per image), got {cap!r}")
        c.capacity = cap
        if c.positions not in ("compact", "keep"):
            raise PassConfigError(f"sparsevlm: positions must be 'compact' (the authors' v1 numbering) or 'keep', "
                                  f"got {c.positions!r}")
        if c.positions == "keep" and c.recycle:
            raise PassConfigError("sparsevlm: positions='keep' needs recycle=False: recycled tokens (cluster means) "
                                  "have no position of their own to keep")

    def requires(self, anatomy):
        n = anatomy.num_layers
        if n and self.config.layers[-1] + 1 >= n:
            raise PassConfigError(f"sparsevlm: layers={self.config.layers!r} do not fit a {n}-layer language model "
                                  f"(layer L sparsifies, L+1 runs reduced); use layers in 0..{n - 2}, e.g. "
                                  f"layers={tuple(range(min(n - 1, 3)))}")

    def plan(self) -> list[Plan]:
        c = self.config
        in_place = c.positions == "keep"
        options = (("scale", c.scale), ("bias", c.bias), ("recycle", c.recycle), ("in_place", in_place))
        signals = {"vis_emb": InputEmbeds("vision"), "text_emb": InputEmbeds("text"), "text_mask": TextMask()}
        select = Choose(c.capacity, sparsify, options, static_mask=True, merges=not in_place)
        return [Plan(layer=l + 1, positions=c.positions, select=select,
                     signals={"attn": AttentionRows(l, query="text"), "hidden": Hidden(l), **signals})
                for l in c.layers]
