"""The torch.compile backend on the families of tests/test_families.py and two of
tests/test_families_tier2.py (the same case ids, models and prompts): `torch.compile(model.forward, backend="graphprune", compiler="eager")` on a batch of 2
prunes the prefill exactly as graphprune.prune does (kept tokens' logits, per-layer cache lengths),
and Hugging Face's generate over the compiled forward decodes gp.prune's 16 greedy tokens. Videos are
counted per frame or per video as each case asks (the backend's video_unit option, as gp.prune's).
Whatever the backend cannot prune is refused loudly, never run unpruned (Qwen3-VL's refusal:
tests/test_families_tier2.py).

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
# families whose frames the backend cannot prune; their refusals are tested in tests/test_families_tier2.py
# (test_compile_backend_refuses_with_the_reason)
REFUSED = ("qwen3_vl",)
# and the tier-2 cases whose merges run in frames of their own (the others: tests/test_families_tier2.py)
SPLIT_TIER2 = ("glm4v-2images", "llava_next_video-image+video-per-video")
PRUNED = [c for c in CASES if c[1] not in REFUSED] + [c for c in TIER2 if c[0] in SPLIT_TIER2]


def _compiled_forward(model, video_unit="frame"):
    torch._dynamo.reset()            # a fresh compile per model: HF's shared forward wrapper would
    return torch.compile(model.forward, backend="graphprune",          # exhaust the recompile limit
                         options={"pipeline": PIPELINE, "compiler": "eager", "video_unit": video_unit})


@pytest.mark.parametrize("case", PRUNED, ids=[c[0] for c in PRUNED])
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
    forward, model.forward = model.forward, _compiled_forward(model, unit)
    try:
        with torch.no_grad():
            got = model(**kw)
            ids = model.generate(**kw, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                                 eos_token_id=None)[:, n:]
    finally:
        model.forward = forward
    assert got.logits.shape == want.logits.shape != kw["input_ids"].shape + (want.logits.shape[-1],)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    assert [layer.keys.shape[2] for layer in got.past_key_values.layers] == want.cache.lengths()
    assert torch.equal(ids, pruned.generate(**kw, max_new_tokens=STEPS, eos_token_id=[])[:, n:])
