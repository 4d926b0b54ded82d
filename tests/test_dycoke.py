"""DyCoke's temporal token merging (passes/dycoke.py) against the independent reference
(tests/reference_evs.py: ttm_mask, a per-frame loop written from the paper's window rule, on the
model's own video features; the language model then run by hand on the reduced prompt with the kept
tokens' original positions). Equal kept sets, prefill logits (fp32, atol 1e-5) and 16 greedy tokens;
a left-padded batch equals each sample alone; bad rates and per-frame units are refused up front."""
from __future__ import annotations

import pytest
import reference_evs as E
import torch
from checks import assert_batch_equals_samples, assert_same_run
from test_families import _model

import graphprune as gp
from graphprune.errors import InputError, PassConfigError, PassNotApplicable
from graphprune.passes.dycoke import dycoke_keep
from graphprune.tools import family_zoo

STEPS = 16

# (id, family, items each sample shows, frames): Qwen's frames are temporal patches (8 frames -> 4,
# one window); OneVision's 6 sampled frames make a whole window and a partial one
CASES = [
    ("qwen2_5_vl-image+video", "qwen2_5_vl", ("image", "video"), 8),
    ("llava_onevision-video", "llava_onevision", ("video",), 6),
    ("qwen3_vl-video", "qwen3_vl", ("video",), 8),
]
IDS = [c[0] for c in CASES]


def _example(model, items, frames, batch=2, pad=(0, 2)):
    return family_zoo.example(model, batch=batch, pad=pad, items=items, frames=frames)


def _kept_per_video(tokens: int, frames: int, rate: float) -> int:
    """Anchors (frames 0, 4, 8, ...) whole, every other frame int((1 - rate) N) of its N tokens."""
    per_frame, anchors = tokens // frames, (frames + 3) // 4
    return anchors * per_frame + (frames - anchors) * int((1 - rate) * per_frame)


@pytest.mark.parametrize("rate", [0.7, 0.5])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dycoke_equals_reference(case, rate):
    _, family, items, frames = case
    model, program = _model(family)
    ex = _example(model, items, frames)
    ref = E.evs_generate(model, ex, rate, STEPS, rule=E.ttm_mask)
    out = assert_same_run(gp.prune(model, "dycoke", rate=rate, program=program), ex, ref, STEPS, kept=ref["keep"])
    videos = E.video_blocks(model, ex, 0)
    dropped = sum(at.numel() - _kept_per_video(at.numel(), t, rate) for at, t in videos)
    assert ex.input_ids.shape[1] - out.kept.shape[1] == dropped > 0
    for b in range(2):                      # only video tokens leave
        gone = set(range(ex.input_ids.shape[1])) - set(out.kept[b].tolist())
        assert all(int(ex.input_ids[b, i]) == model.config.video_token_id for i in gone)


def test_batch_equals_samples_alone():
    model, program = _model("llava_onevision")
    assert_batch_equals_samples(gp.prune(model, "dycoke", program=program), _example(model, ("video",), 6))


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.7, 0.9])
def test_window_rule_with_ties(rate):
    """The selection function alone, videos of 1 to 9 frames (whole and partial windows), with exact
    ties (a repeated frame, two patches equal in every frame), against the reference loop."""
    g = torch.Generator().manual_seed(0)
    for frames in (1, 2, 3, 4, 5, 8, 9):
        x = torch.randn(2, 1, frames, 6, 8, generator=g)
        if frames > 1:
            x[0, 0, 1] = x[0, 0, 0]
        x[:, :, :, 4] = x[:, :, :, 5]
        embeds = x.flatten(2, 3)
        picked = dycoke_keep(k=None, protected=None, valid=None, vision_pos=torch.zeros(2, 1, frames * 6),
                             embeds=embeds, frames=torch.full((2, 1), frames), rate=rate)
        for b in range(2):
            want = E.ttm_mask(embeds[b, 0], frames, rate).nonzero(as_tuple=True)[0]
            assert torch.equal(picked[b, 0], want), (frames, b)


@pytest.mark.parametrize("rate", [-0.1, 1.0, float("nan"), "0.5", None])
def test_bad_rates_are_refused(rate):
    with pytest.raises(PassConfigError, match="dycoke: rate"):
        gp.get_pass("dycoke")(rate=rate)


def test_refusals_before_work():
    model, program = _model("qwen2_5_vl")
    with pytest.raises(PassConfigError, match='video_unit="video"'):
        gp.prune(model, "dycoke", program=program, video_unit="frame")
    with pytest.raises(PassConfigError, match="unexpected keyword|Options are: rate"):
        gp.prune(model, "dycoke", keep=0.5, program=program)
    with pytest.raises(InputError, match="one frame count"):
        dycoke_keep(k=None, protected=None, valid=None, vision_pos=None, embeds=torch.zeros(2, 1, 12, 4),
                    frames=torch.tensor([[4], [3]]), rate=0.5)
    next_model, next_program = _model("llava_next")
    with pytest.raises(PassNotApplicable, match="video"):
        gp.prune(next_model, "dycoke", program=next_program)
