"""positions="compact" between LLM layers against a plain-PyTorch reference (tests/reference.py's
lm_generate with positions="compact") that renumbers the kept tokens by hand: kept sets, prefill logits
(fp32, atol 1e-5), per-layer caches and 16 greedy tokens where each layer's new token continues that
layer's own numbering. Batch 2 with left padding; M-RoPE models are refused."""
import pytest
import reference as R
import torch
from checks import assert_same_run

import graphprune as gp
from graphprune.errors import PassNotApplicable
from graphprune.tools.zoo import llava_example

STEPS = 16


def _reference(model, ex, selects, **kw):
    emb, mask, pos, vmask = R.llava_inputs(model, ex)
    return R.lm_generate(model, emb, mask, pos, selects=selects, vision_mask=vmask, max_new_tokens=STEPS, **kw)


@pytest.mark.parametrize("pad", [(), (3,)])
def test_fastv_compact_matches_reference(llava, pad):
    model, program = llava
    ex = llava_example(model, batch=2 if pad else 1, pad=pad, seed=3)
    pruned = gp.prune(model, "fastv", layer=2, keep=9, positions="compact", program=program)
    ref = _reference(model, ex, {2: R.fastv_select(9)}, positions="compact")
    assert_same_run(pruned, ex, ref, STEPS, kept=ref["keep"])
    keep_ref = _reference(model, ex, {2: R.fastv_select(9)})
    assert not torch.allclose(ref["prefill_logits"], keep_ref["prefill_logits"], atol=1e-4)   # renumbering matters


def test_two_compact_selections_match_reference(llava):
    model, program = llava
    ex = llava_example(model, batch=2, pad=(0, 2), seed=5)
    pruned = gp.prune(model, "fastv(layer=1, keep=20, positions='compact') | fastv(layer=3, keep=7, positions='compact')",
                      program=program)
    ref = _reference(model, ex, {1: R.fastv_select(20), 3: R.fastv_select(7)}, positions="compact")
    assert_same_run(pruned, ex, ref, STEPS, kept=ref["keep"])


def test_batch_equals_each_sample_alone(llava):
    model, program = llava
    ex = llava_example(model, batch=2, pad=(0, 3), seed=7)
    pruned = gp.prune(model, "fastv", layer=2, keep=9, positions="compact", program=program)
    both = pruned.generate(**ex.as_kwargs(), max_new_tokens=STEPS, eos_token_id=[])
    for b in range(2):
        real = ex.attention_mask[b].bool()
        one = pruned.generate(input_ids=ex.input_ids[b:b + 1, real], attention_mask=ex.attention_mask[b:b + 1, real],
                              pixel_values=ex.pixel_values[b:b + 1], max_new_tokens=STEPS, eos_token_id=[])
        assert torch.equal(both[b, -STEPS:], one[0, -STEPS:])


def test_mrope_compact_is_refused(qwen):
    model, program = qwen
    with pytest.raises(PassNotApplicable, match="M-RoPE"):
        gp.prune(model, "fastv", layer=2, keep=9, positions="compact", program=program)
