"""The methods issue 18 added, on a tiny Qwen2.5-VL (windowed ViT, 2x2 merger, M-RoPE LM).

PyramidDrop (an LLM-stage method) runs there: kept sets, per-layer KV lengths, prefill logits (fp32,
atol 1e-5) and 16 greedy tokens equal the independent reference (tests/reference.py runs the decoder
by hand; tests/reference_families.py lays out Qwen's prompt and M-RoPE positions), images and video
frames alike; a left-padded batch of 2 equals each sample alone. VisionZip, VisPruner, DivPrune and
CDPruner act in the vision stage, which graphprune runs eagerly for Qwen (its patch grid is data
dependent): they are refused before any work, naming the method and the model (docs/support.md)."""
import pytest
import reference as R
import reference_families as RF
import reference_new_methods as N
import torch
from checks import assert_same_run

import graphprune as gp
from graphprune.errors import PassNotApplicable
from graphprune.rewrite.pipeline import Program
from graphprune.tools import family_zoo

STEPS = 16
V = 16                       # an 8 x 8 patch grid through the 2 x 2 merger: 16 tokens per image / frame


@pytest.fixture(scope="module")
def qwen25():
    model = family_zoo.build("qwen2_5_vl")
    return model, Program.capture(model)


@pytest.mark.parametrize("batch,pad,items,layers,ratios", [
    (1, (), ("image",), (1, 2, 3), (0.5, 0.25, 0.125)),
    (2, (0, 2), ("image",), (1, 3), (0.5, 0.25)),
    (2, (0, 2), ("image", "video"), (2,), (0.5,)),       # units: the image and each of the video's 2 frames
])
def test_pyramiddrop_matches_reference(qwen25, batch, pad, items, layers, ratios):
    model, program = qwen25
    ex = family_zoo.example(model, batch=batch, pad=pad, items=items, seed=batch + 30)
    units = RF.units_of(model, ex)
    emb, am, pos, vm = RF.family_inputs(model, ex)
    ref = R.lm_generate(model, emb, am, pos, selects=N.pyramiddrop_selects(layers, ratios, V, images=units),
                        vision_mask=vm, max_new_tokens=STEPS)
    pruned = gp.prune(model, "pyramiddrop", layers=layers, ratios=ratios, program=program)
    out = assert_same_run(pruned, ex, ref, STEPS, kept=ref["keep"])
    assert vm.gather(1, out.kept).sum(1).tolist() == [units * int(V * ratios[-1])] * batch


def test_pyramiddrop_batch_equals_alone(qwen25):
    model, program = qwen25
    ex = family_zoo.example(model, batch=2, pad=(0, 3), items=("image",), seed=33)
    pruned = gp.prune(model, "pyramiddrop(layers=(1, 3), ratios=(0.5, 0.25))", program=program)
    both = pruned(**ex.as_kwargs())
    ids = pruned.generate(**ex.as_kwargs(), max_new_tokens=STEPS, eos_token_id=[])
    for b in range(2):
        one = ex.sample(b)
        alone = pruned(**one.as_kwargs())
        torch.testing.assert_close(both.logits[b][both.cache[-1].mask[b].bool()], alone.logits[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(pruned.generate(**one.as_kwargs(), max_new_tokens=STEPS, eos_token_id=[])[0, -STEPS:],
                           ids[b, -STEPS:])


@pytest.mark.parametrize("spec", ["visionzip(keep=8)", "vispruner(keep=8)", "divprune(keep=8)", "cdpruner(keep=8)"])
def test_vision_methods_refused_naming_method_and_model(qwen25, spec):
    model, program = qwen25
    with pytest.raises(PassNotApplicable) as err:
        gp.prune(model, spec, program=program)
    msg = str(err.value)
    assert spec.split("(")[0] in msg and "Qwen2_5_VL" in msg

