"""Sanity checks of the independent method references (tests/reference_dart.py, tests/reference_mustdrop.py
and reference.llava_inputs_from_vision) on the tiny LLaVA. These test the references only; graphprune is
used just to build the tiny model and its inputs."""
from __future__ import annotations

import functools
import math

import pytest
import reference as R
import reference_dart as D
import reference_mustdrop as M
import torch
import torch.nn.functional as F

from graphprune.tools.zoo import llava_example, tiny_llava

V = 36  # 6 x 6 patch grid of the tiny LLaVA


@functools.lru_cache(maxsize=None)
def _model():
    return tiny_llava()


@functools.lru_cache(maxsize=None)
def _inputs(batch: int, images: int = 1):
    model = _model()
    ex = llava_example(model, batch=batch, pad=(0, 3)[:batch] if batch > 1 else (), images_per_sample=images)
    return ex, R.llava_inputs(model, ex)


def _layer0_states(model, ex):
    seen = {}

    def spy(h, ctx):
        seen["h"], seen["ctx"] = h, ctx
        return h

    R.llava_vision(model, ex.pixel_values, after_layer={0: spy})
    return seen["h"], seen["ctx"]


# --------------------------------------------------------------------------- llava_inputs_from_vision

def test_inputs_from_vision_full_equals_llava_inputs():
    model = _model()
    ex, (emb, am, pos, vm) = _inputs(2, 2)
    vis = R.llava_vision(model, ex.pixel_values)
    emb2, am2, pos2, vm2, prot = R.llava_inputs_from_vision(model, ex, vis)
    assert prot is None
    assert torch.equal(emb2, emb) and torch.equal(am2, am) and torch.equal(pos2, pos) and torch.equal(vm2, vm)


def test_inputs_from_vision_reduced_positions_and_protected():
    model = _model()
    ex, (emb, am, pos, vm) = _inputs(2, 2)
    vis = R.llava_vision(model, ex.pixel_values)
    pidx = torch.tensor([[0, 5, 7], [1, 2, 35], [3, 4, 9], [10, 20, 30]])
    valid = torch.tensor([[True, False, True]] * 4)
    prot = torch.tensor([[False, False, True]] * 4)
    sub = {"features": vis["features"].gather(1, pidx[..., None].expand(-1, -1, vis["features"].shape[-1])),
           "patch_index": pidx, "valid": valid}
    for mode in ("compact", "keep"):
        e, a, p, v, pm = R.llava_inputs_from_vision(model, ex, sub, positions=mode, protected=prot)
        s = ex.input_ids.shape[1] - 2 * (V - 3)
        assert e.shape[:2] == (2, s) and int(v.sum()) == 12 and int(pm.sum()) == 4
        for b in range(2):
            # prompt index of each kept token: text + the listed slots of this sample's two images
            img = (ex.input_ids[b] == model.config.image_token_id).nonzero()[:, 0].view(2, V)
            text = (ex.input_ids[b] != model.config.image_token_id).nonzero()[:, 0]
            idx = torch.cat([text, img[0][pidx[2 * b]], img[1][pidx[2 * b + 1]]]).sort().values
            assert torch.equal(e[b][~v[b]], emb[b, idx][~v[b]])
            assert torch.equal(e[b][v[b]], sub["features"][2 * b:2 * b + 2].reshape(-1, e.shape[-1]))
            assert torch.equal(a[b][v[b]], valid[0].repeat(2).long())
            if mode == "keep":
                assert torch.equal(p[b], pos[b, idx])
            else:
                assert torch.equal(p[b], R._positions_from_mask(a[b:b + 1])[0])
                assert int(p[b].max()) == int(a[b].sum()) - 1


# -------------------------------------------------------------------------------------------- DART

def _brute_dart(feats, vscore, tscore, tfeats, keep, nv, nt, prot):
    """DART greedy by plain Python sorting (no topk): ties cannot occur with random floats."""
    vs = sorted(range(len(vscore)), key=lambda i: -vscore[i])[:nv]
    ts = sorted(range(len(tscore)), key=lambda i: -tscore[i])[:nt]
    forced = set(vs) | {i for i, p in enumerate(prot) if p}
    pool = [i for i in range(len(vscore)) if i not in forced]
    r = keep - len(forced)
    pivots = [feats[i] for i in vs] + [tfeats[i] for i in ts]
    picks = []
    for i, piv in enumerate(pivots):
        n = r // len(pivots) + (1 if i < r % len(pivots) else 0)
        cos = {j: float(F.cosine_similarity(feats[j], piv, dim=0)) for j in pool}
        chosen = sorted(pool, key=lambda j: cos[j])[:n]
        picks += chosen
        pool = [j for j in pool if j not in chosen]
    return sorted(forced | set(picks))


@pytest.mark.parametrize("keep,prot", [(9, ()), (7, (3, 10)), (3, ())])
def test_dart_greedy_brute_force(keep, prot):
    g = torch.Generator().manual_seed(keep)
    # sequence: 2 system tokens, 12 vision tokens, 5 text tokens
    s, nvis, b, kv, hd, d = 19, 12, 1, 2, 4, 8
    vm = torch.zeros(b, s, dtype=torch.bool)
    vm[:, 2:2 + nvis] = True
    tm = torch.zeros(b, s, dtype=torch.bool)
    tm[:, 2 + nvis:] = True
    protected = torch.zeros(b, s, dtype=torch.bool)
    for p in prot:
        protected[0, 2 + p] = True
    keys = torch.randn(b, kv, s, hd, generator=g)
    hidden = torch.randn(b, s, d, generator=g)
    ctx = {"vision_mask": vm, "text_mask": tm, "protected": protected, "keys": keys, "values": keys,
           "hidden": hidden, "norm": lambda x: x * 2.0, "attn": None}
    got = D.dart_select(keep, vision_pivots=2, text_pivots=2)(ctx)
    score = keys.abs().sum(dim=(1, 3))[0]
    vis = list(range(2, 2 + nvis))
    txt = list(range(2 + nvis, s))
    expect = _brute_dart([hidden[0, i] for i in vis], [float(score[i]) for i in vis],
                         [float(score[i]) for i in txt], [hidden[0, i] for i in txt], keep, 2, 2,
                         [bool(protected[0, i]) for i in vis])
    assert got.tolist() == [[0, 1] + [2 + i for i in expect] + txt]
    if keep >= 2 + len(prot):
        assert len(expect) == keep


def test_dart_rejects_small_budget_and_short_text():
    ctx = {"vision_mask": torch.tensor([[0, 1, 1, 1, 0, 0]]).bool(), "text_mask": torch.tensor([[0, 0, 0, 0, 1, 1]]).bool(),
           "protected": torch.zeros(1, 6, dtype=torch.bool), "keys": torch.randn(1, 1, 6, 2),
           "hidden": torch.randn(1, 6, 4), "norm": lambda x: x}
    with pytest.raises(ValueError):
        D.dart_select(1, vision_pivots=2, text_pivots=2)(ctx)
    with pytest.raises(ValueError):
        D.dart_select(3, vision_pivots=1, text_pivots=3)(ctx)


@pytest.mark.parametrize("criterion", D.CRITERIA)
def test_dart_on_tiny_llava(criterion):
    model = _model()
    ex, (emb, am, pos, vm) = _inputs(2, 2)
    seen = {}
    sel = D.dart_select(9, criterion=criterion)

    def spy(ctx):
        seen["ctx"] = ctx
        return sel(ctx)

    out = R.lm_generate(model, emb, am, pos, selects={2: spy}, vision_mask=vm, max_new_tokens=2)
    keep = out["keep"]
    ctx = seen["ctx"]
    for b in range(2):
        kept = set(keep[b].tolist())
        assert set((~vm[b]).nonzero()[:, 0].tolist()) <= kept  # text, system and padding all kept
        blocks = R.image_blocks(vm[b])
        assert blocks.shape == (2, V)
        for blk in blocks:
            assert len(kept & set(blk.tolist())) == 9
            if criterion in ("k_norm", "v_norm", "attn_max", "attn_min"):
                src = {"k_norm": ctx["keys"], "v_norm": ctx["values"]}.get(criterion)
                score = src.abs().sum(dim=(1, 3))[b] if src is not None else ctx["attn"][b, :, -1].mean(0)
                if criterion == "attn_min":
                    score = -score
                piv = blk[torch.topk(score[blk], 4).indices]
                assert set(piv.tolist()) <= kept
    assert out["kv_lens"] == [emb.shape[1]] * 2 + [emb.shape[1] - 2 * (V - 9)] * 2


def test_dart_honours_protected():
    model = _model()
    ex, (emb, am, pos, vm) = _inputs(1)
    prot = torch.zeros_like(vm)
    vis = vm[0].nonzero()[:, 0]
    prot[0, vis[[0, 7, 20, 35]]] = True
    out = R.lm_generate(model, emb, am, pos, selects={2: D.dart_select(6)}, vision_mask=vm, protected=prot,
                        max_new_tokens=1)
    kept = set(out["keep"][0].tolist())
    assert set(vis[[0, 7, 20, 35]].tolist()) <= kept
    assert len(kept & set(vis.tolist())) == 6


# ------------------------------------------------------------------------------------------- random

def test_random_is_seed_deterministic():
    model = _model()
    ex, (emb, am, pos, vm) = _inputs(2, 2)
    runs = [R.lm_generate(model, emb, am, pos, selects={1: D.random_select(5, seed=s)}, vision_mask=vm,
                          max_new_tokens=1)["keep"] for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    u = torch.rand((2, 2, V), generator=torch.Generator().manual_seed(3))
    for b in range(2):
        for i, blk in enumerate(R.image_blocks(vm[b])):
            expect = blk[torch.topk(u[b, i], 5).indices].sort().values
            assert torch.equal(runs[0][b][torch.isin(runs[0][b], blk)], expect)
    p = D.random_patches(4, V, 7, seed=1)
    assert p.shape == (4, 7) and torch.equal(p, D.random_patches(4, V, 7, seed=1))
    assert bool((p[:, 1:] > p[:, :-1]).all())
    assert not torch.equal(p, D.random_patches(4, V, 7, seed=2))
    prot = torch.zeros(4, V, dtype=torch.bool)
    prot[:, 11] = True
    assert bool(torch.isin(torch.tensor(11), D.random_patches(4, V, 2, protected=prot)[0]))


# ------------------------------------------------------------------------------------ MustDrop merge

def test_merge_everything_and_nothing():
    model = _model()
    ex, _ = _inputs(1)
    h, ctx = _layer0_states(model, ex)
    h2, idx, valid = M.merge_hook(tau=-1.0)(h, ctx)
    assert h2.shape[1] == 1 + 4 and bool(valid.all())
    assert idx[0].tolist() == [0, 1, 4, 19, 22]  # CLS + the top-left patch of each 3x3 tile
    for t, m in enumerate(M.tile_members(6, 3)):
        torch.testing.assert_close(h2[0, 1 + t], h[0, 1 + m].mean(0), atol=1e-6, rtol=0)
    assert torch.equal(h2[0, 0], h[0, 0])  # CLS untouched
    out = R.llava_vision(model, ex.pixel_values, after_layer={0: M.merge_hook(tau=-1.0)})
    assert out["patch_index"][0].tolist() == [0, 3, 18, 21] and out["features"].shape[1] == 4

    plain = R.llava_vision(model, ex.pixel_values)
    none = R.llava_vision(model, ex.pixel_values, after_layer={0: M.merge_hook(tau=2.0)})
    assert torch.equal(none["features"], plain["features"]) and torch.equal(none["patch_index"], plain["patch_index"])


def test_merge_threshold_and_static_capacity():
    model = _model()
    ex, _ = _inputs(1)
    h, ctx = _layer0_states(model, ex)
    tiles = M.tile_members(6, 3)
    score = M.tile_scores(h[0, 1:], tiles)
    ref = float(F.cosine_similarity(h[0, 1 + tiles[0]][:, None], h[0, 1 + tiles[0]][None], dim=-1)
                .fill_diagonal_(0).sum() / 72)
    assert math.isclose(float(score[0]), ref, abs_tol=1e-6)
    order = torch.argsort(score, descending=True).tolist()
    tau = float(score[order[1]])  # exactly the two best tiles pass
    _, idx, valid = M.merge_hook(tau=tau)(h, ctx)
    assert idx.shape[1] == 1 + V - 16 and bool(valid.all())

    # static, default capacity: same merges, padded back to 36 slots; fillers are the merged-away slots
    h_s, idx_s, valid_s = M.merge_hook(tau=tau, mode="static")(h, ctx)
    assert idx_s.shape[1] == 1 + V and int(valid_s.sum()) == 1 + V - 16
    assert torch.equal(idx_s[valid_s], idx[0])
    assert torch.equal(h_s[valid_s], M.merge_hook(tau=tau)(h, ctx)[0][0])
    dropped = ~valid_s[0]
    assert torch.equal(h_s[0][dropped], h[0][dropped])  # fillers keep their own state

    # static with capacity below what tau gives: merges continue in descending score below tau
    h_c, idx_c, valid_c = M.merge_hook(tau=2.0, mode="static", capacity=28)(h, ctx)
    assert idx_c.shape[1] == 1 + 28 and int(valid_c.sum()) == 1 + 28
    assert set(idx_c[0].tolist()) == {0} | {1 + p for p in range(V)} - {1 + p for p in tiles[order[0]][1:].tolist()}
    _, idx_c, valid_c = M.merge_hook(tau=2.0, mode="static", capacity=25)(h, ctx)
    assert idx_c.shape[1] == 1 + 25 and int(valid_c.sum()) == 1 + 20  # two tiles merged: 20 left, 5 fillers
    with pytest.raises(ValueError):
        M.merge_hook(tau=2.0, mode="static", capacity=3)(h, ctx)


# -------------------------------------------------------------------------------------- key set

def test_key_set_size():
    cls_attn = torch.rand(3, V, generator=torch.Generator().manual_seed(0))
    ks = M.key_set(cls_attn)
    assert ks.sum(1).tolist() == [math.ceil(0.08 * V)] * 3
    assert torch.equal(ks[0], cls_attn[0] >= cls_attn[0].topk(3).values[-1])
    valid = torch.ones(3, V, dtype=torch.bool)
    valid[:, :20] = False
    ks = M.key_set(cls_attn, 0.1, valid=valid)
    assert ks.sum(1).tolist() == [2] * 3 and not bool((ks & ~valid).any())


# ---------------------------------------------------------------------------------------- filter

def _filter_run(gamma, alpha, mode="exact", capacity=None, prot_slots=()):
    model = _model()
    ex, (emb, am, pos, vm) = _inputs(1)
    prot = torch.zeros_like(vm)
    vis = vm[0].nonzero()[:, 0]
    for p in prot_slots:
        prot[0, vis[p]] = True
    seen = {}
    sel = M.filter_select(gamma, alpha, mode, capacity)

    def spy(ctx):
        seen["ctx"], seen["out"] = ctx, sel(ctx)
        return seen["out"]

    out = R.lm_generate(model, emb, am, pos, selects={2: spy}, vision_mask=vm, protected=prot, max_new_tokens=1)
    return out, seen, vis


def test_filter_exact():
    out, _, _ = _filter_run(0.0, 0.0)
    assert out["kv_lens"] == [out["kv_lens"][0]] * 4 and bool(out["kv_valid"][3].all())
    out, seen, vis = _filter_run(2.0, 2.0, prot_slots=(4, 9))  # nothing passes the rule
    assert set(out["keep"][0].tolist()) & set(vis.tolist()) == {int(vis[4]), int(vis[9])}
    # the rule itself, recomputed
    ctx = seen["ctx"]
    a = ctx["attn"].mean(1)[0][ctx["text_mask"][0]][:, vis]
    gamma, alpha = 0.0278, 0.0235  # the tiny model's attention is near uniform (1/36 = 0.0278)
    rule = (a.sum(0) >= gamma * a.sum()) | (a.amax(0) >= alpha)
    assert 0 < int(rule.sum()) < V
    out, _, _ = _filter_run(gamma, alpha)
    assert set(out["keep"][0].tolist()) & set(vis.tolist()) == set(vis[rule].tolist())


@pytest.mark.parametrize("gamma,alpha", [(0.0278, 0.0235), (2.0, 0.0235)])  # (2.0: the col_max rule only)
def test_filter_static_capacity(gamma, alpha):
    _, seen, vis = _filter_run(gamma, alpha)
    ctx = seen["ctx"]
    a = ctx["attn"].mean(1)[0][ctx["text_mask"][0]][:, vis]
    col_sum = a.sum(0)
    rule = (col_sum >= gamma * a.sum()) | (a.amax(0) >= alpha)
    n_rule = int(rule.sum())
    for cap in (n_rule + 4, max(n_rule - 3, 3)):
        out, seen, _ = _filter_run(gamma, alpha, "static", cap, prot_slots=(0, 1))
        kept_vis = [i for i, t in enumerate(vis.tolist()) if t in set(out["keep"][0].tolist())]
        assert len(kept_vis) == cap and {0, 1} <= set(kept_vis)
        valid = out["kv_valid"][2][0][torch.isin(out["keep"][0], vis)]
        expect = (rule | torch.isin(torch.arange(V), torch.tensor([0, 1])))[kept_vis]
        assert torch.equal(valid, expect)
        n_valid = int((rule | torch.isin(torch.arange(V), torch.tensor([0, 1]))).sum())
        assert int(valid.sum()) == min(cap, n_valid)
        if cap >= n_valid:  # room for every rule-kept token; the rest filled by col_sum
            assert set(rule.nonzero()[:, 0].tolist()) <= set(kept_vis)
            rest = [j for j in range(V) if not rule[j] and j > 1]
            top_rest = sorted(rest, key=lambda j: -float(col_sum[j]))[:cap - n_valid]
            assert set(kept_vis) == set(rule.nonzero()[:, 0].tolist()) | {0, 1} | set(top_rest)
        # ranking: every rule-kept token that was dropped has lower col_sum than every kept one of its tier
        dropped_rule = [j for j in range(V) if rule[j] and j not in kept_vis and j > 1]
        kept_rule = [j for j in kept_vis if rule[j] and j > 1]
        if dropped_rule and kept_rule:
            assert max(col_sum[dropped_rule]) <= min(col_sum[kept_rule])
    with pytest.raises(ValueError):
        _filter_run(gamma, alpha, "static", 1, prot_slots=(0, 1))


def test_filter_presets():
    assert M.FILTER_PRESETS == {192: (0.001, 0.001), 128: (0.0012, 0.001), 64: (0.011, 0.01)}


# ------------------------------------------------------------------------------------------ pipeline

@pytest.mark.parametrize("mode", ["exact", "static"])
def test_mustdrop_end_to_end(mode):
    model = _model()
    ex, _ = _inputs(1)
    h, ctx = _layer0_states(model, ex)
    tau = float(M.tile_scores(h[0, 1:], M.tile_members(6, 3)).sort(descending=True).values[1])
    cap = 10 if mode == "static" else None
    out = M.mustdrop_reference(model, ex, tau=tau, gamma=0.05, alpha=1.0, mode=mode, capacity_filter=cap,
                               max_new_tokens=3)
    s0 = ex.input_ids.shape[1]
    n_slots = V - 16 if mode == "exact" else V
    assert out["patch_index"].shape == (1, n_slots)
    assert int(out["vision"]["valid"].sum()) == V - 16
    assert int(out["protected"].sum()) == math.ceil(0.08 * (V - 16))
    s = s0 - V + n_slots
    lens = out["kv_lens"]
    assert lens[0] == lens[1] == s  # layers before the first filter keep everything
    assert lens[2] == lens[3] == out["keep"].shape[1] < s  # cut to the last filter's set
    assert torch.equal(out["kv_index"][2], out["kv_index"][3]) and torch.equal(out["kv_index"][3], out["keep"])
    if mode == "static":
        assert lens[2] == s - n_slots + cap
    # the protected tokens survive both filters
    emb, am, pos, vm, prot = out["inputs"]
    assert bool(torch.isin(prot[0].nonzero()[:, 0], out["keep"][0]).all())
    assert pos[0].max() == am[0].sum() - 1  # compact positions
    assert out["tokens"].shape == (1, 3)
    # without the cut, layer 2 keeps the first filter's (larger or equal) set
    un = M.mustdrop_reference(model, ex, tau=tau, gamma=0.05, alpha=1.0, mode=mode, capacity_filter=cap,
                              cut=False, max_new_tokens=1)
    assert un["kv_lens"][2] >= lens[2] and un["kv_lens"][3] == lens[3]
