"""Independent plain-PyTorch reference of VisionTrim (DVTS + TGVC), written from docs/methods.md.

The contract is docs/methods.md, section "VisionTrim"; this file never imports graphprune. Everything is
computed per image with explicit index sets (no padding masks inside the maths), in float32.

Readings that the doc leaves open, chosen here (most literal reading first):
  * Neighbourhood ``N(i)``: the tokens j != i with ``|row_i - row_j| <= k // 2`` and ``|col_i - col_j| <= k // 2``
    (a centred ``k x k`` window clipped at the border). ``k`` must be odd (a centred even window does not
    exist). The relation is symmetric, so "i in N(j)" and "j in N(i)" are the same pairs. When the image's
    tokens are only a subset of the grid (``patch_index`` given, e.g. the LLM stage after the vision
    stage), ``N(i)`` holds the *present* tokens of that window.
  * ``|F_i - F_j|`` and ``|P_i - P_j|`` are Euclidean norms; ``P`` = (row, col) as floats.
    ``sigma_f`` / ``sigma_p``: ``torch.std`` (unbiased) over all ordered neighbour pairs of the image (each
    unordered pair counted twice).
  * A token with no neighbour (only possible with a sparse ``patch_index``) has ``S_l = 0``.
  * Variance weighting ``a = var(S_l) / (var(S_g) + var(S_l))`` exactly as Eq. 6 (the *global* score is
    weighted by the *local* variance). Hence a constant S_l gives ``a = 0`` and ``S = S_l`` (all ties), a
    constant S_g gives ``a = 1``. Both constant gives 0/0 = NaN; not guarded (the doc does not say).
  * LLM stage: ``alpha`` (already a distribution over the image's vision tokens) is used as S_g directly,
    with no second softmax.
  * Default split: ``K = keep - keep // 4`` dominant, ``R = keep // 4`` complement
    (32 -> 24+8, 64 -> 48+16, 128 -> 96+32, 192 -> 144+48).
  * TGVC: ``sqrt(d)`` uses the feature width of V_r / T. Centres are held in ascending slot order; the
    assignment ``argmax_j a_ij`` therefore breaks exact ties towards the centre with the smallest slot
    (``torch.argmax`` returns the first maximum). With ``iterations > 1`` each iteration re-assigns every
    non-centre token against the centres of the previous iteration and rebuilds
    ``c_j = c_j^0 + sum_i w_ij v_i`` from the *original* centre value ``c_j^0`` and original ``v_i``.
  * Vision stage text features: ``T`` = rows of ``embed_tokens.weight`` for the instruction tokens (real
    tokens after the last image) of the sample that owns the image; every image of a sample uses the
    same instruction. An image whose sample has no instruction token is rejected (TGVC needs L >= 1).
  * LLM stage: protected vision tokens are ranked first in the dominant top-M (``+inf`` score), as the
    common conventions require of TopK rules; they must fit in M.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

try:
    from tests import reference as _ref
except ImportError:  # tests/ itself on sys.path (plain `pytest` from tests/, or conftest's insert)
    import reference as _ref

__all__ = [
    "split_budget", "grid_neighbours", "ltam_scores", "variance_weighting", "dvts_scores",
    "tgvc_centres", "tgvc_affinity", "tgvc", "visiontrim_vision", "visiontrim_llm_select",
    "convex_weights", "is_convex_combination",
]


# ------------------------------------------------------------------------------------------- budget

def split_budget(keep: int, dominant: int | None = None) -> tuple[int, int]:
    """(K, R) with K + R = keep: K = ``dominant`` if given, else ``keep - keep // 4`` (the 3:1 split)."""
    k = keep - keep // 4 if dominant is None else int(dominant)
    if keep < 0 or not 0 <= k <= keep:
        raise ValueError(f"need 0 <= dominant <= keep, got keep={keep}, dominant={k}")
    return k, keep - k


# --------------------------------------------------------------------------------------------- LTAM

def _grid_coords(index: Tensor, grid: int) -> Tensor:
    """Raster slot -> (row, col) float coordinates, (V, 2)."""
    return torch.stack([torch.div(index, grid, rounding_mode="floor"), index % grid], dim=-1).float()


def grid_neighbours(index: Tensor, grid: int, window: int = 3) -> Tensor:
    """(V, V) bool: entry (i, j) is True iff j is in i's centred ``window x window`` neighbourhood, j != i.

    ``index`` (V,) gives each token's raster slot on the ``grid x grid`` patch grid.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number, got {window}")
    half = window // 2
    rc = _grid_coords(index, grid)
    diff = (rc[:, None, :] - rc[None, :, :]).abs()  # (V, V, 2)
    near = (diff <= half).all(-1)
    return near & ~torch.eye(index.numel(), dtype=torch.bool)


def _ltam_one(f: Tensor, index: Tensor, grid: int, window: int, w1: float, w2: float, w3: float) -> Tensor:
    """LTAM local score of one image: f (V, d) features, index (V,) raster slots -> S_l (V,)."""
    nb = grid_neighbours(index, grid, window)
    i, j = nb.nonzero(as_tuple=True)  # every ordered neighbour pair (i, j), j in N(i)
    pos = _grid_coords(index, grid)
    # distances only over neighbour pairs: a dense V x V x d difference tensor would not fit for 576 x 4096
    dist_f = (f[i] - f[j]).norm(dim=-1)
    dist_p = (pos[i] - pos[j]).norm(dim=-1)
    sigma_f = dist_f.std()  # unbiased (correction=1) over all ordered pairs of the image
    sigma_p = dist_p.std()
    v = f.shape[0]
    neg_inf = torch.full((v, v), float("-inf"))
    logit_f = neg_inf.index_put((i, j), -(dist_f / (w1 * sigma_f)) ** 2)
    logit_p = neg_inf.index_put((i, j), -(dist_p / (w2 * sigma_p)) ** 2)
    # softmax over i's neighbours (row-wise); a row with no neighbour is all -inf -> NaN -> contributes 0
    kappa = torch.softmax(logit_f, dim=1) + w3 * torch.softmax(logit_p, dim=1)
    kappa = torch.where(nb, kappa, torch.zeros(()))
    # S_l(j) = mean over i in N(j) of kappa_ij: the affinity token j *receives* (column mean)
    n_recv = nb.sum(0)
    return torch.where(n_recv > 0, kappa.sum(0) / n_recv.clamp(min=1), torch.zeros(()))


def ltam_scores(F: Tensor, grid: int, window: int = 3, w1: float = 1.0, w2: float = 1.0, w3: float = 1.0,
                patch_index: Tensor | None = None) -> Tensor:
    """Local Token Affinity Measure: F (n, V, d) -> S_l (n, V).

    Token v of image m sits at raster slot ``patch_index[m, v]`` (default ``v``, i.e. the full grid,
    V = grid * grid) of the ``grid x grid`` patch grid.
    """
    n, v, _ = F.shape
    if patch_index is None:
        if v != grid * grid:
            raise ValueError(f"{v} tokens do not fill a {grid}x{grid} grid; pass patch_index")
        patch_index = torch.arange(v).expand(n, v)
    F = F.float()
    return torch.stack([_ltam_one(F[m], patch_index[m].long(), grid, window, w1, w2, w3) for m in range(n)])


# --------------------------------------------------------------------------------------------- DVTS

def variance_weighting(S_g: Tensor, S_l: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 6 per image: ``S = a S_g + (1 - a) S_l``, ``a = var(S_l) / (var(S_g) + var(S_l))`` (unbiased).

    S_g, S_l (n, V) -> (S (n, V), a (n, 1)).
    """
    var_g = S_g.var(dim=-1, keepdim=True)
    var_l = S_l.var(dim=-1, keepdim=True)
    a = var_l / (var_g + var_l)
    return a * S_g + (1 - a) * S_l, a


def dvts_scores(global_raw: Tensor, F: Tensor, grid: int, window: int = 3, w1: float = 1.0, w2: float = 1.0,
                w3: float = 1.0, patch_index: Tensor | None = None) -> Tensor:
    """Vision-stage DVTS score (n, V): S_g = softmax over the image's tokens of ``global_raw`` (the
    head-averaged CLS attention), S_l = LTAM of F, combined by the variance weighting."""
    s_g = torch.softmax(global_raw.float(), dim=-1)
    s_l = ltam_scores(F, grid, window, w1, w2, w3, patch_index)
    return variance_weighting(s_g, s_l)[0]


# --------------------------------------------------------------------------------------------- TGVC

def _text(T: Tensor, t_mask: Tensor | None) -> Tensor:
    T = T.float()
    if t_mask is not None:
        T = T[t_mask.bool()]
    if T.shape[0] == 0:
        raise ValueError("TGVC needs at least one text token")
    return T


def tgvc_centres(V_r: Tensor, T: Tensor, R: int) -> tuple[Tensor, Tensor]:
    """Eq. 7: ``s = mean_t softmax_r(T V_r^T / sqrt(d))``; returns (s (N,), top-R local indices ascending)."""
    d = V_r.shape[-1]
    s = torch.softmax(T @ V_r.t() / math.sqrt(d), dim=-1).mean(0)  # softmax over the remaining tokens
    return s, torch.topk(s, R).indices.sort().values


def tgvc_affinity(members: Tensor, T: Tensor, centres: Tensor) -> Tensor:
    """Eq. 8-9: ``a_ij = softmax_t(v_i T^T / sqrt d) . softmax_t(T c_j^T / sqrt d)`` -> (N_members, R)."""
    d = T.shape[-1]
    v2t = torch.softmax(members @ T.t() / math.sqrt(d), dim=-1)  # (N, L), softmax over text
    t2c = torch.softmax(centres @ T.t() / math.sqrt(d), dim=-1)  # (R, L): column j of (T c_j^T), over text
    return v2t @ t2c.t()


def tgvc(V_r: Tensor, T: Tensor, t_mask: Tensor | None, R: int, iterations: int = 1,
         details: bool = False):
    """Text-guided vision complement for one image.

    V_r (N, d) remaining vision tokens (in slot order), T (L, d) text features, t_mask (L,) bool marks the
    real rows of T (None: all). Returns ``(centres, complement)``: centres (R,) local indices into V_r,
    ascending; complement (R, d), row j the merged value at centre j. With ``details=True`` a third item
    dict(members (N-R,) local indices, assign (N-R,) cluster of each member in 0..R-1, weights (N-R,) its
    normalised weight w_ij in its cluster, affinity (N-R, R) of the last iteration) is returned.
    """
    V_r = V_r.float()
    T = _text(T, t_mask)
    n = V_r.shape[0]
    if not 0 <= R <= n:
        raise ValueError(f"cannot pick {R} centres among {n} remaining tokens")
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    _, centres = tgvc_centres(V_r, T, R)
    is_centre = torch.zeros(n, dtype=torch.bool)
    is_centre[centres] = True
    members = (~is_centre).nonzero(as_tuple=True)[0]
    v = V_r[members]
    c0 = V_r[centres]
    c = c0
    assign = torch.zeros(members.numel(), dtype=torch.long)
    weights = torch.zeros(members.numel())
    aff = torch.zeros(members.numel(), R)
    for _ in range(iterations):
        if R == 0:
            break
        aff = tgvc_affinity(v, T, c)
        assign = aff.argmax(dim=1)
        a_own = aff.gather(1, assign[:, None])[:, 0]
        # per-cluster normaliser sum_{i in cluster j} a_ij (zero for an empty cluster, never divided by)
        norm = torch.zeros(R).index_add(0, assign, a_own)
        weights = a_own / norm[assign]
        c = c0.index_add(0, assign, weights[:, None] * v)  # Eq. 11, from the original centres
    if details:
        return centres, c, dict(members=members, assign=assign, weights=weights, affinity=aff)
    return centres, c


# --------------------------------------------------------------------------------------- vision stage

@torch.no_grad()
def visiontrim_vision(model, example, keep: int, dominant: int | None = None, window: int = 3,
                      w1: float = 1.0, w2: float = 1.0, w3: float = 1.0, iterations: int = 1,
                      vision_out: dict | None = None) -> dict:
    """VisionTrim in the vision stage (on the projector output), per image.

    Returns dict: ``features`` (n, keep, D) = dominant features and complement values, ascending by slot;
    ``patch_index`` (n, keep) their slots; ``dominant`` (n, K) and ``centres`` (n, R) slots (ascending);
    ``scores`` (n, V) the DVTS score S; ``valid`` (n, keep) all True; ``cls_attn`` of the kept slots.
    ``vision_out`` may pass a precomputed ``reference.llava_vision`` output.
    """
    cfg = model.config
    out = vision_out if vision_out is not None else _ref.llava_vision(model, example.pixel_values)
    feats = out["features"].float()  # (n, V, D)
    n, v, _ = feats.shape
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    slots_all = out["patch_index"].long()
    k, r = split_budget(keep, dominant)
    if keep > v:
        raise ValueError(f"keep={keep} exceeds the {v} vision tokens per image")
    # a vision output already reduced upstream: LTAM places its rows on the grid by their slots
    patch_index = None if v == grid * grid and bool((slots_all == torch.arange(v)).all()) else slots_all
    scores = dvts_scores(out["cls_attn"], feats, grid, window, w1, w2, w3, patch_index)

    # text features: embeddings of each sample's instruction tokens (after its last image)
    ids, amask = example.input_ids, example.attention_mask
    embed = model.model.language_model.embed_tokens.weight.detach().float()
    img_tok = ids == cfg.image_token_id
    text_mask = _ref.text_after_image(img_tok, amask)
    per_sample = img_tok.sum(1) // (grid * grid)  # images per sample (the prompt holds full grids)
    owner = torch.repeat_interleave(torch.arange(ids.shape[0]), per_sample)
    assert owner.numel() == n, "image tokens do not match the number of images"

    rows_f, rows_p, doms, cens = [], [], [], []
    for m in range(n):
        dom = torch.topk(scores[m], k).indices.sort().values
        rest = torch.ones(v, dtype=torch.bool)
        rest[dom] = False
        rest_idx = rest.nonzero(as_tuple=True)[0]  # V_r in slot order
        T = embed[ids[owner[m]][text_mask[owner[m]]]]
        cen_local, comp = tgvc(feats[m, rest_idx], T, None, r, iterations)
        cen = rest_idx[cen_local]
        rows = torch.cat([dom, cen])
        vals = torch.cat([feats[m, dom], comp])
        order = rows.argsort()
        rows_f.append(vals[order])
        rows_p.append(slots_all[m, rows[order]])
        doms.append(slots_all[m, dom])
        cens.append(slots_all[m, cen])
    kept_rows = torch.stack([torch.searchsorted(slots_all[m], rows_p[m]) for m in range(n)]) \
        if patch_index is not None else torch.stack(rows_p)
    return {"features": torch.stack(rows_f), "patch_index": torch.stack(rows_p), "dominant": torch.stack(doms),
            "centres": torch.stack(cens), "scores": scores, "valid": torch.ones(n, keep, dtype=torch.bool),
            "cls_attn": torch.gather(out["cls_attn"], 1, kept_rows)}


# ------------------------------------------------------------------------------------------ LLM stage

def visiontrim_llm_select(keep: int, dominant: int | None = None, window: int = 3, w1: float = 1.0,
                          w2: float = 1.0, w3: float = 1.0, iterations: int = 1, grid: int | None = None,
                          patch_index: Tensor | None = None):
    """Select fn for ``reference.lm_generate(selects={K: fn})``: VisionTrim between LLM layers.

    Per image (a contiguous block of its vision tokens in sequence order): ``H`` = layer K-1 output,
    ``alpha_i = mean_t softmax_i(H_t H_i^T / sqrt(D))`` over the image's vision tokens, S_l = LTAM on H_v,
    variance weighting, top M dominant, TGVC with ``T = H_t`` on the unselected vision tokens (R = keep - M).
    Returns dict(keep = every non-vision token + dominant + centres (ascending), hidden = gathered hidden
    states with each centre row replaced by its complement value).

    Grid placement: ``patch_index`` (n_images, V') gives each vision token's raster slot (e.g. the
    ``patch_index`` of ``visiontrim_vision``), and ``grid`` the grid side (required then). Without it each
    image's block must fill the grid: V' = grid * grid (``grid`` defaults to sqrt of a sample's vision
    token count, i.e. one image per sample).
    """
    m_dom, r = split_budget(keep, dominant)

    def select(ctx: dict) -> dict:
        h = ctx["hidden"].float()  # (B, S, D)
        vm = ctx["vision_mask"].bool()
        tm = ctx["text_mask"].bool()
        prot = ctx["protected"].bool()
        b, s, dim = h.shape
        counts = vm.sum(1)
        if patch_index is not None:
            if grid is None:
                raise ValueError("grid is required with patch_index")
            g, per_image = grid, patch_index.shape[1]
        else:
            g = grid if grid is not None else math.isqrt(int(counts[0]))
            per_image = g * g
        if bool((counts % per_image != 0).any()):
            raise ValueError(f"vision tokens per sample {counts.tolist()} are not blocks of {per_image}")
        if keep > per_image:
            raise ValueError(f"keep={keep} exceeds the {per_image} vision tokens per image")
        keeps, hiddens = [], []
        image = 0  # global image number, sample-major (the order of patch_index rows)
        for bi in range(b):
            vis_pos = vm[bi].nonzero(as_tuple=True)[0]
            H_t = h[bi, tm[bi]]
            if H_t.shape[0] == 0:
                raise ValueError(f"sample {bi} has no text tokens after its image")
            kept = [(~vm[bi]).nonzero(as_tuple=True)[0]]
            hid = h[bi].clone()
            for block in vis_pos.split(per_image):
                H_v = h[bi, block]
                alpha = torch.softmax(H_t @ H_v.t() / math.sqrt(dim), dim=-1).mean(0)  # over vision tokens
                pidx = None if patch_index is None else patch_index[image:image + 1].long()
                s_l = ltam_scores(H_v[None], g, window, w1, w2, w3, pidx)[0]
                score, _ = variance_weighting(alpha[None], s_l[None])
                score = score[0].masked_fill(prot[bi, block], float("inf"))
                if int(prot[bi, block].sum()) > m_dom:
                    raise ValueError("more protected vision tokens than dominant slots")
                dom = torch.topk(score, m_dom).indices.sort().values
                rest = torch.ones(per_image, dtype=torch.bool)
                rest[dom] = False
                rest_idx = rest.nonzero(as_tuple=True)[0]
                cen_local, comp = tgvc(H_v[rest_idx], H_t, None, r, iterations)
                cen = block[rest_idx[cen_local]]
                hid[cen] = comp
                kept += [block[dom], cen]
                image += 1
            order = torch.cat(kept).sort().values
            keeps.append(order)
            hiddens.append(hid[order])
        return {"keep": torch.stack(keeps), "hidden": torch.stack(hiddens)}

    return select


# -------------------------------------------------------------------------------- convexity (tests)

def convex_weights(x: Tensor, members: Tensor) -> tuple[Tensor, float]:
    """Closest convex combination of ``members`` (m, d) to ``x`` (d,): returns (w (m,) float64, residual).

    Lawson-Hanson non-negative least squares (float64) on ``[members^T; s 1^T] w = [x; s]``. A point of the
    convex hull solves this system exactly (residual 0, hence ``sum w = 1``), so the row weight ``s`` (the
    members' scale, for balance) needs no large value. The residual is the norm of the whole augmented
    system, i.e. it also counts any violation of ``sum w = 1``.
    """
    x = x.double()
    m = members.shape[0]
    if m == 0:
        return torch.zeros(0, dtype=torch.float64), float(x.norm())
    scale = max(1.0, float(members.abs().max()), float(x.abs().max()))
    A = torch.cat([members.double().t(), torch.full((1, m), scale, dtype=torch.float64)])  # (d+1, m)
    b = torch.cat([x, torch.tensor([scale], dtype=torch.float64)])
    tol = 1e-13 * scale * scale * A.shape[0]
    w = torch.zeros(m, dtype=torch.float64)
    passive = torch.zeros(m, dtype=torch.bool)

    def solve(p: Tensor) -> Tensor:  # unconstrained least squares on the passive set
        z = torch.zeros(m, dtype=torch.float64)
        z[p] = torch.linalg.lstsq(A[:, p], b[:, None], driver="gelsd").solution[:, 0]
        return z

    for _ in range(3 * m + 10):
        grad = A.t() @ (b - A @ w)
        grad[passive] = -float("inf")
        j = int(grad.argmax())
        if bool(passive.all()) or float(grad[j]) <= tol:
            break
        passive[j] = True
        z = solve(passive)
        while bool((z[passive] <= 0).any()):  # step back to the feasible boundary, drop what hit zero
            bad = passive & (z <= 0)
            step = (w[bad] / (w[bad] - z[bad])).min()
            w = w + step * (z - w)
            passive &= w > 1e-15
            w[~passive] = 0
            z = solve(passive)
        w = z
    return w, float((A @ w - b).norm())


def is_convex_combination(x: Tensor, members: Tensor, atol: float = 1e-4) -> bool:
    """True iff ``x`` is, within ``atol`` times the members' scale, a convex combination of ``members``."""
    _, resid = convex_weights(x, members)
    scale = max(1.0, float(members.abs().max())) if members.numel() else 1.0
    return resid <= atol * scale
