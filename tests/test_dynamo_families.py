"""The torch.compile backend on the families of tests/test_families.py and two of
tests/test_families_tier2.py (the same case ids, models and prompts): `torch.compile(model.forward, backend="graphprune", compiler="eager")` on a batch of 2
prunes the prefill exactly as graphprune.prune does (kept tokens' logits, per-layer cache lengths),
and Hugging Face's generate over the compiled forward decodes gp.prune's 16 greedy tokens. Videos are
counted per frame or per video as each case asks (the backend's video_unit option, as gp.prune's).
Whatever the backend cannot prune is refused loudly, never run unpruned (tier-2 refusals:
tests/test_families_tier2.py). Qwen3-VL, which dynamo runs one decoder layer per frame
(targets/dynamo_layers.py), also through the other LLM-stage methods and a padded batch.

Unpadded batches: a padded prefill is pruned exactly too, but Hugging Face's decode over the shrunk
caches cannot take padding, which the backend refuses (tests/test_dynamo.py)."""
from __future__ import annotations

import pytest
import torch
from test_families import CASES, _example, _model
from test_families_tier2 import CASES as TIER2

import graphprune as gp
from graphprune.compat import transformers_major

STEPS = 16
PIPELINE = "fastv(layer=2, keep=3)"
# the tier-2 cases whose merges run in frames of their own (the others: tests/test_families_tier2.py)
SPLIT_TIER2 = ("glm4v-2images", "llava_next_video-image+video-per-video")
PRUNED = list(CASES) + [c for c in TIER2 if c[0] in SPLIT_TIER2]
# covered in the fast set by a case of the same code path (qwen2_5_vl-image+video, the LLaVA compile tests
# of test_dynamo.py, llava_onevision-image+video-per-video; qwen2_vl's video frames: qwen2_5_vl-image+video;
# GLM-4.1V's M-RoPE merge frames: qwen2_5_vl's):
# `-m slow` runs them
SLOW_CASES = ("qwen2_5_vl-image", "qwen2_vl-video", "qwen2_5_vl-video-per-video", "llava-2images",
              "llava_onevision-video", "glm4v-2images")


def _compiled_forward(model, video_unit="frame", pipeline=PIPELINE):
    torch._dynamo.reset()            # a fresh compile per model: HF's shared forward wrapper would
    return torch.compile(model.forward, backend="graphprune",          # exhaust the recompile limit
                         options={"pipeline": pipeline, "compiler": "eager", "video_unit": video_unit})


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0], marks=[pytest.mark.slow] if c[0] in SLOW_CASES else [])
                                  for c in PRUNED])
def test_compiled_equals_prune(case):
    _, family, items, unit = case
    model, program = _model(family)
    kw = _example(model, items, pad=(0, 0)).as_kwargs()
    n = kw["input_ids"].shape[1]
    if family == "gemma3" and transformers_major() < 5:           # its HybridCache: refused, not run unpruned
        with pytest.raises(Exception, match="PassNotApplicable: graphprune could not apply .*HybridCache"):
            with torch.no_grad():
                _compiled_forward(model, unit)(**kw)
        return
    pruned = gp.prune(model, PIPELINE, program=program, video_unit=unit)
    want = pruned(**kw)
    got, ids = _forward_and_generate(model, _compiled_forward(model, unit), kw)
    assert got.logits.shape == want.logits.shape != kw["input_ids"].shape + (want.logits.shape[-1],)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    assert [layer.keys.shape[2] for layer in got.past_key_values.layers] == want.cache.lengths()
    assert torch.equal(ids, pruned.generate(**kw, max_new_tokens=STEPS, eos_token_id=[])[:, n:])


def _forward_and_generate(model, compiled_forward, kw):
    """The model's output and its STEPS greedy tokens with `compiled_forward` as its forward."""
    n = kw["input_ids"].shape[1]
    forward, model.forward = model.forward, compiled_forward
    try:
        with torch.no_grad():
            return model(**kw), model.generate(**kw, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                                               eos_token_id=None)[:, n:]
    finally:
        model.forward = forward


# Qwen3-VL's per-layer frames with the other LLM-stage methods, `-m slow` (fastv runs through the same frames
# in the fast set: test_compiled_equals_prune[qwen3_vl-image+video])
QWEN3_PIPELINES = [pytest.param(p, marks=pytest.mark.slow)
                   for p in ("dart(layer=2, keep=6)", "vtw(layer=2)", "random(layer=1, keep=0.5, seed=3)")]


@pytest.mark.parametrize("pipeline", QWEN3_PIPELINES)
def test_qwen3_vl_layer_frames_equal_prune(pipeline):
    """An image + video prompt through the per-layer frames: the kept tokens' logits and every
    layer's cache length equal gp.prune's, and HF's generate decodes its greedy tokens."""
    model, program = _model("qwen3_vl")
    kw = _example(model, ("image", "video"), pad=(0, 0)).as_kwargs()
    n = kw["input_ids"].shape[1]
    pruned = gp.prune(model, pipeline, program=program)
    want = pruned(**kw)
    got, ids = _forward_and_generate(model, _compiled_forward(model, pipeline=pipeline), kw)
    assert got.logits.shape == want.logits.shape
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    assert [layer.keys.shape[2] for layer in got.past_key_values.layers] == want.cache.lengths()
    assert torch.equal(ids, pruned.generate(**kw, max_new_tokens=STEPS, eos_token_id=[])[:, n:])


def test_qwen3_vl_padded_prefill_equals_prune_and_refusals():
    """A left-padded batch of 2 prefills exactly as gp.prune (the padding mask read from the layer
    frames' 4-D mask), warning that HF's decode cannot follow; a video counted whole is refused, since
    no frame tells which of the frame blocks make one video; so is Inductor on the layer frames."""
    model, program = _model("qwen3_vl")
    kw = _example(model, ("image", "video"), pad=(0, 3)).as_kwargs()
    want = gp.prune(model, PIPELINE, program=program)(**kw)
    compiled = _compiled_forward(model)
    with torch.no_grad(), pytest.warns(UserWarning, match="padded batch"):
        got = compiled(**kw)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    assert [layer.keys.shape[2] for layer in got.past_key_values.layers] == want.cache.lengths()
    with pytest.raises(Exception, match='video_unit="video" needs to know which frames make each video'):
        with torch.no_grad():
            _compiled_forward(model, video_unit="video")(**kw)
    torch._dynamo.reset()
    with pytest.raises(Exception, match='PassConfigError: .*compiler="eager" only'):
        with torch.no_grad():
            torch.compile(model.forward, backend="graphprune", options={"pipeline": PIPELINE})(**kw)
