"""VisionTrim passes against the independent reference (tests/reference_visiontrim.py).

The tiny model's projector outputs and token embeddings are ~0.05 in size, which flattens every
VisionTrim score to within float rounding; as the reference's own tests do, a copy with the
projector's last layer and the embeddings scaled by 40 gives margins of ~1e-3.
"""
import pytest
import reference as R
import reference_visiontrim as RV
import torch
from checks import assert_same_run

import graphprune as gp
from graphprune.errors import InputError, PassConfigError, PassNotApplicable
from graphprune.rewrite.pipeline import Program
from graphprune.tools.zoo import llava_example, tiny_llava

STEPS = 16


@pytest.fixture(scope="module")
def scaled():
    model = tiny_llava()
    with torch.no_grad():
        proj = model.model.multi_modal_projector.linear_2
        proj.weight.mul_(40)
        proj.bias.mul_(40)
        model.model.language_model.embed_tokens.weight.mul_(40)
    return model, Program.capture(model)



@pytest.mark.parametrize("batch,pad,keep,dominant,iterations", [(1, (), 12, None, 1), (2, (0, 3), 16, 10, 2)])
def test_vision_stage_matches_reference(scaled, batch, pad, keep, dominant, iterations):
    model, program = scaled
    ex = llava_example(model, batch=batch, pad=pad, seed=batch)
    vo = RV.visiontrim_vision(model, ex, keep=keep, dominant=dominant, iterations=iterations)
    emb, am, pos, vm, _ = R.llava_inputs_from_vision(model, ex, vo, positions="keep")
    ref = R.lm_generate(model, emb, am, pos, vision_mask=vm, max_new_tokens=STEPS)
    pruned = gp.prune(model, "visiontrim", program=program, keep=keep, dominant=dominant, iterations=iterations)
    assert [p.name for p in pruned.pipeline] == ["visiontrim_vision"]
    assert_same_run(pruned, ex, ref, STEPS)
    assert pruned.report.patches_kept == vo["patch_index"].tolist()
    k = keep - keep // 4 if dominant is None else dominant
    assert vo["centres"].shape[-1] == keep - k > 0      # complements were really merged


@pytest.mark.parametrize("batch,pad", [(1, ()), (2, (0, 3))])
def test_llm_stage_matches_reference(scaled, batch, pad):
    model, program = scaled
    ex = llava_example(model, batch=batch, pad=pad, seed=batch)
    emb, am, pos, vm = R.llava_inputs(model, ex)
    ref = R.lm_generate(model, emb, am, pos, selects={2: RV.visiontrim_llm_select(12)}, vision_mask=vm,
                        max_new_tokens=STEPS)
    pruned = gp.prune(model, "visiontrim", program=program, keep=12, stage="llm", layer=2)
    assert_same_run(pruned, ex, ref, STEPS, kept=ref["keep"])


def test_complements_are_centre_plus_convex_combination(scaled):
    """Eq. 11: each complement token minus its centre is a convex combination of its cluster."""
    torch.manual_seed(0)
    from graphprune.rewrite.blocks import tgvc
    tokens, text = torch.randn(1, 1, 20, 8), torch.randn(1, 1, 5, 8)
    centres, comp = tgvc(tokens, text, torch.ones(1, 1, 5, dtype=torch.bool), 3)
    others = [i for i in range(20) if i not in centres[0, 0].tolist()]
    for j, c in enumerate(centres[0, 0].tolist()):
        diff = comp[0, 0, j] - tokens[0, 0, c]
        if diff.abs().sum() == 0:
            continue                                    # an empty cluster leaves its centre unchanged
        assert RV.is_convex_combination(diff, tokens[0, 0, others])


def test_bad_options_fail_before_running(scaled):
    model, program = scaled
    with pytest.raises(PassConfigError, match="exceeds the 36 vision tokens"):
        gp.prune(model, "visiontrim", program=program, keep=40, dominant=8)   # R = 32 > the 28 left of 36
    with pytest.raises(PassConfigError, match="dominant"):
        gp.prune(model, "visiontrim", program=program, keep=8, dominant=9)
    with pytest.raises(PassConfigError, match="window"):
        gp.prune(model, "visiontrim", program=program, keep=8, window=4)
    with pytest.raises(PassConfigError, match="stage"):
        gp.prune(model, "visiontrim", program=program, keep=8, stage="decoder")


def test_llm_stage_refuses_a_reduced_grid(scaled):
    model, program = scaled
    ex = llava_example(model, batch=1)
    pruned = gp.prune(model, "cls_topk(keep=16) | visiontrim_llm(keep=8, layer=2)", program=program)
    with pytest.raises(InputError, match="full patch grid"):
        pruned(**ex.as_kwargs())


def test_qwen2vl_has_no_cls_for_the_vision_stage(qwen):
    model, program = qwen
    with pytest.raises(PassNotApplicable, match="CLS"):
        gp.prune(model, "visiontrim", program=program, keep=4)
