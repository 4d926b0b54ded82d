"""SparseVLM and ToMe against their independent references (tests/reference_new_methods.py): kept /
merged sets, prefill logits (fp32, atol 1e-5 on real tokens), KV lengths and 16 greedy tokens on tiny
LLaVA-1.5; batch 2 with left padding equals each sample alone; bad options fail before any work."""
import pytest
import reference as R
import reference_new_methods as N
import torch
from checks import assert_same_run
from test_new_methods import STEPS, _alone_equals_batch

import graphprune as gp
from graphprune.errors import InputError, PassConfigError
from graphprune.tools.zoo import llava_example

# ------------------------------------------------------------------------------------------ SparseVLM


def _sparsevlm_ref(model, ex, layers, scale, bias, capacity, recycle=True, positions="compact"):
    emb, am, pos, vm = R.llava_inputs(model, ex)
    log = []
    selects = N.sparsevlm_selects(emb, vm, am, layers, scale, bias, capacity, recycle=recycle, log=log,
                                  in_place=positions == "keep")
    return R.lm_generate(model, emb, am, pos, selects=selects, vision_mask=vm, positions=positions,
                         max_new_tokens=STEPS), log


@pytest.mark.parametrize("batch,pad,opts", [
    (1, (), dict(layers=(0, 1, 2), scale=2.0, bias=3.0, capacity=36)),          # the authors' counts, uncapped
    (2, (0, 3), dict(layers=(0, 2), scale=1.5, bias=6.0, capacity=36)),
    (2, (0, 3), dict(layers=(1, 2), scale=3.0, bias=0.0, capacity=9)),           # capacity cuts the kept tokens
    (1, (), dict(layers=(0, 1), scale=2.0, bias=3.0, capacity=36, recycle=False)),
    (2, (0, 3), dict(layers=(0, 2), scale=1.5, bias=6.0, capacity=20, recycle=False, positions="keep")),  # own slots
])
def test_sparsevlm_matches_reference(llava, batch, pad, opts):
    model, program = llava
    ex = llava_example(model, batch=batch, pad=pad, seed=batch + 20)
    ref, log = _sparsevlm_ref(model, ex, opts["layers"], opts["scale"], opts["bias"], opts["capacity"],
                              opts.get("recycle", True), opts.get("positions", "compact"))
    spec = "sparsevlm(keep=64" + "".join(f", {k}={v!r}" for k, v in opts.items()) + ")"
    in_place = opts.get("positions") == "keep"             # kept tokens in their own slots: the kept sets compare
    assert_same_run(gp.prune(model, spec, program=program), ex, ref, STEPS, kept=ref["keep"] if in_place else None)
    # the run exercised what it claims: tokens were deleted, and recycled unless switched off
    assert any(len(out["kept"]) < 36 for *_, out in log)
    assert any(len(out["recycled"]) > 0 for *_, out in log) == opts.get("recycle", True)


def test_sparsevlm_kept_and_merged_sets():
    """The selection on identical tensors: graphprune's first slots hold exactly the reference's kept
    tokens (prompt order), then its recycled clusters; the rest are masked."""
    from graphprune.passes.sparsevlm import sparsify
    g = torch.Generator().manual_seed(0)
    v, t, d = 40, 7, 16
    hidden = torch.randn(1, 1, v, d, generator=g)
    vis_emb, text_emb = torch.randn(1, 1, v, d, generator=g), torch.randn(1, t, d, generator=g)
    logits = torch.randn(1, t, 1, v, generator=g) * 3
    attn = logits.softmax(-1) * 0.5          # rows over the vision tokens (rank <= raters < v)
    text_mask = torch.ones(1, t, dtype=torch.bool)
    for cap, scale, bias in [(40, 2.0, 1.0), (12, 2.0, 1.0), (40, 0.5, 0.0)]:
        raters = N.sparsevlm_raters(vis_emb[0, 0], text_emb[0])
        ref = N.sparsevlm_layer(attn[0, raters, 0], hidden[0, 0], scale, bias, cap)
        out = sparsify(k=cap, protected=None, valid=None, vision_pos=torch.arange(v)[None, None], attn=attn,
                       hidden=hidden, vis_emb=vis_emb, text_emb=text_emb, text_mask=text_mask, scale=scale,
                       bias=bias, recycle=True)
        n = ref["tokens"].shape[0]
        assert out["valid"][0, 0].tolist() == [True] * n + [False] * (cap - n)
        torch.testing.assert_close(out["values"][0, 0, :n], ref["tokens"], atol=1e-6, rtol=1e-6)
        kept = len(ref["kept"])
        assert torch.equal(out["values"][0, 0, :kept], hidden[0, 0, ref["kept"]])
        assert 0 < kept < v and len(ref["recycled"]) > 0


def test_sparsevlm_batch_equals_alone(llava):
    model, program = llava
    _alone_equals_batch(model, program, "sparsevlm(keep=64, layers=(0, 2), scale=2.0, bias=2.0, capacity=20)",
                        llava_example(model, batch=2, pad=(0, 3), seed=9))


@pytest.mark.parametrize("spec,word", [
    ("sparsevlm", "do not fit a 4-layer"), ("sparsevlm(keep=100)", "scale and bias"),
    ("sparsevlm(keep=0.5, scale=1.0, bias=0.0)", "keep"), ("sparsevlm(layers=(2, 1))", "increasing"),
    ("sparsevlm(layers=(0,), scale=0.0)", "scale"), ("sparsevlm(layers=(0,), bias=-1.0)", "bias"),
    ("sparsevlm(layers=(0,), capacity=0)", "capacity"), ("sparsevlm(layers=(0,), positions='keep')", "needs recycle=False"),
    ("sparsevlm(layers=(0,), positions='shift', recycle=False)", "positions"),
    ("sparsevlm(layers=(0,), recycle=1)", "recycle")])
def test_sparsevlm_bad_options(llava, spec, word):
    model, program = llava
    with pytest.raises(PassConfigError, match=word):
        gp.prune(model, spec, program=program)


@pytest.mark.parametrize("seed,pad,capacity,scale,bias", [(0, 0, 4, 3.0, 0.0), (1, 4, 12, 0.5, 1.0),
                                                         (2, 2, 36, 5.0, 5.0), (3, 1, 1, 1.0, 0.0)])
def test_sparsevlm_keeps_text_and_capacity(llava, seed, pad, capacity, scale, bias):
    """Whatever the counts: every text token stays, each image uses at most `capacity` slots, logits finite."""
    model, program = llava
    ex = llava_example(model, batch=2, pad=(0, pad), seed=seed)
    pruned = gp.prune(model, f"sparsevlm(keep=64, layers=(0, 1), scale={scale}, bias={bias}, capacity={capacity})",
                      program=program)
    out = pruned(**ex.as_kwargs())
    img = ex.input_ids == model.config.image_token_id
    real = out.cache[-1].mask.bool()
    for b in range(2):
        kept = out.kept[b]
        assert set((~img[b] & ex.attention_mask[b].bool()).nonzero()[:, 0].tolist()) <= set(kept[real[b]].tolist())
        assert 0 < int((img[b].gather(0, kept) & real[b]).sum()) <= capacity
    assert bool(torch.isfinite(out.logits[real]).all())


def test_sparsevlm_refuses_key_sets(llava):
    model, program = llava
    pruned = gp.prune(model, "mustdrop_keys | sparsevlm(keep=64, layers=(0,), capacity=20)", program=program)
    with pytest.raises(InputError, match="mustdrop_keys"):
        pruned(**llava_example(model, batch=1, seed=0).as_kwargs())


def test_sparsevlm_in_bench_grid():
    from graphprune.tools import bench
    cells = bench.grid_specs(["sparsevlm"], [64, 100, "default"], 32, 576)
    assert [c[2] for c in cells] == ["sparsevlm(keep=64, layers=(2, 6, 15, 19))",
                                     "sparsevlm(keep=100, layers=(2, 6, 15, 19), scale=9.0, bias=6.0)",
                                     "sparsevlm(layers=(2, 6, 15, 19))"]
    assert bench.grid_specs(["sparsevlm"], [16], 4, 36)[0][2] == "sparsevlm(keep=16, layers=(0, 1, 2), scale=0.8, bias=0.0)"


# ----------------------------------------------------------------------------------------------- ToMe

def _tome_spec(opts):
    return "tome(" + ", ".join(f"{k}={v!r}" for k, v in opts.items()) + ")"


@pytest.fixture(scope="module")
def llava_deep_vision():
    """Tiny LLaVA whose vision tower has 5 layers (4 feed the features): merges at several layers, each
    replacing the proportional-attention bias of the layers after it."""
    from graphprune.rewrite.pipeline import Program
    from graphprune.tools.zoo import tiny_llava
    model = tiny_llava(vision_layers=5)
    return model, Program.capture(model)


@pytest.mark.parametrize("deep,batch,pad,opts", [
    (False, 1, (), dict(keep=10, layers=(0, 1))),                             # 36 -> 23 -> 12 (capped at half)
    (False, 2, (0, 3), dict(r=5, layers=(0, 1), heads=4)),                    # the authors' metric
    (False, 2, (0, 3), dict(keep=20, layers=(1,), proportional_attention=False)),
    (True, 2, (0, 3), dict(r=4, layers=(0, 1, 2, 3), heads=4)),               # sizes up to 2^4, bias replaced 3x
    (True, 1, (), dict(keep=9, layers=(0, 2), proportional_attention=False)),
])
def test_tome_matches_reference(llava, llava_deep_vision, deep, batch, pad, opts):
    model, program = llava_deep_vision if deep else llava
    ex = llava_example(model, batch=batch, pad=pad, seed=batch + 30)
    vo = N.tome_vision(model, ex.pixel_values, opts["layers"], r=opts.get("r"), keep=opts.get("keep"),
                       heads_mean="heads" in opts, proportional=opts.get("proportional_attention", True))
    emb, am, pos, vm, _ = R.llava_inputs_from_vision(model, ex, vo, positions="compact")
    ref = R.lm_generate(model, emb, am, pos, vision_mask=vm, max_new_tokens=STEPS)
    pruned = gp.prune(model, _tome_spec(opts), program=program)
    assert_same_run(pruned, ex, ref, STEPS)
    # each token stands at its representative's slot (the B token, or the unmerged A token), in ToMe's order
    assert pruned.report.patches_kept == vo["representative"].tolist()
    assert any(len(s) > 2 for img in vo["sources"] for s in img)        # merged tokens merged again (sizes > 2)


def test_tome_proportional_attention_changes_the_result(llava):
    """The log-size bias is really applied: with and without it the logits differ (and each equals its
    reference above)."""
    model, program = llava
    ex = llava_example(model, batch=1, seed=31)
    with_bias = gp.prune(model, "tome(keep=10, layers=(0, 1))", program=program)(**ex.as_kwargs())
    without = gp.prune(model, "tome(keep=10, layers=(0, 1), proportional_attention=False)",
                       program=program)(**ex.as_kwargs())
    assert not torch.allclose(with_bias.logits, without.logits, atol=1e-4)


def test_tome_merge_on_identical_tensors():
    """One merge with unequal sizes: graphprune's order, sizes and size-weighted values equal the authors'
    bipartite matching + merge_wavg on the same tensors."""
    from graphprune.passes.tome import bipartite_merge
    g = torch.Generator().manual_seed(3)
    v, d, heads = 15, 8, 2
    keys, hidden = torch.randn(1, 1, v, heads * 4, generator=g), torch.randn(1, 1, v, d, generator=g)
    sizes = torch.randint(1, 5, (1, 1, v), generator=g).float()
    out = bipartite_merge(k=None, protected=None, valid=None, vision_pos=None, keys=keys, hidden=hidden, sizes=sizes,
                          r=4, keep=None, layers_left=1, heads=heads)
    metric = torch.cat([torch.randn(1, 4, generator=g), keys[0, 0].view(v, heads, 4).mean(1)])   # row 0: CLS
    x = torch.cat([torch.zeros(1, d), hidden[0, 0]])
    size = torch.cat([torch.ones(1), sizes[0, 0]])[:, None]
    unm, merged, dst = N.tome_match(metric, 4)
    xs = x * size
    b_x, b_s = xs[1::2].clone(), size[1::2].clone()
    b_x.index_add_(0, dst, xs[::2][merged])
    b_s.index_add_(0, dst, size[::2][merged])
    want_size = torch.cat([size[::2][unm], b_s])[1:]
    torch.testing.assert_close(out["sizes"][0, 0], want_size[:, 0])
    torch.testing.assert_close(out["values"][0, 0], (torch.cat([xs[::2][unm], b_x]) / torch.cat([size[::2][unm], b_s]))[1:])
    order = torch.cat([torch.arange(0, v + 1, 2)[unm], torch.arange(1, v + 1, 2)])[1:] - 1
    assert out["picked"][0, 0].tolist() == order.tolist()
    assert float(want_size.sum()) == float(sizes.sum())


def test_tome_batch_equals_alone(llava):
    model, program = llava
    _alone_equals_batch(model, program, _tome_spec(dict(keep=12, layers=(0, 1), heads=4)),
                        llava_example(model, batch=2, pad=(0, 3), seed=10))


@pytest.mark.parametrize("spec,word", [
    ("tome", "do not fit"), ("tome(keep=8, r=2)", "not both"), ("tome(r=0, layers=(0,))", "r=0"),
    ("tome(keep=0.5, layers=(0,))", "keep"), ("tome(layers=(1, 0))", "increasing"),
    ("tome(keep=40, layers=(0,))", "keep=40"), ("tome(keep=8, layers=(0,), heads=3)", "heads=3"),
    ("tome(layers=(0,), heads=0)", "heads"), ("tome(layers=(0,), proportional_attention=1)", "proportional")])
def test_tome_bad_options(llava, spec, word):
    model, program = llava
    with pytest.raises(PassConfigError, match=word):
        gp.prune(model, spec, program=program)


def test_tome_in_bench_grid(llava):
    from graphprune.tools import bench
    model, _ = llava
    assert bench.feature_layers(model.config) == 2
    cells = bench.grid_specs(["tome"], [16, "default"], 4, 36, bench.feature_layers(model.config))
    assert [c[2] for c in cells] == ["tome(keep=16, layers=(0, 1))", "tome(layers=(0, 1))"]
    assert bench.grid_specs(["tome"], [64], 32, 576)[0][2] == "tome(keep=64)"
    for _, _, spec in cells:
        gp.as_passes(spec)

