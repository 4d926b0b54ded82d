"""DART, random and MustDrop passes against their independent references (tests/reference_dart.py,
tests/reference_mustdrop.py on top of tests/reference.py): kept token sets, prefill logits (fp32,
atol 1e-5 on real tokens), per-layer KV lengths, each layer's cache validity and prompt index, and
16 greedy decode steps through the shrunk caches.

The tiny LLaVA's tile similarities are ~0..0.03 and its attention is nearly uniform, so merge and
filter thresholds are derived from the data (or chosen for it), and every test asserts that the
method actually merged / dropped something, so that it can fail.
"""
import pytest
import reference as R
import reference_dart as D
import reference_mustdrop as RM
import torch

import graphprune as gp
from graphprune.errors import GraphpruneError, PassNotApplicable
from graphprune.tools.zoo import llava_example, qwen2vl_example

STEPS = 16
V = 36                       # 6 x 6 patch grid of the tiny LLaVA
GAMMA, ALPHA = 0.0278, 0.0235   # ~1/36: splits the tiny model's near-uniform attention


# ------------------------------------------------------------------------------------ helpers

def prompt_index(model, ex, patch_index):
    """Processor-prompt index of each token of the reduced prompt that a vision stage leaves: every
    non-image token plus, per image, the image-token slots listed in `patch_index` (n_images, V')."""
    img_id = model.config.image_token_id
    b = ex.input_ids.shape[0]
    per = patch_index.shape[0] // b
    rows = []
    for bi in range(b):
        slots = R.image_blocks(ex.input_ids[bi] == img_id, per)
        text = (ex.input_ids[bi] != img_id).nonzero()[:, 0]
        rows.append(torch.cat([text] + [slots[j][patch_index[bi * per + j]] for j in range(per)]).sort().values)
    return torch.stack(rows)


def _check(pruned, ex, ref, index=None, steps=STEPS):
    """Compare a pruned model with a reference run. `index` maps the reference's prompt (reduced by a
    vision stage) to processor-prompt indices; None: the reference ran on the full prompt."""
    out = pruned(**ex.as_kwargs())
    if index is None:
        index = torch.arange(ex.input_ids.shape[1]).expand_as(ex.input_ids)
    expect = index if ref["keep"] is None else index.gather(1, ref["keep"])
    assert torch.equal(out.kept, expect)
    assert out.cache.lengths() == ref["kv_lens"]
    for i, c in enumerate(out.cache):             # each layer's cache: validity and prompt index per slot
        assert torch.equal(c.mask.bool(), ref["kv_valid"][i]), f"layer {i} cache validity"
        assert torch.equal(c.index, index.gather(1, ref["kv_index"][i])), f"layer {i} cache index"
    real = out.cache[-1].mask.bool()
    assert real.any()
    torch.testing.assert_close(out.logits[real], ref["prefill_logits"][real], atol=1e-5, rtol=1e-5)
    ids = pruned.generate(**ex.as_kwargs(), max_new_tokens=steps, eos_token_id=[])
    assert torch.equal(ids[:, -steps:], ref["tokens"][:, :steps])
    return out


def _vision_tokens(model, ex, kept):
    """Per sample, the set of processor-prompt image-token indices in `kept`."""
    img = ex.input_ids == model.config.image_token_id
    return [set(kept[b][img[b, kept[b]]].tolist()) for b in range(kept.shape[0])]


def _tile_scores(model, ex):
    h = R.llava_vision_layer0(model, ex.pixel_values)
    tiles = RM.tile_members(6, 3)
    return torch.stack([RM.tile_scores(h[i, 1:], tiles) for i in range(h.shape[0])])


def _ex(model, batch=1, **kw):
    return llava_example(model, batch=batch, **kw)


def _ref_lm(model, ex, steps=STEPS, **kw):
    emb, am, pos, vm = R.llava_inputs(model, ex)
    return R.lm_generate(model, emb, am, pos, max_new_tokens=steps, vision_mask=vm, **kw)


# ------------------------------------------------------------------------------------------ DART

DART_CASES = [
    (1, dict(criterion="k_norm")),
    (1, dict(criterion="v_norm")),
    (1, dict(criterion="attn_max")),
    (1, dict(criterion="attn_min")),
    (1, dict(criterion="random", seed=5)),
    (2, dict(criterion="k_norm")),
    (2, dict(criterion="attn_min")),
    (2, dict(criterion="random", seed=1)),
]


@pytest.mark.parametrize("batch,opts", DART_CASES, ids=[f"b{b}-{o['criterion']}" for b, o in DART_CASES])
def test_dart_llava(llava, batch, opts):
    model, program = llava
    ex = _ex(model, batch) if batch == 1 else _ex(model, 2, pad=(0, 3), seed=2)
    ref = _ref_lm(model, ex, selects={2: D.dart_select(9, **opts)})
    out = _check(gp.prune(model, "dart", keep=9, layer=2, order="score", program=program, **opts), ex, ref)
    assert [len(s) for s in _vision_tokens(model, ex, out.kept)] == [9] * batch


@pytest.mark.parametrize("vision_pivots,text_pivots", [(8, 0), (0, 8)])
def test_dart_vision_or_text_pivots_only(llava, vision_pivots, text_pivots):
    model, program = llava
    ex = _ex(model, 1, suffix=10, seed=3)                 # 10 instruction tokens: room for 8 text pivots
    opts = dict(keep=12, layer=3, vision_pivots=vision_pivots, text_pivots=text_pivots, order="score")
    ref = _ref_lm(model, ex, selects={3: D.dart_select(12, vision_pivots, text_pivots)})
    out = _check(gp.prune(model, "dart", program=program, **opts), ex, ref)
    assert [len(s) for s in _vision_tokens(model, ex, out.kept)] == [12]


# ---------------------------------------------------------------------------------------- random

def test_random_prefill_llava(llava):
    model, program = llava
    ex = _ex(model, 2, pad=(0, 3), seed=2, images_per_sample=2)
    ref = _ref_lm(model, ex, selects={2: D.random_select(7, seed=3)})
    out = _check(gp.prune(model, "random", keep=7, layer=2, seed=3, program=program), ex, ref)
    assert [len(s) for s in _vision_tokens(model, ex, out.kept)] == [14, 14]


@pytest.mark.parametrize("positions", ["keep", "compact"])
def test_random_vision_stage_llava(llava, positions):
    model, program = llava
    ex = _ex(model, 2, pad=(0, 3), seed=2, images_per_sample=2)
    patches = D.random_patches(4, V, 9, seed=4)
    vis = R.llava_vision(model, ex.pixel_values)
    feats = vis["features"].gather(1, patches[..., None].expand(-1, -1, vis["features"].shape[-1]))
    emb, am, pos, vm, _ = R.llava_inputs_from_vision(model, ex, {"features": feats, "patch_index": patches},
                                                     positions=positions)
    ref = R.lm_generate(model, emb, am, pos, max_new_tokens=STEPS, vision_mask=vm)
    pruned = gp.prune(model, "random", stage="vision", keep=9, seed=4, positions=positions, program=program)
    out = _check(pruned, ex, ref, index=prompt_index(model, ex, patches))
    assert pruned.report.patches_kept == patches.tolist()
    assert out.report.vision_tokens_in == 2 * 9


# -------------------------------------------------------------------------------- MustDrop: merge

def _merge_ref(model, ex, tau, mode, capacity=None, positions="compact"):
    vis = R.llava_vision(model, ex.pixel_values, after_layer={0: RM.merge_hook(3, tau, mode, capacity)})
    emb, am, pos, vm, _ = R.llava_inputs_from_vision(model, ex, vis, positions=positions)
    return vis, R.lm_generate(model, emb, am, pos, max_new_tokens=STEPS, vision_mask=vm)


def test_mustdrop_merge_exact(llava):
    model, program = llava
    ex = _ex(model)
    top = _tile_scores(model, ex)[0].sort(descending=True).values
    tau = float(top[1:3].mean())                                  # the two best tiles merge (not at a tie)
    vis, ref = _merge_ref(model, ex, tau, "exact")
    assert vis["patch_index"].shape == (1, V - 16)                 # two 3x3 tiles became one token each
    pruned = gp.prune(model, "mustdrop_merge", tau=tau, mode="exact", order="raster", program=program)
    out = _check(pruned, ex, ref, index=prompt_index(model, ex, vis["patch_index"]))
    assert pruned.report.patches_kept == vis["patch_index"].tolist()
    assert out.report.vision_tokens_in == V - 16


def test_mustdrop_merge_static(llava):
    """One tile passes tau; capacity 24 forces a second merge below tau; 4 merged-away slots pad to 24."""
    model, program = llava
    ex = _ex(model, 2, pad=(0, 3), seed=2)
    score = _tile_scores(model, ex)
    top = score.sort(-1, descending=True).values
    assert float(top[:, 1].max()) < float(top[:, 0].min())
    tau = float((top[:, 1].max() + top[:, 0].min()) / 2)          # exactly one tile >= tau in each image
    vis, ref = _merge_ref(model, ex, tau, "static", capacity=24)
    assert vis["patch_index"].shape == (2, 24)
    assert vis["valid"].sum(1).tolist() == [20, 20]               # two tiles merged in each image
    assert bool((score < tau).sum(-1).ge(1).all())                # ... at least one of them below tau
    pruned = gp.prune(model, "mustdrop_merge", tau=tau, mode="static", capacity=24, order="raster", program=program)
    out = _check(pruned, ex, ref, index=prompt_index(model, ex, vis["patch_index"]))
    assert pruned.report.patches_kept == vis["patch_index"].tolist()
    assert int((out.cache[0].mask == 0).sum()) == 8 + 3            # 4 invalid slots per image + 3 pads


# --------------------------------------------------------------------------------- MustDrop: keys

def test_mustdrop_keys_drops_nothing(llava):
    model, program = llava
    ex = _ex(model, 2, pad=(0, 3), seed=2)
    base = gp.prune(model, None, program=program)(**ex.as_kwargs())
    out = gp.prune(model, "mustdrop_keys", program=program)(**ex.as_kwargs())
    assert torch.equal(out.kept, base.kept)
    assert out.cache.lengths() == base.cache.lengths()
    assert all(torch.equal(a.mask, b.mask) and torch.equal(a.index, b.index) for a, b in zip(out.cache, base.cache))
    torch.testing.assert_close(out.logits, base.logits, atol=1e-5, rtol=1e-5)
    assert out.report.patches_kept in (None, [list(range(V))] * 2)   # every patch reaches the LLM
    assert "mustdrop_keys" in out.report.pipeline
    assert out.report.vision_tokens_in == V


def test_mustdrop_keys_protect_through_random(llava):
    """The key set (top ceil(8% x 36) = 3 patches by CLS attention) is exactly what random(keep=3) keeps."""
    model, program = llava
    ex = _ex(model, 2, pad=(0, 3), seed=2)
    vis = R.llava_vision(model, ex.pixel_values)
    keys = RM.key_set(vis["cls_attn"], 0.08)
    assert keys.sum(1).tolist() == [3, 3]
    emb, am, pos, vm, prot = R.llava_inputs_from_vision(model, ex, vis, positions="compact", protected=keys)
    ref = R.lm_generate(model, emb, am, pos, selects={2: D.random_select(3, seed=0)}, protected=prot,
                        max_new_tokens=STEPS, vision_mask=vm)
    plain = D.random_select(3, seed=0)({"vision_mask": vm, "protected": torch.zeros_like(vm)})
    assert not torch.equal(plain, ref["keep"])                    # the key set changed the choice
    pruned = gp.prune(model, "mustdrop_keys() | random(keep=3, layer=2)", program=program)
    out = _check(pruned, ex, ref)
    slots = prompt_index(model, ex, torch.stack([keys[i].nonzero()[:, 0] for i in range(2)]))
    assert _vision_tokens(model, ex, out.kept) == _vision_tokens(model, ex, slots)


# ------------------------------------------------------------------------------- MustDrop: filter

@pytest.mark.parametrize("mode,capacity,batch", [("exact", None, 1), ("static", 12, 2)])
def test_mustdrop_filter(llava, mode, capacity, batch):
    model, program = llava
    ex = _ex(model) if batch == 1 else _ex(model, 2, pad=(0, 3), seed=2)
    sel = RM.filter_select(GAMMA, ALPHA, mode, capacity)
    ref = _ref_lm(model, ex, selects={2: sel, 3: sel})
    opts = dict(layers=(2, 3), gamma=GAMMA, alpha=ALPHA, mode=mode, placement="before", positions="keep")
    if capacity is not None:
        opts["capacity"] = capacity
    out = _check(gp.prune(model, "mustdrop_filter", program=program, **opts), ex, ref)
    kept = [len(s) for s in _vision_tokens(model, ex, out.kept)]
    assert all(0 < k < V for k in kept)                           # the rule dropped some, kept some
    if mode == "static":
        assert kept == [capacity] * batch
        vis_valid = out.cache[3].mask.bool() & (ex.input_ids.gather(1, out.kept) == model.config.image_token_id)
        assert 0 < int(vis_valid.sum()) <= batch * capacity


def test_mustdrop_filter_then_cache(llava):
    """A static filter at layer 3 (capacity 24, more than the rule keeps) and the output-aware cache over
    (1, 3): layers 1 and 2 store only what layer 3 kept, with its validity; layer 0 keeps everything."""
    model, program = llava
    ex = _ex(model, 2, pad=(0, 3), seed=2)
    ref = _ref_lm(model, ex, selects={3: RM.filter_select(GAMMA, ALPHA, "static", 24)}, cut_to_final=(1, 3))
    s = ex.input_ids.shape[1]
    assert ref["kv_lens"] == [s, s - V + 24, s - V + 24, s - V + 24]
    cut_vis = ex.input_ids.gather(1, ref["kv_index"][1]) == model.config.image_token_id
    assert not bool(ref["kv_valid"][1][cut_vis].all())            # layer 1's cache carries layer 3's validity
    pruned = gp.prune(model, "mustdrop_filter(layers=(3,), gamma=0.0278, alpha=0.0235, mode='static', capacity=24,"
                             " placement='before', positions='keep') | mustdrop_cache(layers=(1, 3), placement='before')",
                      program=program)
    _check(pruned, ex, ref)
    # and the exact filter at both layers with the cache cut between them
    ex1 = _ex(model)
    sel = RM.filter_select(GAMMA, ALPHA, "exact")
    ref = _ref_lm(model, ex1, selects={2: sel, 3: sel}, cut_to_final=(2, 3), steps=4)
    pruned = gp.prune(model, "mustdrop_filter(layers=(2, 3), gamma=0.0278, alpha=0.0235, mode='exact', "
                             "placement='before', positions='keep') | mustdrop_cache(layers=(2, 3), placement='before')",
                      program=program)
    _check(pruned, ex1, ref, steps=4)


# ----------------------------------------------------------------------------- MustDrop: pipeline

def _split(values):
    """A threshold in the widest gap between the middle half of `values` (robust to rounding)."""
    v = values.sort().values
    n = v.numel()
    lo, hi = n // 4, max(n // 4 + 1, 3 * n // 4)
    gaps = v[lo + 1:hi + 1] - v[lo:hi]
    i = lo + int(gaps.argmax())
    return float((v[i] + v[i + 1]) / 2)


def _exact_gamma(model, ex, tau):
    """gamma splitting the first filter layer's column-sum shares of the merged prompt in two."""
    vis = R.llava_vision(model, ex.pixel_values, after_layer={0: RM.merge_hook(3, tau, "exact")})
    emb, am, pos, vm, _ = R.llava_inputs_from_vision(model, ex, vis, positions="compact")
    seen = {}

    def spy(ctx):
        seen["ctx"] = ctx
        return torch.arange(vm.shape[1]).expand(vm.shape[0], -1)

    R.lm_generate(model, emb, am, pos, selects={2: spy}, max_new_tokens=1, vision_mask=vm)
    ctx = seen["ctx"]
    a = ctx["attn"].float().mean(1)[0][ctx["text_mask"][0]][:, ctx["vision_mask"][0]]
    return _split(a.sum(0) / a.sum())


@pytest.fixture(scope="module")
def mustdrop_static_case(llava):
    model, _ = llava
    ex = _ex(model, 2, pad=(0, 3), seed=2)
    ref = RM.mustdrop_reference(model, ex, tau=0.01, filter_layers=(2, 3), gamma=GAMMA, alpha=ALPHA,
                                mode="static", capacity_merge=30, capacity_filter=12, max_new_tokens=STEPS)
    return ex, ref


PIPE_STATIC = ("mustdrop_merge(tau=0.01, mode='static', capacity=30, order='raster') | mustdrop_keys() | "
               "mustdrop_filter(layers=(2, 3), gamma=0.0278, alpha=0.0235, mode='static', capacity=12, "
               "placement='before', positions='keep') | mustdrop_cache(layers=(2, 3), placement='before')")


def test_mustdrop_pipeline_static(llava, mustdrop_static_case):
    model, program = llava
    ex, ref = mustdrop_static_case
    vis = ref["vision"]
    assert vis["patch_index"].shape == (2, 30) and all(0 < n < 30 for n in vis["valid"].sum(1).tolist())
    assert ref["protected"].sum(1).tolist() == [2, 1]             # ceil(8% of the valid slots: 20, 12)
    s = ref["inputs"][0].shape[1]
    assert ref["kv_lens"] == [s, s, s - 30 + 12, s - 30 + 12]
    pruned = gp.prune(model, PIPE_STATIC, program=program)
    index = prompt_index(model, ex, vis["patch_index"])
    out = _check(pruned, ex, ref, index=index)
    assert pruned.report.patches_kept == vis["patch_index"].tolist()
    for b in range(2):                                            # the key set survives both filters
        assert set(index[b][ref["inputs"][4][b]].tolist()) <= set(out.kept[b].tolist())


def test_mustdrop_named_pipeline_identical(llava, mustdrop_static_case):
    model, program = llava
    ex, ref = mustdrop_static_case
    named = gp.prune(model, "mustdrop", keep=12, mode="static", layers=(2, 3), tau=0.01, gamma=GAMMA, alpha=ALPHA,
                     merge_capacity=30, capacity=12, order="raster", placement="before", positions="keep",
                     program=program)
    assert [p.name for p in named.pipeline] == ["mustdrop_merge", "mustdrop_keys", "mustdrop_filter", "mustdrop_cache"]
    a = named(**ex.as_kwargs())
    b = gp.prune(model, PIPE_STATIC, program=program)(**ex.as_kwargs())
    assert torch.equal(a.kept, b.kept) and torch.equal(a.logits, b.logits)
    assert a.cache.lengths() == b.cache.lengths()
    for x, y in zip(a.cache, b.cache):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.mask, y.mask) and torch.equal(x.index, y.index)
    assert a.report.patches_kept == b.report.patches_kept
    _check(named, ex, ref, index=prompt_index(model, ex, ref["patch_index"]))


def test_mustdrop_pipeline_exact(llava):
    model, program = llava
    ex = _ex(model)
    tau = float(_tile_scores(model, ex)[0].sort(descending=True).values[1:3].mean())
    gamma = _exact_gamma(model, ex, tau)
    ref = RM.mustdrop_reference(model, ex, tau=tau, filter_layers=(2, 3), gamma=gamma, alpha=1.0, mode="exact",
                                max_new_tokens=STEPS)
    n = ref["patch_index"].shape[1]
    assert n == V - 16
    s = ref["inputs"][0].shape[1]
    assert ref["kv_lens"][:2] == [s, s] and s - n < ref["kv_lens"][2] < s     # the filters dropped some
    assert ref["kv_lens"][2] == ref["kv_lens"][3]
    pruned = gp.prune(model, f"mustdrop_merge(tau={tau!r}, mode='exact', order='raster') | mustdrop_keys() | "
                             f"mustdrop_filter(layers=(2, 3), gamma={gamma!r}, alpha=1.0, mode='exact', "
                             "placement='before', positions='keep') | mustdrop_cache(layers=(2, 3), placement='before')",
                      program=program)
    index = prompt_index(model, ex, ref["patch_index"])
    out = _check(pruned, ex, ref, index=index)
    assert pruned.report.patches_kept == ref["patch_index"].tolist()
    prot = index[0][ref["inputs"][4][0]]
    assert prot.numel() == 2 and set(prot.tolist()) <= set(out.kept[0].tolist())


# -------------------------------------------------------------------------------------- Qwen2-VL

def _qwen_ref(model, ex, **kw):
    emb, am, pos, vm = R.qwen2vl_inputs(model, ex)
    return R.lm_generate(model, emb, am, pos, max_new_tokens=STEPS, vision_mask=vm, **kw)


QWEN_CASES = [
    ("dart", dict(keep=6, layer=2, order="score"), {2: D.dart_select(6)}),
    ("random", dict(keep=5, layer=1, seed=2), {1: D.random_select(5, seed=2)}),
    ("mustdrop_filter", dict(layers=(2, 3), gamma=1 / 16, alpha=1.0, mode="static", capacity=10, placement="before",
                             positions="keep"),
     {2: RM.filter_select(1 / 16, 1.0, "static", 10), 3: RM.filter_select(1 / 16, 1.0, "static", 10)}),
]


@pytest.mark.parametrize("method,opts,selects", QWEN_CASES, ids=[c[0] for c in QWEN_CASES])
def test_qwen2vl(qwen, method, opts, selects):
    model, program = qwen
    ex = qwen2vl_example(model, batch=2, pad=(0, 2))
    ref = _qwen_ref(model, ex, selects=selects)
    out = _check(gp.prune(model, method, program=program, **opts), ex, ref)
    img = ex.input_ids.gather(1, out.kept) == model.config.image_token_id
    assert bool((img.sum(1) < 16).all())
    if method == "mustdrop_filter":        # capacity 10 slots; 1/16 keeps the above-average ones only
        valid = (out.cache[3].mask.bool() & img).sum(1)
        # the rule masks inside the capacity (in some row: how many depends on the random weights)
        assert img.sum(1).tolist() == [10, 10] and bool((valid > 0).all()) and bool((valid < 10).any())


@pytest.mark.parametrize("method,why", [
    ("mustdrop_keys", "CLS"),
    ("mustdrop_merge(tau=0.5)", "order='raster'"),     # runs with positions='keep', order='raster' (2x2 groups)
    ("cls_topk(keep=4)", "CLS"),
    ("mustdrop(keep=64)", "vision"),
])
def test_qwen2vl_vision_passes_not_applicable(qwen, method, why):
    model, program = qwen
    with pytest.raises(GraphpruneError) as e:
        gp.prune(model, method, program=program)
    assert isinstance(e.value, PassNotApplicable)
    assert why in str(e.value) and "Qwen2VL" in str(e.value)
