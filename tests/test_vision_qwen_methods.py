"""VisPruner and ToMe on a tiny Qwen2.5-VL (windowed ViT, no CLS, 2x2 merger, M-RoPE LM), the encoder captured
per patch grid: kept (and merged) sets, prefill logits (fp32, atol 1e-5) and 16 greedy tokens equal the
independent references (tests/reference_vision_qwen_methods.py, the pruned prompt run through the model's own
forward by reference_vision_qwen.hf_generate); a left-padded batch of 2 equals each sample alone; bad options
are refused before any work."""
import pytest
import reference_vision_qwen as RQ
import reference_vision_qwen_methods as RM
import torch
from checks import assert_batch_equals_samples, assert_same_run

import graphprune as gp
from graphprune.errors import PassConfigError, PassNotApplicable
from graphprune.rewrite.pipeline import Program
from graphprune.tools import family_zoo

STEPS = 16
VISPRUNER = "vispruner(keep={keep}, important='attention', positions='keep')"
pytestmark = pytest.mark.filterwarnings("ignore::graphprune.errors.ShapeBucketWarning")


@pytest.fixture(scope="module")
def qwen25():
    model = family_zoo.build("qwen2_5_vl")
    return model, Program.capture(model, stages=("vision", "prefill", "decode"))


@pytest.mark.parametrize("keep,ratio,batch,pad,items,seed", [
    (8, 0.5, 2, (0, 2), ("image", "video"), 44),     # units: the image and each of the video's 2 frames
    (5, 0.25, 1, (), ("image",), 45),                # 1 important, 4 diverse after two rounds (15 -> 7 -> 4)
])
def test_vispruner_attention_matches_reference(qwen25, keep, ratio, batch, pad, items, seed):
    model, program = qwen25
    ex = family_zoo.example(model, batch=batch, pad=pad, items=items, seed=seed)
    kept = RM.vispruner(model, ex, keep, ratio)
    assert not torch.equal(kept, RQ.kept_positions(model, ex, keep, "attention"))    # the diverse tokens matter
    ref = RQ.hf_generate(model, ex, kept, STEPS)
    pruned = gp.prune(model, VISPRUNER.format(keep=keep)[:-1] + f", important_ratio={ratio})", program=program)
    assert_same_run(pruned, ex, ref, STEPS, kept=kept)


def test_vispruner_batch_equals_alone(qwen25):
    model, program = qwen25
    ex = family_zoo.example(model, batch=2, pad=(0, 3), items=("image", "video"), seed=47)
    assert_batch_equals_samples(gp.prune(model, VISPRUNER.format(keep=6), program=program), ex, STEPS)


@pytest.mark.parametrize("spec,error,words", [
    ("vispruner(keep=8, positions='keep')", PassNotApplicable, ["vispruner", "CLS token", "important='attention'"]),
    ("vispruner(keep=8, important='cls_free', positions='keep')", PassConfigError, ["important", "'cls_free'"]),
    ("vispruner(keep=8, important='attention')", PassNotApplicable, ["positions='compact'", "M-RoPE"]),
    ("vispruner(keep=0, important='attention', positions='keep')", PassConfigError, ["keep=0"]),
])
def test_bad_options_refused_before_work(qwen25, spec, error, words):
    model, program = qwen25
    with pytest.raises(error) as err:
        gp.prune(model, spec, program=program)
    assert all(w in str(err.value) for w in words), str(err.value)
