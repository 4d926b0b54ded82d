"""EVS (vLLM's Efficient Video Sampling) against the independent reference (tests/reference_evs.py): the
retention mask computed from the model's own video features, then the language model run by hand on
the reduced prompt with the kept tokens' original (M-RoPE) positions. Equal kept sets, prefill logits
(fp32, atol 1e-5) and 16 greedy tokens; batches with left padding equal each sample alone; rate=0 is
the unpruned model; bad rates, per-frame units and models without video are refused up front."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import reference_evs as E
import reference_families as RF
import torch
from checks import assert_batch_equals_samples, assert_same_run
from test_families import _model

import graphprune as gp
from graphprune.errors import InputError, NothingPrunedWarning, PassConfigError, PassNotApplicable
from graphprune.passes.evs import evs_keep
from graphprune.tools import family_zoo

STEPS = 16
FRAMES = 8          # Qwen: 4 temporal patches of 4x4 merged tokens; OneVision: 8 frames of 4x4 pooled ones

# (id, family, items each sample shows in prompt order)
CASES = [
    ("qwen2_vl-video", "qwen2_vl", ("video",)),
    ("qwen2_5_vl-video", "qwen2_5_vl", ("video",)),
    ("qwen2_5_vl-image+video", "qwen2_5_vl", ("image", "video")),
    ("llava_onevision-video", "llava_onevision", ("video",)),
    ("llava_onevision-image+video", "llava_onevision", ("image", "video")),
    ("qwen3_vl-video", "qwen3_vl", ("video",)),      # per-frame blocks; DeepStack of the kept tokens
]
IDS = [c[0] for c in CASES]

def _example(model, items, batch=2, pad=(0, 2)):
    return family_zoo.example(model, batch=batch, pad=pad, items=items, frames=FRAMES)


def _dropped(model, ex, rate):
    """Tokens evs drops of each sample: per video of v tokens over T frames, v - max(v / T, int(v (1 - rate)))."""
    videos = E.video_blocks(model, ex, 0)
    return sum(at.numel() - max(at.numel() // t, int(at.numel() * (1 - rate))) for at, t in videos)


@pytest.mark.parametrize("rate", [0.6, 0.9])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_evs_equals_reference(case, rate):
    """Qwen, rate 0.6: int(64 x 0.4) = 25 of a video's 64 tokens (the truncation); 0.9: int(6.4) < 16, so
    the first frame's 16 (the floor of one frame); OneVision: 51 and 16 of 8 x 16."""
    _, family, items = case
    model, program = _model(family)
    ex = _example(model, items)
    ref = E.evs_generate(model, ex, rate, STEPS)
    pruned = gp.prune(model, "evs", rate=rate, program=program)
    out = assert_same_run(pruned, ex, ref, STEPS, kept=ref["keep"])
    assert ex.input_ids.shape[1] - out.kept.shape[1] == _dropped(model, ex, rate)
    # images, text and separators all stay: only video tokens leave
    for b in range(2):
        gone = set(range(ex.input_ids.shape[1])) - set(out.kept[b].tolist())
        assert all(int(ex.input_ids[b, i]) == model.config.video_token_id for i in gone)


@pytest.mark.parametrize("case", [CASES[2], CASES[3]], ids=[IDS[2], IDS[3]])
def test_hf_model_on_the_reduced_prompt(case):
    """The model's own forward on the reference's reduced prompt (kept embeddings, original positions)
    gives the pruned prefill's logits."""
    _, family, items = case
    model, program = _model(family)
    ex = _example(model, items)
    keep, emb, am, pos = E.evs_inputs(model, ex, 0.6)
    with torch.no_grad():
        hf = model(inputs_embeds=emb, attention_mask=am, position_ids=pos).logits
    out = gp.prune(model, "evs", rate=0.6, program=program)(**ex.as_kwargs())
    assert torch.equal(out.kept, keep)
    real = am.bool()
    torch.testing.assert_close(out.logits[real], hf[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", [CASES[2], CASES[4]], ids=[IDS[2], IDS[4]])
def test_batch_equals_samples_alone(case):
    _, family, items = case
    model, program = _model(family)
    ex = _example(model, items)
    assert_batch_equals_samples(gp.prune(model, "evs", rate=0.6, program=program), ex)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3]], ids=[IDS[0], IDS[2], IDS[3]])
def test_rate_zero_keeps_everything(case):
    _, family, items = case
    model, program = _model(family)
    ex = _example(model, items)
    pruned = gp.prune(model, "evs", rate=0.0, program=program)
    with pytest.warns(NothingPrunedWarning):
        out = pruned(**ex.as_kwargs())
    kw = ex.as_kwargs()
    if family.startswith("llava"):                      # generate()'s positions for left padding
        kw["position_ids"] = (ex.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        hf = model(**kw).logits
    real = ex.attention_mask.bool()
    assert out.kept.shape == ex.input_ids.shape
    torch.testing.assert_close(out.logits[real], hf[real], atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NothingPrunedWarning)
        ids = pruned.generate(**ex.as_kwargs(), max_new_tokens=STEPS, eos_token_id=[])
    with torch.no_grad():
        theirs = model.generate(**ex.as_kwargs(), max_new_tokens=STEPS, do_sample=False, eos_token_id=None,
                                min_new_tokens=STEPS)
    assert torch.equal(ids[:, -STEPS:], theirs[:, -STEPS:])


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.5, 0.74, 0.75, 0.9, 0.99])
def test_retention_rule_ties_and_rounding(rate):
    """The selection function alone on embeddings with exact ties (repeated frames, repeated patches,
    a scaled copy: cosine 1), videos of 2 to 5 frames, against the reference's retention mask."""
    g = torch.Generator().manual_seed(0)
    for frames in (2, 3, 5):
        x = torch.randn(2, 1, frames, 6, 8, generator=g)
        x[0, 0, 1] = x[0, 0, 0]                          # a frame repeated: dissimilarity 0 everywhere
        x[1, 0, -1, :3] = 2 * x[1, 0, -2, :3]            # a scaled copy: cosine 1 as well
        x[:, :, :, 4] = x[:, :, :, 5]                    # two patches equal in every frame: tied scores
        embeds = x.flatten(2, 3)
        picked = evs_keep(k=None, protected=None, valid=None, vision_pos=torch.zeros(2, 1, frames * 6),
                          embeds=embeds, frames=torch.full((2, 1), frames), rate=rate)
        for b in range(2):
            want = E.retention_mask(embeds[b, 0], frames, rate).nonzero(as_tuple=True)[0]
            assert torch.equal(picked[b, 0], want), (frames, b)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), True, "0.5", None])
def test_bad_rates_are_refused(rate):
    with pytest.raises(PassConfigError, match="evs: rate"):
        gp.get_pass("evs")(rate=rate)


def test_refusals_before_work():
    model, program = _model("qwen2_5_vl")
    with pytest.raises(PassConfigError, match="evs: rate=1"):
        gp.prune(model, "evs(rate=1)", program=program)
    with pytest.raises(PassConfigError, match='video_unit="video"'):
        gp.prune(model, "evs", program=program, video_unit="frame")
    with pytest.raises(PassConfigError, match="unexpected keyword|Options are: rate"):
        gp.prune(model, "evs", keep=0.5, program=program)
    # a pipeline with a pass that prunes images too: refused on a prompt holding images
    both = gp.prune(model, "evs(rate=0.5) | fastv(layer=2, keep=4)", program=program)
    with pytest.raises(InputError, match="prunes videos only"):
        both(**_example(model, ("image", "video")).as_kwargs())
    next_model, next_program = _model("llava_next")
    with pytest.raises(PassNotApplicable, match="evs prunes video tokens"):
        gp.prune(next_model, "evs", program=next_program)


def test_video_and_fastv_compose_on_video_prompts():
    """evs at layer 0, then FastV at layer 2 on the kept video tokens (one video unit per sample)."""
    model, program = _model("qwen2_5_vl")
    ex = _example(model, ("video",))
    out = gp.prune(model, "evs(rate=0.5) | fastv(layer=2, keep=8)", program=program)(**ex.as_kwargs())
    assert out.cache.lengths() == [ex.input_ids.shape[1] - 32] * 2 + [ex.input_ids.shape[1] - 56] * 2


def test_image_only_prompt_runs_unpruned_with_a_warning():
    model, program = _model("qwen2_5_vl")
    ex = _example(model, ("image",))
    pruned = gp.prune(model, "evs", program=program)
    with pytest.warns(NothingPrunedWarning, match="prunes videos only"):
        out = pruned(**ex.as_kwargs())
    with torch.no_grad():
        hf = model(**ex.as_kwargs()).logits
    real = ex.attention_mask.bool()
    torch.testing.assert_close(out.logits[real], hf[real], atol=1e-5, rtol=1e-5)
    assert "prunes videos only" in " ".join(out.report.notes)


def test_layer_zero_takes_input_signals_only():
    """A plan at layer 0 acts on the input embeddings: a signal from a layer cannot exist there."""
    model, program = _model("qwen2_5_vl")

    class EarlyFastV(gp.TokenPass):
        name = "early_fastv"

        @dataclass
        class Config:
            keep: int = 4

        def plan(self):
            return gp.Plan(layer=0, signals={"attn": gp.AttentionRows(layer=0)}, select=gp.TopK(self.config.keep))

    with pytest.raises(PassConfigError, match="layer=0 selects before the first LLM layer.*attn"):
        gp.prune(model, [EarlyFastV()], program=program)


def test_units_of_a_videos_only_layout():
    """Images are not units of a videos-only layout (so their size need not match the video's), and each
    video unit carries its frame count."""
    from graphprune.families import family_of
    model, _ = _model("qwen2_5_vl")
    ex = _example(model, ("image", "video"))
    mm = {k: v for k, v in ex.as_kwargs().items() if k not in ("input_ids", "attention_mask")}
    layout = family_of(model).vision_layout(ex.input_ids, video_unit="video", modalities=("video",), **mm)
    assert layout.units == ("video 0",)
    assert layout.frames.tolist() == [[FRAMES // 2]] * 2
    assert layout.pos.shape == (2, 1, 64)
    units = RF.units_of(model, ex, "frame")
    assert family_of(model).vision_layout(ex.input_ids, **mm).frames.tolist() == [[1] * units] * 2
