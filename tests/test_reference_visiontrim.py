"""Sanity tests of the VisionTrim reference (tests/reference_visiontrim.py) against hand computations and
brute-force loops written independently of it (python floats / float64, no shared helpers)."""
from __future__ import annotations

import functools
import math
import statistics

import pytest
import torch

from graphprune.tools.zoo import llava_example, tiny_llava

try:
    from tests import reference as ref
    from tests import reference_visiontrim as vt
except ImportError:  # plain `pytest` with tests/ (not the repo root) on sys.path
    import reference as ref
    import reference_visiontrim as vt


# ------------------------------------------------------------------------------- brute-force oracles

def brute_ltam(F, grid, window, w1, w2, w3, slots=None):
    """LTAM with python loops over explicit (row, col) windows; F: (V, d) tensor; returns list of floats."""
    feats = [[float(x) for x in row] for row in F]
    slots = list(range(grid * grid)) if slots is None else [int(s) for s in slots]
    rc = [(s // grid, s % grid) for s in slots]
    half = window // 2
    n = len(slots)
    nbrs = [[b for b in range(n) if b != a and abs(rc[a][0] - rc[b][0]) <= half
             and abs(rc[a][1] - rc[b][1]) <= half] for a in range(n)]
    df = [math.dist(feats[a], feats[b]) for a in range(n) for b in nbrs[a]]
    dp = [math.dist(rc[a], rc[b]) for a in range(n) for b in nbrs[a]]
    sf, sp = statistics.stdev(df), statistics.stdev(dp)
    kappa = {}
    for a in range(n):
        ef = {b: math.exp(-(math.dist(feats[a], feats[b]) / (w1 * sf)) ** 2) for b in nbrs[a]}
        ep = {b: math.exp(-(math.dist(rc[a], rc[b]) / (w2 * sp)) ** 2) for b in nbrs[a]}
        zf, zp = sum(ef.values()), sum(ep.values())
        for b in nbrs[a]:
            kappa[a, b] = ef[b] / zf + w3 * ep[b] / zp
    out = []
    for b in range(n):
        senders = [a for a in range(n) if b in nbrs[a]]
        out.append(sum(kappa[a, b] for a in senders) / len(senders) if senders else 0.0)
    return out


def brute_tgvc(V, T, R, iterations):
    """TGVC with explicit loops in float64: returns (centres ascending, complement rows as a (R, d) tensor)."""
    V, T = V.double(), T.double()
    d = V.shape[1]
    n, L = V.shape[0], T.shape[0]

    def softmax(xs):
        mx = max(xs)
        e = [math.exp(x - mx) for x in xs]
        return [x / sum(e) for x in e]

    s = [0.0] * n
    for t in range(L):
        p = softmax([float(T[t] @ V[r]) / math.sqrt(d) for r in range(n)])
        for r in range(n):
            s[r] += p[r] / L
    centres = sorted(sorted(range(n), key=lambda r: -s[r])[:R])
    members = [i for i in range(n) if i not in centres]
    c = [V[j].clone() for j in centres]
    for _ in range(iterations):
        v2t = {i: softmax([float(V[i] @ T[t]) / math.sqrt(d) for t in range(L)]) for i in members}
        t2c = [softmax([float(T[t] @ cj) / math.sqrt(d) for t in range(L)]) for cj in c]
        a = {(i, j): sum(x * y for x, y in zip(v2t[i], t2c[j])) for i in members for j in range(R)}
        cluster = {i: max(range(R), key=lambda j: (a[i, j], -j)) for i in members}
        new = []
        for j in range(R):
            mem = [i for i in members if cluster[i] == j]
            z = sum(a[i, j] for i in mem)
            new.append(V[centres[j]] + sum((a[i, j] / z * V[i] for i in mem), torch.zeros(d, dtype=V.dtype)))
        c = new
    return centres, torch.stack(c) if R else torch.zeros(0, d)


# ------------------------------------------------------------------------------------------------ LTAM

def test_ltam_hand_built_3x3_matches_brute_force():
    # a 3x3 image: a bright top-left block, a distinct centre, a dim bottom row
    F = torch.tensor([[1.0, 0.0], [1.1, 0.1], [0.2, 0.9],
                      [0.9, 0.2], [3.0, 3.0], [0.1, 1.0],
                      [0.0, 0.0], [0.1, -0.1], [0.3, 0.2]])
    for w in [(1.0, 1.0, 1.0), (0.7, 1.3, 0.5), (2.0, 0.5, 0.0)]:
        got = vt.ltam_scores(F[None], 3, 3, *w)[0]
        want = torch.tensor(brute_ltam(F, 3, 3, *w), dtype=torch.float32)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the centre sees all 8 tokens; every corner only 3; scores are not all equal
    assert vt.grid_neighbours(torch.arange(9), 3).sum(1).tolist() == [3, 5, 3, 5, 8, 5, 3, 5, 3]
    assert float(got.std()) > 1e-3


@pytest.mark.parametrize("grid,window", [(6, 3), (5, 5), (4, 1 + 2)])
def test_ltam_random_grids_match_brute_force(grid, window):
    g = torch.Generator().manual_seed(grid * 10 + window)
    F = torch.randn(2, grid * grid, 7, generator=g)
    got = vt.ltam_scores(F, grid, window, 1.0, 1.0, 1.0)
    for m in range(2):
        want = torch.tensor(brute_ltam(F[m], grid, window, 1.0, 1.0, 1.0), dtype=torch.float32)
        torch.testing.assert_close(got[m], want, rtol=1e-5, atol=1e-6)


def test_ltam_sparse_patch_index_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    slots = torch.tensor([0, 1, 5, 7, 14, 20, 21, 35])  # 35 is isolated on the 6x6 grid -> S_l = 0
    F = torch.randn(1, slots.numel(), 5, generator=g)
    got = vt.ltam_scores(F, 6, 3, patch_index=slots[None])[0]
    want = torch.tensor(brute_ltam(F[0], 6, 3, 1.0, 1.0, 1.0, slots=slots), dtype=torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float(got[-1]) == 0.0


def test_ltam_total_affinity():
    # every row of kappa sums to 1 + w3 (two softmaxes), so sum_j |N(j)| S_l(j) = V (1 + w3)
    F = torch.randn(1, 25, 4, generator=torch.Generator().manual_seed(1))
    w3 = 0.3
    s = vt.ltam_scores(F, 5, 3, 1.0, 1.0, w3)[0]
    n_recv = vt.grid_neighbours(torch.arange(25), 5).sum(0).float()
    assert math.isclose(float((s * n_recv).sum()), 25 * (1 + w3), rel_tol=1e-5)


def test_ltam_rejects_even_window():
    with pytest.raises(ValueError):
        vt.ltam_scores(torch.randn(1, 9, 2), 3, window=2)


# ------------------------------------------------------------------------------------------------ DVTS

def test_variance_weighting_hand_example():
    s_g = torch.tensor([[1.0, 2.0, 3.0]])  # unbiased var 1
    s_l = torch.tensor([[0.0, 0.0, 2.0]])  # unbiased var 4/3
    s, a = vt.variance_weighting(s_g, s_l)
    assert math.isclose(float(a), 4 / 7, rel_tol=1e-6)
    torch.testing.assert_close(s, 4 / 7 * s_g + 3 / 7 * s_l)


def test_variance_weighting_limits():
    s_var = torch.tensor([[0.1, 0.5, 0.2, 0.9]])
    const = torch.full((1, 4), 0.25)
    # Eq. 6 weights S_g by var(S_l): a constant S_l gives a = 0 and S = S_l (no ranking signal left) ...
    s, a = vt.variance_weighting(s_var, const)
    assert float(a) == 0.0 and torch.equal(s, const)
    # ... and a constant S_g gives a = 1, S = S_g
    s, a = vt.variance_weighting(const, s_var)
    assert float(a) == 1.0 and torch.equal(s, const)
    # equal variances -> a = 1/2
    _, a = vt.variance_weighting(s_var, s_var.flip(-1))
    assert math.isclose(float(a), 0.5, rel_tol=1e-6)


def test_dvts_scores_compose():
    g = torch.Generator().manual_seed(2)
    raw, F = torch.randn(2, 16, generator=g), torch.randn(2, 16, 3, generator=g)
    s_g = torch.softmax(raw, -1)
    s_l = torch.tensor([brute_ltam(F[m], 4, 3, 1.0, 1.0, 1.0) for m in range(2)], dtype=torch.float32)
    a = s_l.var(-1, keepdim=True) / (s_g.var(-1, keepdim=True) + s_l.var(-1, keepdim=True))
    torch.testing.assert_close(vt.dvts_scores(raw, F, 4), a * s_g + (1 - a) * s_l, rtol=1e-5, atol=1e-7)


def test_split_budget():
    assert [vt.split_budget(k) for k in (32, 64, 128, 192)] == [(24, 8), (48, 16), (96, 32), (144, 48)]
    assert vt.split_budget(10, dominant=7) == (7, 3)
    with pytest.raises(ValueError):
        vt.split_budget(8, dominant=9)


# ------------------------------------------------------------------------------------------------ TGVC

@pytest.mark.parametrize("iterations", [1, 3])
def test_tgvc_matches_brute_force(iterations):
    g = torch.Generator().manual_seed(5)
    V, T = torch.randn(20, 6, generator=g) * 2, torch.randn(4, 6, generator=g) * 2
    centres, comp = vt.tgvc(V, T, None, 5, iterations)
    want_c, want_v = brute_tgvc(V, T, 5, iterations)
    assert centres.tolist() == want_c
    torch.testing.assert_close(comp, want_v.float(), rtol=1e-5, atol=1e-5)


def test_tgvc_text_mask_drops_padding_rows():
    g = torch.Generator().manual_seed(6)
    V, T = torch.randn(12, 4, generator=g), torch.randn(5, 4, generator=g)
    mask = torch.tensor([True, False, True, True, False])
    c1, v1 = vt.tgvc(V, T, mask, 3)
    c2, v2 = vt.tgvc(V, T[mask], None, 3)
    assert torch.equal(c1, c2) and torch.equal(v1, v2)


def test_tgvc_weights_and_convexity():
    g = torch.Generator().manual_seed(7)
    V, T = torch.randn(30, 8, generator=g) * 3, torch.randn(6, 8, generator=g) * 3
    R = 4
    centres, comp, info = vt.tgvc(V, T, None, R, details=True)
    members, assign, w = info["members"], info["assign"], info["weights"]
    assert centres.numel() == R and members.numel() == 30 - R
    assert set(centres.tolist()).isdisjoint(members.tolist())
    assert bool((w > 0).all())
    for j in range(R):
        inside = assign == j
        if not bool(inside.any()):  # an empty cluster leaves the centre unchanged
            assert torch.equal(comp[j], V[centres[j]])
            continue
        assert math.isclose(float(w[inside].sum()), 1.0, rel_tol=1e-5)
        delta = comp[j] - V[centres[j]]
        torch.testing.assert_close(delta, (w[inside, None] * V[members[inside]]).sum(0), rtol=1e-5, atol=1e-5)
        assert vt.is_convex_combination(delta, V[members[inside]])
        # the delta is not a convex combination of another cluster's members (the check can fail)
        other = members[assign != j]
        assert not vt.is_convex_combination(delta, V[other])


def test_tgvc_empty_cluster_and_zero_R():
    V = torch.tensor([[5.0, 0.0], [0.0, 5.0], [4.0, 0.1]])
    T = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    centres, comp = vt.tgvc(V, T, None, 3)  # every token is a centre: no members, nothing changes
    assert centres.tolist() == [0, 1, 2] and torch.equal(comp, V)
    centres, comp = vt.tgvc(V, T, None, 0)
    assert centres.numel() == 0 and comp.shape == (0, 2)


def test_convex_weights():
    members = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    w, resid = vt.convex_weights(torch.tensor([0.2, 0.3]), members)
    assert resid < 1e-8
    torch.testing.assert_close(w, torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64))
    assert vt.is_convex_combination(torch.tensor([0.5, 0.5]), members)
    assert not vt.is_convex_combination(torch.tensor([0.8, 0.8]), members)
    assert not vt.is_convex_combination(torch.tensor([-0.1, 0.2]), members)


# ------------------------------------------------------------------------------------------ end to end

@functools.lru_cache(maxsize=None)
def _model(scaled: bool = True):
    """tiny_llava; ``scaled`` multiplies the projector output and the token embeddings by 40.

    At random init both are ~0.05 in size, so every softmax in TGVC is uniform to ~1e-8 (affinity margins
    are exactly 0 for some tokens) and cluster assignment is decided by float rounding; scaled, the
    margins are ~1e-3 and a float64 brute force must agree with the float32 reference.
    """
    model = tiny_llava()
    if scaled:
        with torch.no_grad():
            for p in (model.model.multi_modal_projector.linear_2.weight,
                      model.model.multi_modal_projector.linear_2.bias,
                      model.model.language_model.embed_tokens.weight):
                p.mul_(40.0)
    return model


def test_visiontrim_vision_end_to_end():
    model = _model()
    ex = llava_example(model, batch=1)
    full = ref.llava_vision(model, ex.pixel_values)
    out = vt.visiontrim_vision(model, ex, keep=8, vision_out=full)
    K, R = 6, 2
    dom, cen, slots = out["dominant"][0], out["centres"][0], out["patch_index"][0]
    assert dom.numel() == K and cen.numel() == R and slots.numel() == K + R
    assert slots.tolist() == sorted(dom.tolist() + cen.tolist())
    # dominant = top-K of an independently recomputed S
    s_g = torch.softmax(full["cls_attn"][0], -1)
    s_l = torch.tensor(brute_ltam(full["features"][0], 6, 3, 1.0, 1.0, 1.0), dtype=torch.float32)
    a = s_l.var() / (s_g.var() + s_l.var())
    s = a * s_g + (1 - a) * s_l
    assert dom.tolist() == sorted(torch.topk(s, K).indices.tolist())
    # features: dominant rows untouched; centres = their own feature + convex combination of the rest
    feats = full["features"][0]
    at = {int(p): r for r, p in enumerate(slots)}
    for p in dom.tolist():
        assert torch.equal(out["features"][0, at[p]], feats[p])
    rest = [p for p in range(36) if p not in dom.tolist() and p not in cen.tolist()]
    T = model.model.language_model.embed_tokens.weight.detach()[ex.input_ids[0, -7:]]
    remaining = [p for p in range(36) if p not in dom.tolist()]
    want_c, want_v = brute_tgvc(feats[remaining], T, R, 1)
    assert [remaining[c] for c in want_c] == cen.tolist()
    for j, p in enumerate(cen.tolist()):
        delta = out["features"][0, at[p]] - feats[p]
        assert vt.is_convex_combination(delta, feats[rest])
        torch.testing.assert_close(out["features"][0, at[p]], want_v[j].float(), rtol=1e-5, atol=1e-5)
    # the prompt built from it runs through the hand-written LM
    emb, mask, pos, vis, _ = ref.llava_inputs_from_vision(model, ex, out)
    assert emb.shape[1] == ex.input_ids.shape[1] - 36 + 8 and int(vis.sum()) == 8
    res = ref.lm_generate(model, emb, mask, pos, vision_mask=vis, max_new_tokens=4)
    assert res["tokens"].shape == (1, 4) and bool(torch.isfinite(res["prefill_logits"]).all())


def test_visiontrim_vision_batch_and_override():
    model = _model(scaled=False)  # the unscaled zoo model runs too
    ex = llava_example(model, batch=2, pad=(0, 3))
    out = vt.visiontrim_vision(model, ex, keep=12, dominant=5, iterations=2)
    assert out["dominant"].shape == (2, 5) and out["centres"].shape == (2, 7)
    assert out["features"].shape == (2, 12, 64)
    emb, mask, pos, vis, _ = ref.llava_inputs_from_vision(model, ex, out)
    res = ref.lm_generate(model, emb, mask, pos, vision_mask=vis, max_new_tokens=3)
    assert res["tokens"].shape == (2, 3)


def test_visiontrim_llm_select_end_to_end():
    model = _model()
    ex = llava_example(model, batch=1)
    emb, mask, pos, vis = ref.llava_inputs(model, ex)
    seen = {}

    def spy(ctx):
        seen["ctx"] = ctx
        out = vt.visiontrim_llm_select(keep=8)(ctx)
        seen["out"] = out
        return out

    res = ref.lm_generate(model, emb, mask, pos, vision_mask=vis, selects={2: spy}, max_new_tokens=4)
    ctx, out = seen["ctx"], seen["out"]
    keep, hidden = out["keep"][0], out["hidden"][0]
    vm = vis[0]
    assert keep.numel() == emb.shape[1] - 36 + 8
    assert set((~vm).nonzero(as_tuple=True)[0].tolist()) <= set(keep.tolist())
    kept_vis = [i for i in keep.tolist() if vm[i]]
    assert len(kept_vis) == 8
    h = ctx["hidden"][0]
    changed = [i for r, i in enumerate(keep.tolist()) if not torch.equal(hidden[r], h[i])]
    assert len(changed) == 2 and all(vm[i] for i in changed)  # R = 2 complement rows, nothing else moved
    # dominant = top-M of an independently recomputed score
    vis_idx = vm.nonzero(as_tuple=True)[0]
    H_v, H_t = h[vis_idx], h[ctx["text_mask"][0]]
    alpha = torch.softmax(H_t @ H_v.t() / math.sqrt(h.shape[-1]), -1).mean(0)
    s_l = torch.tensor(brute_ltam(H_v, 6, 3, 1.0, 1.0, 1.0), dtype=torch.float32)
    a = s_l.var() / (alpha.var() + s_l.var())
    dom = set(vis_idx[torch.topk(a * alpha + (1 - a) * s_l, 6).indices].tolist())
    assert dom == set(kept_vis) - set(changed)
    # complement rows = brute-force TGVC with T = the text hidden states, V_r = the unselected vision tokens
    remaining = [int(p) for p in vis_idx if int(p) not in dom]
    want_c, want_v = brute_tgvc(h[remaining], H_t, 2, 1)
    assert sorted(changed) == [remaining[c] for c in want_c]
    rest = [int(p) for p in vis_idx if int(p) not in kept_vis]
    for r, i in enumerate(keep.tolist()):
        if i in changed:
            torch.testing.assert_close(hidden[r], want_v[want_c.index(remaining.index(i))].float(),
                                       rtol=1e-5, atol=1e-5)
            assert vt.is_convex_combination(hidden[r] - h[i], h[rest])
    assert res["tokens"].shape == (1, 4) and res["kv_lens"][2] == keep.numel()


def test_visiontrim_vision_then_llm_pipeline():
    # the LLM stage on a vision-reduced prompt places its tokens on the grid by the vision stage's slots
    model = _model()
    ex = llava_example(model, batch=2, pad=(2, 0))
    out = vt.visiontrim_vision(model, ex, keep=16)
    emb, mask, pos, vis, _ = ref.llava_inputs_from_vision(model, ex, out)
    sel = vt.visiontrim_llm_select(keep=8, grid=6, patch_index=out["patch_index"])
    res = ref.lm_generate(model, emb, mask, pos, vision_mask=vis, selects={2: sel}, max_new_tokens=3)
    assert res["keep"].shape == (2, emb.shape[1] - 16 + 8) and res["tokens"].shape == (2, 3)
    # the sparse LTAM the select uses is the brute force on those slots
    h = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    got = vt.ltam_scores(h[None], 6, patch_index=out["patch_index"][:1])[0]
    want = brute_ltam(h, 6, 3, 1.0, 1.0, 1.0, slots=out["patch_index"][0])
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=1e-5, atol=1e-6)
