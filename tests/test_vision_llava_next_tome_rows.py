"""tome(positions='keep') on anyres images saves encoder compute: after each merge layer the crops' encoder sequences
drop the merged-away slots every crop reaches (a crop's merge count is static per image size: r, or its share of
keep, from its surviving tokens; at most half of them), so the later encoder layers run shorter sequences; what a
crop merged beyond that stays masked, as do all merged-away slots where the crops' counts leave nothing in common.

Structure: the query lengths each encoder attention of the pruned vision graph runs (recorded as the graph runs),
against the lengths worked out by hand from the image's crops (reference_vision_llava_next_merge.token_patches) and
the paper's merge count (reference_vision_llava_next_tome.merges_now). Results: crops that merge different counts,
against the independent reference (tests/test_vision_llava_next_tome.py's check, which its cases, equal counts,
pass unchanged)."""
import pytest
import reference_vision_llava_next as RN
import reference_vision_llava_next_merge as RM
import reference_vision_llava_next_tome as RT
import torch
from test_vision_llava_next import _built, _example
from test_vision_llava_next_tome import test_tome_in_place_on_crops_matches_reference as matches_reference
from torch import fx

import graphprune as gp

pytestmark = pytest.mark.filterwarnings("ignore::graphprune.errors.ShapeBucketWarning")
SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _query_lengths(stage) -> list[int]:
    """The query length of every encoder attention of a vision stage's graph, as it runs on its check pixels."""
    seen = []

    class Recorder(fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if target is SDPA:
                seen.append(int(args[0].shape[2]))
            return super().call_function(target, args, kwargs)

    with torch.no_grad():
        Recorder(stage.gm).run(*stage.check_inputs)
    return seen


def _expected_lengths(model, size, layers, r=None, keep=None) -> tuple[list[int], list[list[int]]]:
    """Per encoder layer feeding the features, the crops' sequence length (leading CLS and side^2 patches, less
    what every crop dropped so far), and per merge layer each crop's merge count."""
    side, cls = RM._side(model), RM._cls(model)
    _, last = RM._encoder(model)
    crop = RM.token_patches(model, torch.tensor(size)) // (side * side)
    alive = torch.bincount(crop, minlength=RN.crops_of(model, list(size))).tolist()
    masked, length, lengths, counts = [0] * len(alive), cls + side * side, [], []
    for l in range(last + 1):
        lengths.append(length)
        if l in layers and l < last:           # a merge after the last feature layer shortens no encoder layer
            left = len([m for m in layers if m >= l])
            merged = [RT.merges_now(a, r, keep, left) for a in alive]
            alive = [a - m for a, m in zip(alive, merged)]
            masked = [k + m for k, m in zip(masked, merged)]
            drop = min(masked)
            masked, length = [k - drop for k in masked], length - drop
            counts.append(merged)
    return lengths, counts


# family, image size, options, what the crops do at the first merge; the first case is fast
STRUCTURE = [("llava_next", (50, 90), dict(r=3, layers=(0,)), "3 slots per crop dropped from the encoder after "
              "layer 0"),
             ("llava_onevision", (60, 224), dict(keep=20, layers=(0, 1)), "6 slots per crop dropped from the encoder "
              "after layer 0 (16 more masked at most: crops merge different counts)"),
             ("llava_next", (30, 112), dict(r=5, layers=(0,)), "4 slots per crop dropped from the encoder after layer "
              "0 (1 more masked at most: crops merge different counts)"),
             ("llava_onevision", (112, 56), dict(keep=30, layers=(0, 1)), "masked, not dropped: crops merge different "
              "counts (17, 0, 0)")]


@pytest.mark.parametrize("family,size,opts,note", [
    pytest.param(*case, marks=() if i == 0 else pytest.mark.slow) for i, case in enumerate(STRUCTURE)])
def test_later_encoder_layers_run_shorter_sequences(family, size, opts, note):
    """The pruned vision graph of an image size runs the encoder layers up to the first merge on the full crops and
    each layer after a merge on sequences shorter by the merged-away slots every crop reaches (none where a crop
    merges nothing); the pass's info says what happened to the merged-away slots."""
    model, program = _built(family)
    lengths, counts = _expected_lengths(model, size, opts["layers"], opts.get("r"), opts.get("keep"))
    assert any(counts[0]) and (lengths[-1] < lengths[0]) == (not note.startswith("masked, not dropped"))
    spec = "tome(" + ", ".join(f"{k}={v!r}" for k, v in opts.items()) + ", positions='keep')"
    pruned = gp.prune(model, spec, program=program)
    pruned(**_example(model, size, seed=63).as_kwargs())
    stage, results = pruned.program.buckets[list(pruned.program.buckets)[-1]]     # the example's image size
    assert _query_lengths(stage) == lengths
    assert results[0].info.get("plans", [results[0].info])[0]["encoder_rows"] == note


# crops that merge different counts (partly dropped, partly masked) against the independent reference
@pytest.mark.parametrize("family,size,opts", [
    pytest.param("llava_next", (30, 112), dict(r=5, layers=(0,))),
    pytest.param("llava_onevision", (60, 224), dict(keep=20, layers=(0, 1)), marks=pytest.mark.slow)])
def test_unequal_crop_counts_match_reference(family, size, opts, monkeypatch):
    """Where crops merge different counts (an unpadded crop has fewer survivors), every crop drops the count all
    reach and masks the rest: which token merged into which, the LLM's mask, prefill logits (fp32, atol 1e-5) and 16
    greedy tokens equal the reference's (tests/test_vision_llava_next_tome.py's check)."""
    model, _ = _built(family)
    counts = _expected_lengths(model, size, opts["layers"], opts.get("r"), opts.get("keep"))[1]
    assert len(set(counts[0])) > 1 and min(counts[0]) > 0          # partly dropped, partly masked
    matches_reference(family, size, opts, monkeypatch)
