"""Building blocks shared by passes: similarity on the patch grid, windows, clustering merges, greedy
diversity (farthest-point) and DPP selection.

Plain batched torch functions over per-image token sets (B, images, V, ...) with static
shapes, so any pass can call them from the function it records into the graph. Semantics
are those of docs/methods.md.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from graphprune.errors import InputError, PassNotApplicable


def grid_side(v: int) -> int:
    """Side of the square patch grid holding v tokens."""
    g = math.isqrt(v)
    if g * g != v:
        raise InputError(f"{v} vision tokens per image do not form a square patch grid; grid-based methods "
                         "need the full grid (run them before any pass that drops tokens)")
    return g


def require_one_grid(name: str, anatomy) -> None:
    """Refuse a grid-based vision-stage pass where a unit's tokens are gathered from several encoder sequences
    (anatomy.token_patches: LLaVA-NeXT / OneVision anyres crops, OneVision's pooled video frames)."""
    if anatomy.token_patches is not None:
        raise PassNotApplicable(f"{name}: {anatomy.model_class}'s vision units here are gathered from {anatomy.crops} "
                                "encoder sequence(s) (an anyres image's base view then its crops' unpadded rows, "
                                "2 x 2 pooled video frames, or a whole Qwen video's frames), not one patch grid "
                                f"{name} could lay its tokens on (on a video: video_unit='frame'); use "
                                "vision_topk, cls_topk, random(stage='vision'), visionzip, visiontrim_vision (its LTAM "
                                "runs per crop grid; CLS towers) or mustdrop_merge(layer=None) (per crop grid)")


def cosine_matrix(x, y=None):
    """(..., N, M) cosine similarities between the rows of x (..., N, D) and y (..., M, D)."""
    x = F.normalize(x.float(), dim=-1)
    y = x if y is None else F.normalize(y.float(), dim=-1)
    return x @ y.transpose(-1, -2)


def tile_members(g: int, window: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles of a g x g raster grid in window x window blocks (the last ones may be smaller).

    Returns (members (tiles, window^2) token indices in raster order, padded with 0; mask of real members).
    """
    tiles = []
    for r0 in range(0, g, window):
        for c0 in range(0, g, window):
            tiles.append([r * g + c for r in range(r0, min(r0 + window, g)) for c in range(c0, min(c0 + window, g))])
    width = window * window
    members = torch.tensor([t + [0] * (width - len(t)) for t in tiles], device=device)
    mask = torch.tensor([[True] * len(t) + [False] * (width - len(t)) for t in tiles], device=device)
    return members, mask


def grid_tile_table(rows: int, cols: int, window: int, windows=None) -> tuple[tuple, tuple, int]:
    """Window x window tiles of a rows x cols raster grid of tokens, as a table per token: (tile_of, place_of,
    tiles), each token's tile (tiles in raster order of their top-left token) and its place in it (raster order
    within the tile). windows (rows x cols,): each token's attention window (None: one), rectangles of the grid;
    then tiles never cross a window: each window is tiled on its own from its top-left token (the last tiles of
    a window may be smaller), as each anyres crop is."""
    windows = [0] * (rows * cols) if windows is None else list(windows)
    corner = {}
    for t, w in enumerate(windows):                   # each window's top-left row and column
        r0, c0 = corner.get(w, (rows, cols))
        corner[w] = (min(r0, t // cols), min(c0, t % cols))
    tops, places = [], []
    for t, w in enumerate(windows):
        (r0, c0), dr, dc = corner[w], t // cols - corner[w][0], t % cols - corner[w][1]
        tops.append((r0 + dr // window * window) * cols + c0 + dc // window * window)
        places.append(dr % window * window + dc % window)
    rank = {top: i for i, top in enumerate(sorted(set(tops)))}
    return tuple(rank[top] for top in tops), tuple(places), len(rank)


def tile_scores(x, members, mask):
    """Mean pairwise cosine similarity (ordered pairs, self excluded) of each tile: (..., tiles).

    members, mask: (tiles, w^2) shared by every image, or (..., tiles, w^2) each image's own (crop tiles).
    Tiles of one token get -inf: they never merge.
    """
    t = tile_rows(x, members)                                           # (..., tiles, w, D)
    sim = cosine_matrix(t)                                              # (..., tiles, w, w)
    pair = (mask[..., :, None] & mask[..., None, :]).float()
    pair = pair * (1 - torch.eye(mask.shape[-1], device=pair.device))
    n_pairs = pair.sum((-1, -2))
    score = (sim * pair).sum((-1, -2)) / n_pairs.clamp(min=1)
    return score.masked_fill(n_pairs == 0, float("-inf"))


def tile_rows(x, members):
    """The rows of x (..., V, D) at each tile's members: (..., tiles, w^2, D); members (tiles, w^2) shared, or
    (..., tiles, w^2) per image."""
    if members.dim() == 2:
        return x[..., members.reshape(-1), :].reshape(*x.shape[:-2], *members.shape, x.shape[-1])
    flat = members.flatten(-2)
    rows = x.gather(-2, flat[..., None].expand(*flat.shape, x.shape[-1]))
    return rows.reshape(*members.shape, x.shape[-1])


def grid_neighbours(g: int, window: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's window x window neighbourhood on a g x g grid, itself excluded, as a table:
    (index (V, M), valid (V, M)) with M = window^2 - 1 offsets in raster order, so offset
    M - 1 - m is the reverse of offset m; slots that fall off the grid point at the token itself
    and are not valid."""
    if window % 2 == 0:
        raise InputError(f"window={window}: a centred neighbourhood needs an odd window")
    h = window // 2
    offsets = torch.tensor([(dr, dc) for dr in range(-h, h + 1) for dc in range(-h, h + 1) if dr or dc],
                           device=device)
    tok = torch.arange(g * g, device=device)
    r, c = tok[:, None] // g + offsets[:, 0], tok[:, None] % g + offsets[:, 1]
    valid = (r >= 0) & (r < g) & (c >= 0) & (c < g)
    return torch.where(valid, r * g + c, tok[:, None]), valid


def _masked_std(x, valid):
    # unbiased std of the entries of x (..., V, M) where valid (V, M), per leading index
    n = valid.sum()
    mean = (x * valid).sum((-1, -2), keepdim=True) / n
    var = (((x - mean) * valid) ** 2).sum((-1, -2), keepdim=True) / (n - 1)
    return var.sqrt()


def ltam_scores(feats, window: int = 3, w1: float = 1.0, w2: float = 1.0, w3: float = 1.0):
    """Local Token Affinity Measure (VisionTrim Eq. 4-5) of tokens on a square grid: (..., V).

    kappa_ij = softmax_j(feature kernel) + w3 softmax_j(position kernel) over i's neighbours;
    a token's score is the mean affinity it receives from its neighbours (docs/methods.md).
    Only neighbour pairs are computed (V x (window^2 - 1), not V x V): the kernels never look
    further, and the full distance matrix cost 13% of VisionTrim's pruned LLM prefill in
    `graphprune bench --speed` (576 tokens of width 1024).
    """
    v, g = feats.shape[-2], grid_side(feats.shape[-2])
    index, valid = grid_neighbours(g, window, feats.device)
    m = index.shape[1]
    df = _neighbour_distances(feats.float(), g, window)
    tok = torch.arange(v, device=feats.device)[:, None]
    dp = ((index // g - tok // g).float() ** 2 + (index % g - tok % g).float() ** 2).sqrt()
    kf = -(df / (w1 * _masked_std(df, valid))) ** 2
    kp = -(dp / (w2 * _masked_std(dp, valid))) ** 2
    kappa = (kf.masked_fill(~valid, float("-inf")).softmax(-1)
             + w3 * kp.masked_fill(~valid, float("-inf")).softmax(-1))         # (..., V, M): kappa_i,index[i,k]
    # what j receives: kappa_ij for each neighbour i = index[j, k], stored in row i at the reverse offset
    received = kappa.flatten(-2)[..., index * m + (m - 1 - torch.arange(m, device=feats.device))]
    received = (received * valid).sum(-1)
    return received / valid.sum(-1).clamp(min=1)


def table_ltam_scores(feats, neighbours, window: int = 3, w1: float = 1.0, w2: float = 1.0, w3: float = 1.0):
    """ltam_scores on tokens whose neighbourhoods are given as a table: neighbours (..., V, M) the token at
    each of grid_neighbours' M offsets, -1 where there is none (tokenops.crop_neighbours: an anyres image's
    crops, each its own grid, some patches unpadded away). sigma_f, sigma_p pool every neighbour pair of the
    unit; a token without neighbours scores 0. Distances are computed per offset on gathered rows, so a pair
    gets the same value at both of its ends ((a - b)^2 == (b - a)^2)."""
    f = feats.float()
    valid = neighbours >= 0
    m, v = neighbours.shape[-1], neighbours.shape[-2]
    at = torch.where(valid, neighbours, torch.arange(v, device=f.device)[:, None])
    df = torch.stack([(f.gather(-2, at[..., k, None].expand_as(f)) - f).pow(2).sum(-1).sqrt() for k in range(m)], -1)
    h = window // 2
    step = torch.tensor([math.hypot(dr, dc) for dr in range(-h, h + 1) for dc in range(-h, h + 1) if dr or dc],
                        device=f.device)
    dp = step.expand_as(df)
    kf = -(df / (w1 * _pooled_std(df, valid))) ** 2
    kp = -(dp / (w2 * _pooled_std(dp, valid))) ** 2
    kappa = (kf.masked_fill(~valid, float("-inf")).softmax(-1)
             + w3 * kp.masked_fill(~valid, float("-inf")).softmax(-1))
    # what j receives from neighbour i = at[j, k]: kappa_ij, in row i at the reverse offset M - 1 - k
    reverse = at * m + (m - 1 - torch.arange(m, device=f.device))
    received = kappa.flatten(-2).gather(-1, reverse.flatten(-2)).reshape(kappa.shape)
    received = torch.where(valid, received, 0.0).sum(-1)
    return received / valid.sum(-1).clamp(min=1)


def _pooled_std(x, valid):
    # unbiased std of x (..., V, M) over each unit's valid entries (valid batched like x)
    n = valid.sum((-1, -2), keepdim=True)
    mean = torch.where(valid, x, 0.0).sum((-1, -2), keepdim=True) / n
    return (torch.where(valid, x - mean, 0.0).pow(2).sum((-1, -2), keepdim=True) / (n - 1)).sqrt()


def _neighbour_distances(f, g: int, window: int):
    """Exact Euclidean distance (..., V, M) from each token to its grid_neighbours (0 where the
    neighbour falls off the grid). Each pair is computed once, on shifted views of the grid (no
    gathers), and written to both ends: offset M-1-m is the reverse of offset m. (The matmul
    shortcut |a|^2 + |b|^2 - 2ab loses digits that rankings depend on.)"""
    h = window // 2
    grid = f.reshape(*f.shape[:-2], g, g, f.shape[-1])
    offsets = [(dr, dc) for dr in range(-h, h + 1) for dc in range(-h, h + 1) if dr or dc]
    m = len(offsets)
    out = f.new_zeros(*f.shape[:-2], g, g, m)
    for k in range(m // 2, m):                         # forward offsets: dr > 0, or dr == 0 and dc > 0
        dr, dc = offsets[k]
        c0, c1 = max(0, -dc), g - max(0, dc)
        d = (grid[..., : g - dr, c0:c1, :] - grid[..., dr:, c0 + dc:c1 + dc, :]).pow(2).sum(-1).sqrt()
        out[..., : g - dr, c0:c1, k] = d                     # token (r, c) to (r + dr, c + dc)
        out[..., dr:, c0 + dc:c1 + dc, m - 1 - k] = d        # and back
    return out.flatten(-3, -2)


def variance_weighting(s_global, s_local):
    """S = a S_g + (1 - a) S_l with a = var(S_l) / (var(S_g) + var(S_l)) per image (VisionTrim Eq. 6)."""
    vg = s_global.float().var(-1, keepdim=True)
    vl = s_local.float().var(-1, keepdim=True)
    a = vl / (vg + vl)
    return a * s_global.float() + (1 - a) * s_local.float()


def topk_ascending(scores, k: int):
    """Indices of the k highest scores along the last dim, in ascending index order."""
    return scores.float().topk(k, dim=-1).indices.sort(-1).values


def tgvc(tokens, text, text_mask, r: int, iterations: int = 1):
    """Text-guided vision complement (VisionTrim Eq. 7-11) of each image's remaining tokens.

    tokens (..., N, d); text (..., T, d) with text_mask (..., T). Returns (centres (..., R) ascending
    local indices, complement (..., R, d)): c_j = c0_j + sum_i w_ij v_i over the tokens whose best
    centre is j, w_ij = a_ij normalised in the cluster.
    """
    d = tokens.shape[-1]
    v, t = tokens.float(), text.float()
    valid = text_mask.bool()[..., :, None]
    logits = (t @ v.transpose(-1, -2)) / math.sqrt(d)                          # (..., T, N)
    s = (logits.softmax(-1) * valid).sum(-2) / valid.sum(-2).clamp(min=1)    # mean over real text rows
    centres = topk_ascending(s, r)
    c0 = v.gather(-2, centres[..., None].expand(*centres.shape, d))
    is_centre = torch.zeros(v.shape[:-1], dtype=torch.bool, device=v.device).scatter(-1, centres, True)
    neg = float("-inf")
    v2t = ((v @ t.transpose(-1, -2)) / math.sqrt(d)).masked_fill(~valid.transpose(-1, -2), neg).softmax(-1)
    c = c0
    for _ in range(iterations):
        t2c = ((c @ t.transpose(-1, -2)) / math.sqrt(d)).masked_fill(~valid.transpose(-1, -2), neg).softmax(-1)
        a = v2t @ t2c.transpose(-1, -2)                                          # (..., N, R)
        best = a.argmax(-1)                                                      # first (lowest-slot) centre on ties
        member = F.one_hot(best, r).bool() & ~is_centre[..., None]
        w = a * member
        w = w / w.sum(-2, keepdim=True).clamp(min=torch.finfo(w.dtype).tiny)
        c = c0 + w.transpose(-1, -2) @ v
    return centres, c


def farthest_point_select(dist, k: int, protected=None, valid=None):
    """Greedy max-min diversity (farthest-point) selection of k tokens: (..., V) bool.

    dist (..., V, V) pairwise distances. The first pick is the token whose nearest other token is
    farthest (the second-smallest entry of its column: the smallest is its distance to itself),
    unless protected tokens start the set; each next pick maximises the distance to its nearest
    chosen token (first index on ties). Invalid tokens are never picked.
    """
    dist = dist.float()
    v = dist.shape[-1]
    blocked = torch.zeros(dist.shape[:-1], dtype=torch.bool, device=dist.device) if valid is None else ~valid.bool()
    chosen = torch.zeros_like(blocked) if protected is None else protected.bool() & ~blocked
    if protected is not None and bool((chosen.sum(-1) > k).any()):     # (no data-dependent check otherwise: exports)
        raise InputError(f"{int(chosen.sum(-1).max())} protected tokens exceed the budget of {k}; raise keep")
    started = chosen.any(-1, keepdim=True)
    second = dist.topk(min(2, v), dim=-2, largest=False).values[..., -1, :]
    nearest = torch.where(started, dist.masked_fill(~chosen[..., :, None], float("inf")).amin(-2), second)
    for _ in range(k):
        j = nearest.masked_fill(chosen | blocked, float("-inf")).argmax(-1, keepdim=True)
        add = chosen.sum(-1, keepdim=True) < k
        row = dist.gather(-2, j[..., None].expand(*j.shape, v))[..., 0, :]
        nearest = torch.where(add, torch.where(started, torch.minimum(nearest, row), row), nearest)
        chosen = chosen | (torch.zeros_like(chosen).scatter(-1, j, True) & add)
        started = started | add
    return chosen


def dpp_greedy_select(kernel, k: int, valid=None):
    """Fast greedy MAP inference of a DPP with kernel (..., N, N) (Chen et al., 2018): (..., N) bool.

    Keeps an incremental Cholesky row c_i per pick and each token's marginal gain d_j^2 (initially
    L_jj): pick j = argmax d^2 (first index on ties), e = (L_j - c[:i, j] c[:i]) / sqrt(d_j^2),
    d^2 -= e^2. Invalid tokens are never picked.
    """
    kernel = kernel.float()
    n = kernel.shape[-1]
    gain = torch.diagonal(kernel, dim1=-2, dim2=-1).clone()
    chosen = torch.zeros(gain.shape, dtype=torch.bool, device=kernel.device)
    blocked = chosen if valid is None else ~valid.bool()
    rows = kernel.new_zeros(k, *gain.shape)                                      # c_0 .. c_{k-1}
    for i in range(k):
        j = gain.masked_fill(chosen | blocked, float("-inf")).argmax(-1, keepdim=True)
        lj = kernel.gather(-2, j[..., None].expand(*j.shape, n))[..., 0, :]
        cj = rows[:i].gather(-1, j[None].expand(i, *j.shape))                        # (i, ..., 1)
        e = (lj - (cj * rows[:i]).sum(0)) / gain.gather(-1, j).sqrt()
        rows[i] = e
        gain = gain - e ** 2
        chosen = chosen.scatter(-1, j, True)
    return chosen
