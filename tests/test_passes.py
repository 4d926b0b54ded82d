"""Each pass against the independent eager reference (tests/reference.py): kept indices,
prefill logits (fp32, atol 1e-5) and 16 greedy decode steps through the shrunk caches."""
import pytest
import reference as R
import torch

import graphprune as gp
from graphprune.tools.zoo import llava_example, qwen2vl_example

STEPS = 16


def _check(pruned, ex, ref, prompt_index=None):
    """prompt_index: for vision-pruned prompts, the prompt index of each token the LLM receives."""
    out = pruned(**ex.as_kwargs())
    if ref["keep"] is not None:
        expect = ref["keep"] if prompt_index is None else prompt_index.gather(1, ref["keep"])
        assert torch.equal(out.kept, expect)
    real = torch.ones_like(out.kept, dtype=torch.bool) if ex.attention_mask is None else \
        out.cache[-1].mask.bool()
    torch.testing.assert_close(out.logits[real], ref["prefill_logits"][real], atol=1e-5, rtol=1e-5)
    assert out.cache.lengths() == ref["kv_lens"]
    ids = pruned.generate(**ex.as_kwargs(), max_new_tokens=STEPS, eos_token_id=[])
    assert torch.equal(ids[:, -STEPS:], ref["tokens"])
    return out


LLAVA_CASES = [
    ("fastv", dict(layer=2, keep=9), lambda: R.fastv_select(9), 2),
    ("fastv", dict(layer=1, keep=4), lambda: R.fastv_select(4), 1),
    ("fastv", dict(layer=3, keep=0.5), lambda: R.fastv_select(18), 3),
    ("vtw", dict(layer=2), R.vtw_select, 2),
    ("vtw", dict(layer=3), R.vtw_select, 3),
]


@pytest.mark.parametrize("batch,pad", [(1, ()), (2, (0, 3))])
@pytest.mark.parametrize("method,opts,select,layer", LLAVA_CASES)
def test_llm_passes_llava(llava, method, opts, select, layer, batch, pad):
    model, program = llava
    ex = llava_example(model, batch=batch, pad=pad, seed=batch)
    emb, am, pos, vm = R.llava_inputs(model, ex)
    ref = R.lm_generate(model, emb, am, pos, select=select(), select_layer=layer, max_new_tokens=STEPS, vision_mask=vm)
    _check(gp.prune(model, method, program=program, **opts), ex, ref)


@pytest.mark.parametrize("method,opts,select,layer", [
    ("fastv", dict(layer=2, keep=5), lambda: R.fastv_select(5), 2),
    ("vtw", dict(layer=1), R.vtw_select, 1),
])
def test_llm_passes_qwen2vl(qwen, method, opts, select, layer):
    model, program = qwen
    ex = qwen2vl_example(model, batch=2, pad=(0, 2))
    emb, am, pos, vm = R.qwen2vl_inputs(model, ex)
    ref = R.lm_generate(model, emb, am, pos, select=select(), select_layer=layer, max_new_tokens=STEPS, vision_mask=vm)
    _check(gp.prune(model, method, program=program, **opts), ex, ref)


@pytest.mark.parametrize("positions", ["compact", "keep"])
def test_cls_topk_llava(llava, positions):
    model, program = llava
    ex = llava_example(model, batch=2, pad=(0, 3), images_per_sample=2)
    pruned = gp.prune(model, "cls_topk", keep=9, positions=positions, program=program)
    emb, am, pos, vm = R.llava_inputs(model, ex, cls_keep=9)
    if positions == "keep":         # kept tokens keep the ids they had in the full prompt
        full = R.llava_inputs(model, ex)[2]
        pos = full.gather(1, pruned(**ex.as_kwargs()).kept)
    ref = R.lm_generate(model, emb, am, pos, max_new_tokens=STEPS)
    out = _check(pruned, ex, ref)
    _, kept = R.llava_image_features(model, ex.pixel_values, cls_keep=9)
    assert torch.equal(torch.tensor(pruned.report.patches_kept), kept)
    assert out.report.vision_tokens_in == 2 * 9


def test_pipeline_vision_then_llm(llava):
    """cls_topk in the vision stage, then FastV in the LLM on what is left."""
    model, program = llava
    ex = llava_example(model, batch=2, pad=(0, 3))
    pruned = gp.prune(model, "cls_topk(keep=18) | fastv(layer=2, keep=6)", program=program)
    emb, am, pos, vm = R.llava_inputs(model, ex, cls_keep=18)
    ref = R.lm_generate(model, emb, am, pos, select=R.fastv_select(6), select_layer=2, max_new_tokens=STEPS,
                        vision_mask=vm)
    _check(pruned, ex, ref, prompt_index=_after_cls(model, ex, 18))


def _after_cls(model, ex, keep):
    """Prompt index of the tokens left once each image keeps its top-`keep` CLS patches."""
    _, patches = R.llava_image_features(model, ex.pixel_values, cls_keep=keep)
    rows = []
    for b in range(ex.input_ids.shape[0]):
        img = torch.nonzero(ex.input_ids[b] == model.config.image_token_id)[:, 0]
        text = torch.nonzero(ex.input_ids[b] != model.config.image_token_id)[:, 0]
        rows.append(torch.cat([text, img[patches[b]]]).sort().values)
    return torch.stack(rows)


def test_two_llm_selections_compose(llava):
    """fastv at layer 1 then vtw at layer 3: later layers see the composition, caches per layer."""
    model, program = llava
    ex = llava_example(model, batch=2, pad=(0, 3))
    pruned = gp.prune(model, "fastv(layer=1, keep=12) | vtw(layer=3)", program=program)
    out = pruned(**ex.as_kwargs())
    v, s = 36, ex.input_ids.shape[1]
    assert out.cache.lengths() == [s, s - v + 12, s - v + 12, s - v]
    for b in range(2):
        assert not (ex.input_ids[b, out.kept[b]] == model.config.image_token_id).any()
