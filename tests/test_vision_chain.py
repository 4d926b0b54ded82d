"""Two token-dropping vision passes in a row: the second chooses among what the first kept.

Against tests/reference_chain.py (each method's rule restricted to the first one's tokens): kept patches,
prefill logits (fp32, atol 1e-5), KV lengths and 16 greedy tokens on tiny LLaVA-1.5, batch 1 and a
left-padded batch 2. Pairs that cannot compose (a CLS-attention method after VisionZip merged tokens;
two different position policies) are refused before any work."""
import pytest
import reference as R
import reference_chain as C
from checks import assert_onnx_matches, assert_same_run

import graphprune as gp
from graphprune.errors import PassConfigError
from graphprune.tools.zoo import llava_example

STEPS = 16
FIRST, SECOND = 20, 10            # of the 36 patches of the tiny LLaVA's 6 x 6 grid

SPECS = {"cls_topk": "cls_topk(keep={k}, positions='compact')",
         "random": "random(stage='vision', keep={k}, seed=3, positions='compact')",
         "visionzip": "visionzip(keep={k})",
         "divprune": "divprune(keep={k})"}


def _step(model, method, state, k):
    if method == "cls_topk":
        return C.cls_topk(state, k)
    if method == "random":
        return C.random(state, k, seed=3)
    if method == "visionzip":
        return C.visionzip(state, k)
    return C.divprune(model, state, k)


COMPOSE = [("cls_topk", "cls_topk"), ("cls_topk", "random"), ("cls_topk", "visionzip"), ("cls_topk", "divprune"),
           ("random", "cls_topk"), ("random", "random"), ("random", "visionzip"), ("random", "divprune"),
           ("visionzip", "random"), ("visionzip", "divprune"), ("divprune", "divprune")]


@pytest.mark.parametrize("first,second", COMPOSE)
@pytest.mark.parametrize("batch,pad", [(1, ()), (2, (0, 3))])
def test_chain_matches_composition(llava, first, second, batch, pad):
    model, program = llava
    ex = llava_example(model, batch=batch, pad=pad, seed=batch + 20)
    state = _step(model, second, _step(model, first, C.start(model, ex.pixel_values), FIRST), SECOND)
    emb, am, pos, vm, _ = R.llava_inputs_from_vision(model, ex, C.vision_out(model, state))
    ref = R.lm_generate(model, emb, am, pos, vision_mask=vm, max_new_tokens=STEPS)

    spec = SPECS[first].format(k=FIRST) + " | " + SPECS[second].format(k=SECOND)
    pruned = gp.prune(model, spec, program=program)
    assert_same_run(pruned, ex, ref, STEPS)
    assert pruned.report.patches_kept == state["slots"].tolist()


def test_chain_differs_from_either_pass_alone(llava):
    """The second pass really chose among the first one's tokens (not among all patches)."""
    model, program = llava
    ex = llava_example(model, batch=1, seed=21)
    chained = gp.prune(model, "random(stage='vision', keep=20, seed=3, positions='compact') | "
                              "cls_topk(keep=10, positions='compact')", program=program)
    alone = gp.prune(model, "cls_topk(keep=10, positions='compact')", program=program)
    chained(**ex.as_kwargs())
    alone(**ex.as_kwargs())
    first = set(C.random(C.start(model, ex.pixel_values), 20, seed=3)["slots"][0].tolist())
    assert set(chained.report.patches_kept[0]) <= first
    assert chained.report.patches_kept != alone.report.patches_kept


@pytest.mark.parametrize("spec,words", [
    ("visionzip(keep=20) | cls_topk(keep=10, positions='compact')", ["cls_topk", "visionzip", "merged"]),
    ("visionzip(keep=20) | visionzip(keep=10)", ["visionzip", "merged", "before it"]),
    ("cls_topk(keep=20) | random(stage='vision', keep=10)", ["positions='keep'", "positions='compact'"]),
    ("random(stage='vision', keep=20) | divprune(keep=10)", ["divprune", "positions='compact'"]),
])
def test_chains_that_cannot_compose_are_refused(llava, spec, words):
    model, program = llava
    with pytest.raises(PassConfigError) as err:
        gp.prune(model, spec, program=program)
    for w in words:
        assert w in str(err.value)


@pytest.mark.slow
def test_chain_exports_to_onnx(llava, tmp_path):
    """Chained vision passes keep static shapes: the rewritten stages export, and ONNX Runtime runs them
    as eager graphprune does."""
    pytest.importorskip("onnxruntime")
    model, program = llava
    pruned = gp.prune(model, "cls_topk(keep=20) | visionzip(keep=10) | divprune(keep=6)", program=program)
    assert_onnx_matches(pruned, tmp_path / "out", llava_example(model, batch=2, pad=(0, 3), seed=9).as_kwargs())
