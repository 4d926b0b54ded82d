"""Property tests (hypothesis) of DART, random, MustDrop and the newer methods (VisionZip, DivPrune, CDPruner,
VisPruner, PyramidDrop): the key set survives every later pass, text tokens are never dropped, merged
tokens are convex combinations of their tile (MustDrop) or their target plus their group's mean
(VisionZip), greedy selections are what a brute-force loop picks, and kept counts honour budgets and
capacities. End-to-end properties run few examples on the tiny LLaVA; the building blocks
(passes.mustdrop.merge_windows / filter_tokens, passes.dart.dart_keep, passes.visionzip.zip_tokens,
passes.vispruner.important_diverse, graphprune.rewrite.blocks / tokenops) are checked on random tensors."""
import math

import pytest
import reference as R
import reference_mustdrop as RM
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import graphprune as gp
from graphprune import tokenops
from graphprune.errors import InputError
from graphprune.passes.dart import dart_keep
from graphprune.passes.mustdrop import filter_tokens, merge_windows
from graphprune.rewrite import blocks
from graphprune.tools.zoo import llava_example

V = 36
FEW = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
MANY = settings(max_examples=30, deadline=None)


def _prompt_slots(model, ex, patch_index, chosen):
    """Processor-prompt indices, per sample, of the image slots patch_index[i][chosen[i]]."""
    img_id = model.config.image_token_id
    b = ex.input_ids.shape[0]
    per = patch_index.shape[0] // b
    out = []
    for bi in range(b):
        slots = R.image_blocks(ex.input_ids[bi] == img_id, per)
        out.append({int(slots[j][p]) for j in range(per) for p in patch_index[bi * per + j][chosen[bi * per + j]]})
    return out


def _image_counts(model, ex, kept):
    """(B, images) number of kept image tokens of each image (images: contiguous image-token runs)."""
    img = ex.input_ids == model.config.image_token_id
    rows = []
    for b in range(kept.shape[0]):
        blocks_ = R.image_blocks(img[b])
        rows.append([int(torch.isin(kept[b], blk).sum()) for blk in blocks_])
    return rows


# ------------------------------------------------------------------------ the key set survives

@FEW
@given(ratio=st.sampled_from([0.05, 0.1, 0.2]), merge=st.booleans(),
       follow=st.sampled_from(["filter", "filter_rule_off", "dart", "random"]), extra=st.integers(0, 3))
def test_key_set_survives_later_passes(llava, ratio, merge, follow, extra):
    model, program = llava
    ex = llava_example(model, batch=2, pad=(0, 3), seed=2)
    hook = {0: RM.merge_hook(3, 1.0, "static", 30)} if merge else None   # one tile merged below tau: 28 valid
    vis = R.llava_vision(model, ex.pixel_values, after_layer=hook)
    keys = RM.key_set(vis["cls_attn"], ratio, valid=vis["valid"])
    n_prot = math.ceil(ratio * (28 if merge else V))
    assert keys.sum(1).tolist() == [n_prot] * 2
    protected = _prompt_slots(model, ex, vis["patch_index"], keys)

    steps = ["mustdrop_merge(tau=1.0, mode='static', capacity=30, order='raster')"] if merge else []
    steps.append(f"mustdrop_keys(ratio={ratio})")
    if follow.startswith("filter"):
        g, a = (2.0, 2.0) if follow == "filter_rule_off" else (0.0278, 0.0235)
        steps.append(f"mustdrop_filter(layers=(2, 3), gamma={g}, alpha={a}, mode='static', capacity={n_prot + extra}, "
                     "placement='before', positions='keep')")
    elif follow == "dart":
        steps.append(f"dart(keep={n_prot + 4 + extra}, layer=2)")
    else:
        steps.append(f"random(keep={n_prot + extra}, layer=3, seed={extra})")
    out = gp.prune(model, " | ".join(steps), program=program)(**ex.as_kwargs())
    for b in range(2):
        assert protected[b] <= set(out.kept[b].tolist())
    if follow == "filter_rule_off":          # nothing passes the rule: the valid vision slots are the key set
        img = ex.input_ids.gather(1, out.kept) == model.config.image_token_id
        valid = out.cache[-1].mask.bool() & img
        for b in range(2):
            assert set(out.kept[b][valid[b]].tolist()) == protected[b]


def test_dart_keeps_key_set_when_pivots_overflow_budget(llava):
    """8 key tokens (ceil(0.2 x 36)) and 4 vision pivots, keep=9: either every key token survives (pivots
    give way) or the prompt is rejected with an InputError, as the reference does; never a silent drop."""
    model, program = llava
    ex = llava_example(model)
    vis = R.llava_vision(model, ex.pixel_values)
    keys = RM.key_set(vis["cls_attn"], 0.2)
    protected = _prompt_slots(model, ex, vis["patch_index"], keys)[0]
    assert len(protected) == 8
    pruned = gp.prune(model, "mustdrop_keys(ratio=0.2) | dart(keep=9, layer=2)", program=program)
    try:
        out = pruned(**ex.as_kwargs())
    except InputError:
        return
    assert _image_counts(model, ex, out.kept) == [[9]]
    assert protected <= set(out.kept[0].tolist())


# --------------------------------------------------- text never dropped; counts honour budgets

@FEW
@given(method=st.sampled_from(["dart", "random", "filter_static", "filter_exact"]), layer=st.integers(1, 3),
       pad=st.integers(0, 4), data=st.data())
def test_text_kept_and_counts(llava, method, layer, pad, data):
    model, program = llava
    batch = 1 if method == "filter_exact" else 2
    ex = llava_example(model, batch=batch, pad=(0, pad)[:batch], seed=pad)
    if method == "dart":
        keep = data.draw(st.one_of(st.integers(4, V), st.sampled_from([0.25, 0.5])), "keep")
        tp = data.draw(st.integers(0, 7 - pad if batch > 1 else 7), "text_pivots")
        crit = data.draw(st.sampled_from(["k_norm", "v_norm", "attn_max", "attn_min", "random"]), "criterion")
        pruned = gp.prune(model, "dart", keep=keep, layer=layer, text_pivots=tp, criterion=crit, program=program)
        expect = keep if isinstance(keep, int) else round(keep * V)
    elif method == "random":
        keep = data.draw(st.one_of(st.integers(1, V), st.sampled_from([0.1, 0.9])), "keep")
        pruned = gp.prune(model, "random", keep=keep, layer=layer, seed=layer, program=program)
        expect = keep if isinstance(keep, int) else round(keep * V)
    else:
        gamma = data.draw(st.sampled_from([0.0, 0.02, 0.0278, 0.035, 2.0]), "gamma")
        alpha = data.draw(st.sampled_from([0.0235, 0.03, 2.0]), "alpha")
        opts = dict(layers=(layer,), gamma=gamma, alpha=alpha, placement="before", positions="keep")
        if method == "filter_static":
            cap = data.draw(st.integers(1, V + 6), "capacity")   # capacities above V clamp to V
            pruned = gp.prune(model, "mustdrop_filter", mode="static", capacity=cap, program=program, **opts)
            expect = min(cap, V)
        else:
            pruned = gp.prune(model, "mustdrop_filter", mode="exact", program=program, **opts)
            expect = _rule_count(model, ex, layer, gamma, alpha)
    out = pruned(**ex.as_kwargs())
    img = ex.input_ids == model.config.image_token_id
    for b in range(batch):
        kept = out.kept[b].tolist()
        assert kept == sorted(set(kept))                                          # unique, ascending
        assert set((~img[b]).nonzero()[:, 0].tolist()) <= set(kept)              # every non-image token stays
    assert _image_counts(model, ex, out.kept) == [[expect]] * batch
    if method == "filter_static":                                                 # valid slots <= capacity
        valid = out.cache[-1].mask.bool() & img.gather(1, out.kept)
        rule = _rule_count(model, ex, layer, gamma, alpha, sample=0)
        assert int(valid[0].sum()) == min(rule, expect) and int(valid.sum(1).max()) <= expect


@pytest.mark.parametrize("merge_capacity,capacity,expect", [(None, 40, V), (30, 32, 30)])
def test_static_filter_capacity_above_tokens_keeps_all(llava, merge_capacity, capacity, expect):
    model, program = llava
    ex = llava_example(model)
    steps = [] if merge_capacity is None else [f"mustdrop_merge(tau=0.01, capacity={merge_capacity}, order='raster')"]
    steps.append(f"mustdrop_filter(layers=(2,), gamma=0.0278, alpha=0.0235, mode='static', capacity={capacity}, "
                 "placement='before', positions='keep')")
    out = gp.prune(model, " | ".join(steps), program=program)(**ex.as_kwargs())
    assert _image_counts(model, ex, out.kept) == [[expect]]


def _rule_count(model, ex, layer, gamma, alpha, sample=0):
    """How many vision tokens of `sample` pass MustDrop's dual-attention rule before `layer`, from the
    reference's attention of layer-1 (text rows, the image's columns)."""
    emb, am, pos, vm = R.llava_inputs(model, ex)
    seen = {}

    def spy(ctx):
        seen["ctx"] = ctx
        return torch.arange(vm.shape[1]).expand(vm.shape[0], -1)

    R.lm_generate(model, emb, am, pos, selects={layer: spy}, max_new_tokens=1, vision_mask=vm)
    ctx = seen["ctx"]
    a = ctx["attn"].float().mean(1)[sample][ctx["text_mask"][sample]][:, ctx["vision_mask"][sample]]
    col_sum, col_max = a.sum(0), a.amax(0)
    return int(((col_sum >= gamma * a.sum()) | (col_max >= alpha)).sum())


# -------------------------------------------------- merges: convex combinations, counts, capacity

def _tiles(g, w):
    return [[r * g + c for r in range(r0, min(r0 + w, g)) for c in range(c0, min(c0 + w, g))]
            for r0 in range(0, g, w) for c0 in range(0, g, w)]


def _tile_score(x, members):
    n = len(members)
    if n < 2:
        return None
    s = sum(float(F.cosine_similarity(x[i], x[j], dim=0)) for i in members for j in members if i != j)
    return s / (n * (n - 1))


@MANY
@given(g=st.integers(2, 7), window=st.integers(2, 4), b=st.integers(1, 2), n=st.integers(1, 2),
       d=st.integers(2, 6), mode=st.sampled_from(["exact", "static"]), tau=st.sampled_from([-1.0, 0.0, 0.4, 0.8, 2.0]),
       spread=st.sampled_from([0.2, 1.0, 3.0]), seed=st.integers(0, 10_000), data=st.data())
def test_merge_windows_convex_and_counts(g, window, b, n, d, mode, tau, spread, seed, data):
    assume(window <= g)
    v = g * g
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, n, 1, d, generator=gen) + spread * torch.randn(b, n, v, d, generator=gen)
    tiles = _tiles(g, window)
    capacity = data.draw(st.integers(len(tiles), v), "capacity") if mode == "static" else None
    # which tiles merge, by the contract, per image
    merged = {}
    for i in range(b):
        for j in range(n):
            sc = [_tile_score(hidden[i, j], t) for t in tiles]
            order = sorted((t for t in range(len(tiles)) if sc[t] is not None), key=lambda t: -sc[t])
            if mode == "exact":
                merged[i, j] = {t for t in order if sc[t] >= tau}
            else:
                alive, m = v, set()
                for t in order:
                    if sc[t] >= tau or alive > capacity:
                        m.add(t)
                        alive -= len(tiles[t]) - 1
                merged[i, j] = m
    survivors = {k: sorted(set(range(v)) - {p for t in m for p in tiles[t][1:]}) for k, m in merged.items()}
    # k: the static capacity (None in exact mode), as the framework passes a Choose rule's budget
    kw = dict(k=capacity, protected=None, valid=None, vision_pos=torch.zeros(b, n, v, dtype=torch.long),
              hidden=hidden, window=window, tau=tau, mode=mode, order="raster")
    counts = {len(s) for s in survivors.values()}
    if mode == "exact" and len(counts) > 1:
        with pytest.raises(InputError, match="static"):
            merge_windows(**kw)
        return
    res = merge_windows(**kw)
    picked, values = res["picked"], res["values"]
    width = counts.pop() if mode == "exact" else capacity
    assert picked.shape == (b, n, width) and values.shape == (b, n, width, d)
    for (i, j), surv in survivors.items():
        slots = picked[i, j].tolist()
        assert slots == sorted(set(slots))
        if mode == "exact":
            assert slots == surv
        else:                                  # survivors are valid; fillers are the lowest merged-away slots
            valid = res["valid"][i, j]
            assert [p for p, ok in zip(slots, valid.tolist()) if ok] == surv
            assert int(valid.sum()) == len(surv) <= capacity
            gone = sorted(set(range(v)) - set(surv))
            assert [p for p, ok in zip(slots, valid.tolist()) if not ok] == gone[:capacity - len(surv)]
        # weights from the tile membership: a merged representative averages its tile, the rest are themselves
        w = torch.zeros(width, v)
        rep = {tiles[t][0]: tiles[t] for t in merged[i, j]}
        for r, p in enumerate(slots):
            members = rep.get(p, [p])
            if mode == "static" and not bool(res["valid"][i, j, r]):
                members = [p]                  # an invalid filler keeps its own state
            w[r, members] = 1.0 / len(members)
        assert bool((w >= 0).all()) and torch.allclose(w.sum(1), torch.ones(width))
        torch.testing.assert_close(values[i, j].float(), w @ hidden[i, j].float(), atol=1e-5, rtol=1e-5)


@MANY
@given(g=st.integers(1, 9), window=st.integers(1, 5))
def test_tile_members_partition_the_grid(g, window):
    members, real = blocks.tile_members(g, window)
    side = -(-g // window)
    assert members.shape == (side * side, window * window)
    flat = members[real].tolist()
    assert sorted(flat) == list(range(g * g))                         # every patch in exactly one tile
    for t in range(members.shape[0]):
        m = members[t][real[t]]
        assert int(m[0]) == int(m.min())                               # representative: first in raster order
        rows, cols = (m // g).tolist(), (m % g).tolist()
        assert max(rows) - min(rows) < window and max(cols) - min(cols) < window
    assert blocks.grid_side(g * g) == g


@MANY
@given(g=st.integers(2, 6), window=st.integers(2, 3), d=st.integers(2, 5), seed=st.integers(0, 999))
def test_tile_scores_mean_pairwise_cosine(g, window, d, seed):
    x = torch.randn(g * g, d, generator=torch.Generator().manual_seed(seed))
    members, real = blocks.tile_members(g, window)
    got = blocks.tile_scores(x, members, real)
    for t, tile in enumerate(_tiles(g, window)):
        s = _tile_score(x, tile)
        if s is None:
            assert got[t] == float("-inf")
        else:
            assert math.isclose(float(got[t]), s, abs_tol=1e-5)


def test_grid_side_rejects_non_square():
    with pytest.raises(InputError, match="square"):
        blocks.grid_side(35)


# ------------------------------------------------------- selection rules on random tensors

@MANY
@given(b=st.integers(1, 2), n=st.integers(1, 2), v=st.integers(2, 20), t=st.integers(1, 5),
       mode=st.sampled_from(["exact", "static"]), gamma=st.sampled_from([0.0, 0.05, 0.1, 2.0]),
       alpha=st.sampled_from([0.02, 0.1, 2.0]), seed=st.integers(0, 999), data=st.data())
def test_filter_tokens_counts_and_protection(b, n, v, t, mode, gamma, alpha, seed, data):
    gen = torch.Generator().manual_seed(seed)
    attn = torch.rand(b, t, n, v, generator=gen) / v
    n_prot = data.draw(st.integers(0, v), "protected")
    protected = torch.zeros(b, n, v, dtype=torch.bool)
    protected[..., torch.randperm(v, generator=gen)[:n_prot]] = True
    col_sum, col_max = attn.sum(1), attn.amax(1)
    rule = (col_sum >= gamma * col_sum.sum(-1, keepdim=True)) | (col_max >= alpha) | protected
    kw = dict(protected=protected, valid=None, vision_pos=torch.zeros(b, n, v, dtype=torch.long),
              attn=attn, gamma=gamma, alpha=alpha, mode=mode)
    if mode == "exact":
        counts = rule.sum(-1)
        if bool((counts != counts.reshape(-1)[0]).any()):
            with pytest.raises(InputError, match="static"):
                filter_tokens(k=None, **kw)
            return
        picked = filter_tokens(k=None, **kw)
        assert picked.shape[-1] == int(counts.reshape(-1)[0])       # exact: the rule's count
        assert torch.equal(torch.zeros_like(rule).scatter(-1, picked, True), rule)
        return
    cap = data.draw(st.integers(max(1, n_prot), v), "capacity")
    res = filter_tokens(k=cap, **kw)          # the framework passes k = the capacity (at most V)
    picked, valid = res["picked"], res["valid"]
    assert picked.shape[-1] == min(cap, v)                           # static: exactly min(C, V) slots
    assert bool((picked[..., 1:] > picked[..., :-1]).all())
    assert torch.equal(valid, rule.gather(-1, picked))              # valid iff protected or kept by the rule
    assert bool((valid.sum(-1) == rule.sum(-1).clamp(max=min(cap, v))).all())
    inside = torch.zeros_like(rule).scatter(-1, picked, True)
    assert not bool((protected & ~inside).any())                     # every protected token retained


@MANY
@given(b=st.integers(1, 2), n=st.integers(1, 2), v=st.integers(6, 24), t=st.integers(4, 6),
       pv=st.integers(0, 4), pt=st.integers(0, 4), n_prot=st.integers(0, 3), lowest=st.booleans(),
       seed=st.integers(0, 999), data=st.data())
def test_dart_keep_exact_budget(b, n, v, t, pv, pt, n_prot, lowest, seed, data):
    assume(pv + pt > 0 and pv + n_prot <= v)
    k = data.draw(st.integers(pv + n_prot, v), "keep")
    assume(k >= 1)
    gen = torch.Generator().manual_seed(seed)
    d = 5
    protected = torch.zeros(b, n, v, dtype=torch.bool)
    protected[..., torch.randperm(v, generator=gen)[:n_prot]] = True
    vis_score, text_score = torch.randn(b, n, v, generator=gen), torch.randn(b, t, generator=gen)
    picked = dart_keep(k=k, protected=protected, valid=None, vision_pos=torch.zeros(b, n, v, dtype=torch.long),
                       vis_score=vis_score, text_score=text_score, vis_feat=torch.randn(b, n, v, d, generator=gen),
                       text_feat=torch.randn(b, t, d, generator=gen), text_mask=torch.ones(b, t, dtype=torch.bool),
                       vision_pivots=pv, text_pivots=pt, lowest_first=lowest, seed=0)
    assert picked.shape == (b, n, k)                                 # exactly the budget per image
    assert bool((picked[..., 1:] > picked[..., :-1]).all())
    inside = torch.zeros(b, n, v, dtype=torch.bool).scatter(-1, picked, True)
    assert not bool((protected & ~inside).any())
    piv = (-vis_score if lowest else vis_score).topk(pv, dim=-1).indices
    assert bool(inside.gather(-1, piv).all())                        # vision pivots are retained


@MANY
@given(b=st.integers(1, 2), n=st.integers(1, 2), v=st.integers(1, 30), ratio=st.floats(0.01, 1.0),
       seed=st.integers(0, 999), data=st.data())
def test_protect_topk_ceil_fraction_of_valid(b, n, v, ratio, seed, data):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, n, v, generator=gen)
    valid = torch.rand(b, n, v, generator=gen) < data.draw(st.sampled_from([0.5, 1.0]), "density")
    marked = tokenops.protect_topk(scores, None, valid, float(ratio))
    want = torch.ceil(ratio * valid.sum(-1).double()).long()
    assert torch.equal(marked.sum(-1), want)
    assert not bool((marked & ~valid).any())                         # invalid slots are never key tokens
    for i in range(b):
        for j in range(n):
            if int(want[i, j]):
                top = scores[i, j].masked_fill(~valid[i, j], float("-inf")).topk(int(want[i, j])).indices
                assert bool(marked[i, j, top].all())


# --------------------------------------- the newer methods (VisionZip, DivPrune, CDPruner, VisPruner,
# PyramidDrop): text never dropped, exact counts, building blocks on random tensors

NEW_METHODS = {
    "visionzip": lambda keep, d: f"visionzip(keep={keep}, contextual={d.draw(st.integers(0, min(keep - 1, 36 - keep)), 'c')})",
    "divprune": lambda keep, d: f"divprune(keep={keep})",
    "cdpruner": lambda keep, d: f"cdpruner(keep={keep})",
    "vispruner": lambda keep, d: f"vispruner(keep={keep}, important_ratio={d.draw(st.sampled_from([0.0, 0.3, 1.0]), 'r')})",
    "pyramiddrop": lambda keep, d: f"pyramiddrop(layers=(1, 3), ratios=(0.5, {keep / V}))",
}


@FEW
@given(method=st.sampled_from(sorted(NEW_METHODS)), pad=st.integers(0, 4), keep=st.integers(2, 18), data=st.data())
def test_new_methods_keep_text_and_count(llava, method, pad, keep, data):
    model, program = llava
    ex = llava_example(model, batch=2, pad=(0, pad), seed=pad)
    pruned = gp.prune(model, NEW_METHODS[method](keep, data), program=program)
    out = pruned(**ex.as_kwargs())
    img = ex.input_ids == model.config.image_token_id
    for b in range(2):
        kept = out.kept[b].tolist()
        assert kept == sorted(set(kept))
        assert set((~img[b]).nonzero()[:, 0].tolist()) <= set(kept)
    assert _image_counts(model, ex, out.kept) == [[keep]] * 2
    assert bool(torch.isfinite(out.logits[out.cache[-1].mask.bool()]).all())


@MANY
@given(b=st.integers(1, 2), n=st.integers(1, 2), v=st.integers(2, 20), d=st.integers(2, 6), seed=st.integers(0, 999),
       data=st.data())
def test_farthest_point_select_is_greedy_max_min(b, n, v, d, seed, data):
    """Exactly k distinct valid picks, protected ones among them, each greedy pick the (first) token farthest
    from the chosen set, checked against a brute-force loop."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, v, d, generator=g)
    dist = 1 - blocks.cosine_matrix(x)
    k = data.draw(st.integers(1, v), "k")
    protected = torch.rand(b, n, v, generator=g) < 0.15
    protected &= protected.cumsum(-1) <= k
    use_prot = data.draw(st.booleans(), "protect")
    chosen = blocks.farthest_point_select(dist, k, protected if use_prot else None)
    assert chosen.sum(-1).eq(k).all()
    if use_prot:
        assert bool((chosen | ~protected).all())
    for bi in range(b):
        for ni in range(n):
            dd = dist[bi, ni]
            sel = protected[bi, ni].nonzero()[:, 0].tolist() if use_prot else []
            while len(sel) < k:
                if sel:
                    score = dd[sel].amin(0)
                else:
                    score = dd.topk(min(2, v), dim=0, largest=False).values[-1]
                score = score.masked_fill(torch.tensor([j in sel for j in range(v)]), float("-inf"))
                sel.append(int(score.argmax()))
            assert sorted(sel) == chosen[bi, ni].nonzero()[:, 0].tolist()


@MANY
@given(n=st.integers(2, 16), k=st.integers(1, 16), seed=st.integers(0, 999))
def test_dpp_greedy_select_counts_and_valid(n, k, seed):
    assume(k <= n)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, n + 2, generator=g)
    kernel = x @ x.transpose(-1, -2) + 0.5 * torch.eye(n)
    valid = torch.rand(2, n, generator=g) < 0.8
    valid[:, :k] = True
    chosen = blocks.dpp_greedy_select(kernel, k, valid)
    assert chosen.sum(-1).eq(k).all() and bool((chosen <= valid).all())


@MANY
@given(v=st.integers(4, 30), d=st.integers(2, 6), seed=st.integers(0, 999), data=st.data())
def test_visionzip_contextual_tokens_are_target_plus_group_mean(v, d, seed, data):
    """Dominant tokens pass unchanged; each contextual token is its target plus the mean of the remaining
    tokens whose key is most cosine-similar to that target's (brute force); exactly k distinct slots."""
    from graphprune.passes.visionzip import zip_tokens
    g = torch.Generator().manual_seed(seed)
    k = data.draw(st.integers(2, v), "k")
    c = data.draw(st.integers(1, min(k - 1, v - k + 1)), "c")
    hidden, keys = torch.randn(1, 1, v, d, generator=g), torch.randn(1, 1, v, 4, generator=g)
    cls = torch.rand(1, 1, 1, v, generator=g)
    out = zip_tokens(k=k, protected=None, valid=None, vision_pos=torch.zeros(1, 1, v, dtype=torch.long), cls=cls,
                     keys=keys, hidden=hidden, contextual=c, heads=None, authors_order=False)
    picked, values = out["picked"][0, 0].tolist(), out["values"][0, 0]
    assert picked == sorted(set(picked)) and len(picked) == k
    dom = set(cls[0, 0, 0].topk(k - c).indices.tolist())
    rest = [j for j in range(v) if j not in dom]
    targets = rest[::max(1, len(rest) // c)][:c]
    assert set(picked) == dom | set(targets)
    kn = F.normalize(keys[0, 0], dim=-1)
    groups = {t: [] for t in targets}
    for j in rest:
        if j not in targets:
            groups[targets[int((kn[targets] @ kn[j]).argmax())]].append(j)
    for slot, val in zip(picked, values):
        if slot in dom:
            assert torch.equal(val, hidden[0, 0, slot])
        else:
            members = groups[slot]
            mean = hidden[0, 0, members].mean(0) if members else torch.zeros(d)
            torch.testing.assert_close(val, hidden[0, 0, slot] + mean, atol=1e-5, rtol=1e-5)


@MANY
@given(v=st.integers(2, 40), d=st.integers(2, 6), ratio=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
       seed=st.integers(0, 999), data=st.data())
def test_vispruner_keeps_important_and_counts(v, d, ratio, seed, data):
    from graphprune.passes.vispruner import important_diverse
    g = torch.Generator().manual_seed(seed)
    k = data.draw(st.integers(1, v), "k")
    cls = torch.rand(2, 1, 1, v, generator=g)
    picked = important_diverse(k=k, protected=None, valid=None, vision_pos=None, cls=cls,
                               hidden=torch.randn(2, 1, v, d, generator=g), important_ratio=ratio)
    for bi in range(2):
        got = picked[bi, 0].tolist()
        assert got == sorted(set(got)) and len(got) == k
        assert set(cls[bi, 0, 0].topk(int(k * ratio)).indices.tolist()) <= set(got) if int(k * ratio) else True
