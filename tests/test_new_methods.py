"""VisionZip, DivPrune, CDPruner, VisPruner and PyramidDrop against their independent references
(tests/reference_new_methods.py): kept / merged sets, prefill logits (fp32, atol 1e-5 on real tokens),
KV lengths and 16 greedy tokens on tiny LLaVA-1.5; batch 2 with left padding equals each sample alone;
bad options fail before any work."""
import pytest
import reference as R
import reference_new_methods as N
import torch
from checks import assert_same_run

import graphprune as gp
from graphprune.errors import PassConfigError, PassNotApplicable
from graphprune.tools.zoo import llava_example, qwen2vl_example

STEPS = 16
V = 36                          # 6 x 6 patch grid of the tiny LLaVA



def _vision_ref(model, ex, vo, positions="compact"):
    emb, am, pos, vm, _ = R.llava_inputs_from_vision(model, ex, vo, positions=positions)
    return R.lm_generate(model, emb, am, pos, vision_mask=vm, max_new_tokens=STEPS)


def _alone_equals_batch(model, program, spec, ex):
    """Each sample of a left-padded batch run alone gives the batch's logits at its real tokens and the
    same greedy tokens."""
    pruned = gp.prune(model, spec, program=program)
    both = pruned(**ex.as_kwargs())
    ids = pruned.generate(**ex.as_kwargs(), max_new_tokens=STEPS, eos_token_id=[])
    per = ex.pixel_values.shape[0] // ex.input_ids.shape[0]
    for b in range(ex.input_ids.shape[0]):
        real = ex.attention_mask[b].bool()
        one = dict(input_ids=ex.input_ids[b:b + 1, real], attention_mask=ex.attention_mask[b:b + 1, real],
                   pixel_values=ex.pixel_values[b * per:(b + 1) * per])
        alone = pruned(**one)
        mask = both.cache[-1].mask[b].bool()            # real (and, static capacity: valid) tokens
        torch.testing.assert_close(both.logits[b, mask], alone.logits[0, alone.cache[-1].mask[0].bool()],
                                   atol=1e-5, rtol=1e-5)
        assert torch.equal(pruned.generate(**one, max_new_tokens=STEPS, eos_token_id=[])[0, -STEPS:], ids[b, -STEPS:])


# ------------------------------------------------------------------------------------------ VisionZip

@pytest.mark.parametrize("batch,pad,keep,opts", [
    (1, (), 12, {}),                                      # 10 dominant + 2 contextual
    (2, (0, 3), 16, {"contextual": 5, "heads": 4}),       # the authors' head-averaged keys
    (2, (0, 3), 12, {"positions": "keep"}),
])
def test_visionzip_matches_reference(llava, batch, pad, keep, opts):
    model, program = llava
    ex = llava_example(model, batch=batch, pad=pad, seed=batch)
    positions = opts.get("positions", "compact")
    vo = N.visionzip(model, ex, keep, contextual=opts.get("contextual"), heads_mean="heads" in opts,
                     authors_order=positions == "compact")
    ref = _vision_ref(model, ex, vo, positions)
    spec = f"visionzip(keep={keep}" + "".join(f", {k}={v!r}" for k, v in opts.items()) + ")"
    pruned = gp.prune(model, spec, program=program)
    assert_same_run(pruned, ex, ref, STEPS)
    assert pruned.report.patches_kept == vo["patch_index"].tolist()
    c = opts.get("contextual", round(keep * 5 / 32))
    assert vo["targets"].shape[-1] == c > 0
    # contextual tokens really merged: not equal to any single patch's projected features
    full = N.vision_parts(model, ex.pixel_values)["features"]
    slots = vo["patch_index"][0].tolist()
    rows = range(keep - c, keep) if positions == "compact" else [slots.index(t) for t in vo["targets"][0].tolist()]
    assert not any(torch.allclose(vo["features"][0, j], full[0, p]) for j in rows for p in range(V))


def test_visionzip_batch_equals_alone(llava):
    model, program = llava
    _alone_equals_batch(model, program, "visionzip(keep=12)", llava_example(model, batch=2, pad=(0, 3), seed=5))


def test_visionzip_bad_options(llava):
    model, program = llava
    for spec, word in [("visionzip(keep=0.5)", "keep"), ("visionzip(keep=8, contextual=8)", "contextual"),
                       ("visionzip(keep=8, positions='shuffle')", "positions"), ("visionzip(keep=8, heads=0)", "heads"),
                       ("visionzip(keep=40)", "keep=40"), ("visionzip(keep=8, heads=3)", "heads=3")]:
        with pytest.raises(PassConfigError, match=word):
            gp.prune(model, spec, program=program)


# ----------------------------------------------------------------------------- DivPrune and CDPruner

SELECTORS = {"divprune": N.divprune, "cdpruner": N.cdpruner, "vispruner": N.vispruner}


@pytest.mark.parametrize("method", sorted(SELECTORS))
@pytest.mark.parametrize("batch,pad,keep,positions", [(1, (), 9, "compact"), (2, (0, 3), 0.25, "compact"),
                                                      (2, (0, 3), 12, "keep")])
def test_selector_matches_reference(llava, method, batch, pad, keep, positions):
    model, program = llava
    ex = llava_example(model, batch=batch, pad=pad, seed=batch + 3)
    if method == "vispruner" and isinstance(keep, float):
        keep = 9                       # VisPruner counts tokens (int budgets only)
    vo = SELECTORS[method](model, ex, keep)
    ref = _vision_ref(model, ex, vo, positions)
    pruned = gp.prune(model, f"{method}(keep={keep!r}, positions={positions!r})", program=program)
    assert_same_run(pruned, ex, ref, STEPS)
    assert pruned.report.patches_kept == vo["patch_index"].tolist()


@pytest.mark.parametrize("method", sorted(SELECTORS))
def test_selector_batch_equals_alone(llava, method):
    model, program = llava
    _alone_equals_batch(model, program, f"{method}(keep=10)", llava_example(model, batch=2, pad=(0, 3), seed=6))


def test_divprune_is_max_min_greedy():
    """On points on a line the greedy picks the farthest-isolated point, then always the farthest from
    the chosen ones: the ends and the middle first."""
    from graphprune.rewrite.blocks import farthest_point_select
    x = torch.tensor([0.0, 1.0, 2.0, 2.1, 4.0, 8.0])
    dist = (x[:, None] - x[None]).abs()
    chosen = farthest_point_select(dist[None], 3)
    assert chosen[0].nonzero()[:, 0].tolist() == [0, 4, 5]         # 8 (isolated by 4), then 0, then 4


def test_dpp_greedy_matches_log_det_greedy():
    """The incremental Cholesky greedy picks, at each step, the token maximising log det L_S."""
    from graphprune.rewrite.blocks import dpp_greedy_select
    torch.manual_seed(0)
    x = torch.randn(12, 5, dtype=torch.float64)
    kernel = x @ x.t() + 0.1 * torch.eye(12, dtype=torch.float64)
    chosen = []
    for _ in range(4):
        best = max((j for j in range(12) if j not in chosen),
                   key=lambda j: torch.logdet(kernel[chosen + [j]][:, chosen + [j]]).item())
        chosen.append(best)
    got = dpp_greedy_select(kernel[None], 4)[0]
    assert got.nonzero()[:, 0].tolist() == sorted(chosen)
    assert N.dpp_greedy(kernel.float(), 4) == chosen


@pytest.mark.parametrize("spec,word", [("divprune(keep=0)", "keep"), ("divprune(keep=40)", "keep=40"),
                                       ("divprune(positions='x')", "positions"), ("cdpruner(keep=1.5)", "keep"),
                                       ("cdpruner(keep=37)", "keep=37"), ("cdpruner(sigma=2)", "sigma"),
                                       ("vispruner(keep=0.5)", "keep"), ("vispruner(keep=37)", "keep=37"),
                                       ("vispruner(important_ratio=1.5)", "important_ratio")])
def test_selector_bad_options(llava, spec, word):
    model, program = llava
    with pytest.raises(PassConfigError, match=word):
        gp.prune(model, spec, program=program)


@pytest.mark.parametrize("keep,ratio", [(9, 0.5), (20, 0.25), (6, 0.0), (6, 1.0)])
def test_vispruner_splits_and_rounds(llava, keep, ratio):
    """Important/diverse splits, odd residual counts (the authors' code assumes even ones) and the all-
    important / all-diverse ends match the reference."""
    model, program = llava
    ex = llava_example(model, batch=1, seed=7)
    vo = N.vispruner(model, ex, keep, ratio)
    pruned = gp.prune(model, f"vispruner(keep={keep}, important_ratio={ratio})", program=program)
    assert_same_run(pruned, ex, _vision_ref(model, ex, vo), STEPS)
    assert pruned.report.patches_kept == vo["patch_index"].tolist()


# ---------------------------------------------------------------------------------------- PyramidDrop

@pytest.mark.parametrize("batch,pad,layers,ratios", [(1, (), (1, 2, 3), (0.5, 0.25, 0.125)),
                                                     (2, (0, 3), (2, 3), (0.5, 0.25))])
def test_pyramiddrop_matches_reference(llava, batch, pad, layers, ratios):
    model, program = llava
    ex = llava_example(model, batch=batch, pad=pad, seed=batch + 11)
    emb, am, pos, vm = R.llava_inputs(model, ex)
    ref = R.lm_generate(model, emb, am, pos, selects=N.pyramiddrop_selects(layers, ratios, V), vision_mask=vm,
                        max_new_tokens=STEPS)
    pruned = gp.prune(model, f"pyramiddrop(layers={layers}, ratios={ratios})", program=program)
    out = assert_same_run(pruned, ex, ref, STEPS)
    assert torch.equal(out.kept, ref["keep"])
    assert int((ex.input_ids.gather(1, out.kept) == model.config.image_token_id).sum(1)[0]) == int(V * ratios[-1])


def test_pyramiddrop_batch_equals_alone(llava):
    model, program = llava
    _alone_equals_batch(model, program, "pyramiddrop(layers=(1, 3), ratios=(0.5, 0.25))",
                        llava_example(model, batch=2, pad=(0, 3), seed=8))


@pytest.mark.parametrize("spec,word", [
    ("pyramiddrop", "do not fit a 4-layer"), ("pyramiddrop(layers=(2, 1), ratios=(0.5, 0.25))", "increasing"),
    ("pyramiddrop(layers=(1, 2), ratios=(0.5,))", "one ratio per layer"),
    ("pyramiddrop(layers=(1, 2), ratios=(0.25, 0.5))", "non-increasing"),
    ("pyramiddrop(layers=(1,), ratios=(0,))", "ratios"), ("pyramiddrop(layers=(1,), ratios=(0.5,), positions='compact')", "positions")])
def test_pyramiddrop_bad_options(llava, spec, word):
    model, program = llava
    with pytest.raises(PassConfigError, match=word):
        gp.prune(model, spec, program=program)


# ------------------------------------------------------------------------------------------- Qwen2-VL

def test_pyramiddrop_qwen2vl(qwen):
    """M-RoPE positions kept: the same stages on the tiny Qwen2-VL (16 vision tokens per image)."""
    model, program = qwen
    ex = qwen2vl_example(model, batch=2, pad=(0, 2))
    emb, am, pos, vm = R.qwen2vl_inputs(model, ex)
    ref = R.lm_generate(model, emb, am, pos, selects=N.pyramiddrop_selects((1, 3), (0.5, 0.25), 16), vision_mask=vm,
                        max_new_tokens=STEPS)
    pruned = gp.prune(model, "pyramiddrop(layers=(1, 3), ratios=(0.5, 0.25))", program=program)
    out = assert_same_run(pruned, ex, ref, STEPS)
    assert torch.equal(out.kept, ref["keep"])


@pytest.mark.parametrize("method,why", [("visionzip(keep=8)", "CLS token"), ("vispruner(keep=8)", "CLS token"),
                                        ("divprune(keep=8)", "M-RoPE"), ("cdpruner(keep=8)", "M-RoPE")])
def test_vision_methods_on_qwen2vl_say_why_not(qwen, method, why):
    """CLS methods: Qwen's ViT has none. Projected-token methods run at LLM layer 0 (tests/test_methods_qwen25.py)
    with positions='keep'; their default compact numbering is refused, naming that option."""
    model, program = qwen
    with pytest.raises(PassNotApplicable, match="Qwen2VL") as err:
        gp.prune(model, method, program=program)
    assert why in str(err.value) and (why != "M-RoPE" or "use positions='keep'" in str(err.value))


@pytest.mark.parametrize("spec", [
    pytest.param(s, marks=pytest.mark.slow)
    for s in ("vispruner(keep=9)", "visionzip(keep=12)", "divprune(keep=9)", "cdpruner(keep=9)", "pyramiddrop(layers=(1, 3), ratios=(0.5, 0.25))")])
def test_new_methods_export_to_onnx(llava, spec, tmp_path):
    """The selection functions trace with static shapes (no data-dependent branch): ONNX export succeeds."""
    model, program = llava
    pytest.importorskip("onnx")
    manifest = gp.export_onnx(gp.prune(model, spec, program=program), tmp_path / "out")
    assert (tmp_path / "out").is_dir() and manifest is not None
