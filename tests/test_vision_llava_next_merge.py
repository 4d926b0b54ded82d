"""MustDrop on LLaVA-NeXT / LLaVA-OneVision anyres images: the window merge per crop grid (windows never cross
crops, patches unpadded away are no tokens). Each crop runs as its own encoder sequence, so either
mustdrop_merge(layer=None) merges the feature layer's states at the features (the whole pipeline: key set first,
merge, filters, cache, on LLaVA-NeXT), or mustdrop_merge(layer=1, positions='keep', order='raster') merges after
encoder layer 0 as in the paper, in place: merged-away patches masked as keys crop by crop (the pipeline then in
the paper's order: merge, key set, filters, cache). layer=1 with compact positions or exact mode is refused.

Against tests/reference_vision_llava_next_merge.py (independent: tiles by hand on each crop's grid, the tokens
laid out by the model's own pack_image_features, the pruned prompt run by reference.lm_generate): kept slots,
prefill logits (fp32, atol 1e-5) and 16 greedy tokens; a left-padded batch of 2 equals each sample alone."""
import pytest
import reference_mustdrop as M
import reference_vision_llava_next_merge as RM
import torch
from checks import assert_batch_equals_samples, assert_same_run
from test_vision_llava_next import _built, _example

import graphprune as gp
from graphprune import tokenops
from graphprune.errors import PassNotApplicable
from graphprune.passes.mustdrop import merge_windows
from graphprune.tools import family_zoo

STEPS = 16
pytestmark = pytest.mark.filterwarnings("ignore::graphprune.errors.ShapeBucketWarning")


def _tau(model, ex, window):
    """A threshold between two tile scores near the middle: some tiles merge, some do not."""
    scores = RM.all_tile_scores(model, ex, window).sort().values
    mid = len(scores) // 2
    return round(float(scores[mid - 1] + scores[mid]) / 2, 6)


# family, image size (a second NeXT bucket: a tall image), window, order
CASES = [("llava_next", (50, 90), 2, "raster"), ("llava_next", (112, 56), 3, "authors"),
         ("llava_onevision", (50, 90), 2, "authors")]


@pytest.mark.slow                       # the fast set's case: test_mustdrop_pipeline_matches_reference
@pytest.mark.parametrize("family,size,window,order", CASES)
def test_merge_matches_reference(family, size, window, order):
    model, program = _built(family)
    ex = _example(model, size, seed=50)
    tau = _tau(model, ex, window)
    ref = RM.mustdrop_run(model, ex, window=window, tau=tau, order=order, steps=STEPS)
    ref["keep"] = ref["vision_keep"]
    spec = f"mustdrop_merge(layer=None, window={window}, tau={tau!r}, order={order!r})"
    out = assert_same_run(gp.prune(model, spec, program=program), ex, ref, STEPS, kept=ref["keep"])
    assert int((out.cache[-1].mask == 0).sum()) > int((ex.attention_mask == 0).sum())   # some tokens merged away


def test_mustdrop_pipeline_matches_reference():
    """mustdrop(merge_layer=None) on LLaVA-NeXT: key set off the unmerged tokens' CLS attention, the merge (a
    merged-away key hands its protection to its tile's token), static filters after LLM layers 1 and 2, the
    caches of layers 1..2 cut to the final set."""
    model, program = _built("llava_next")
    ex = _example(model, seed=51)
    tau = _tau(model, ex, 2)
    filters = {1: (0.01, 0.05, 20), 2: (0.01, 0.05, 20)}
    ref = RM.mustdrop_run(model, ex, window=2, tau=tau, order="authors", keys=0.08, filters=filters, steps=STEPS)
    ref["keep"] = ref["vision_keep"].gather(1, ref["keep"])          # the filters' last set, in prompt indices
    spec = f"mustdrop(keep=20, merge_layer=None, window=2, tau={tau!r}, layers=(1, 2), gamma=0.01, alpha=0.05)"
    pruned = gp.prune(model, spec, program=program)
    assert_same_run(pruned, ex, ref, STEPS, kept=ref["keep"])
    merged = next(r.info for r in pruned.program.results if r.info["pass"].startswith("mustdrop_merge"))
    assert merged["at"] == "features, per crop grid"           # where it ran, in the pass's record


@pytest.mark.parametrize("order", ["raster", "authors"])
def test_crop_tiles_merge_and_keys_on_sparse_crops(order):
    """The merge rule on two 4 x 4 crops of 2 x 2 windows, tokens in a shuffled order, some patches absent
    (unpadded away: a tile of fewer tokens, one of a single token that never merges), against
    reference_vision_llava_next_merge.merge_image: emitted order, merged values, validity, and the key set
    (a merged-away key hands its protection to its tile's merged token)."""
    side, gen = 4, torch.Generator().manual_seed(7)
    present = [p for p in range(32) if p not in (1, 4, 5, 17, 18, 21, 27, 30, 31)]     # patch 26: alone in its tile
    patches = torch.tensor(present)[torch.randperm(len(present), generator=gen)]
    v = len(present)
    hidden = torch.randn(1, 1, v, 6, generator=gen) + torch.randn(6, generator=gen)   # alike: scores spread
    protected = torch.rand(1, 1, v, generator=gen) < 0.4
    cells = torch.stack([patches // 16, patches % 16 // side, patches % side], -1)
    tiles = RM.crop_tiles(cells, 2)
    scores = M.tile_scores(hidden[0, 0], tiles)
    scores = scores[~scores.isnan()].sort().values
    tau = float(scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2     # between two tiles' scores
    want = RM.merge_image(hidden[0, 0], tiles, tau, order, "static", protected[0, 0])
    table = tokenops.crop_tiles(patches[:, None], torch.arange(v).expand(1, 1, v), 0, side, 2, 2)
    got = merge_windows(k=v, protected=protected, valid=None, vision_pos=torch.arange(v).expand(1, 1, v),
                        hidden=hidden, window=2, tau=tau, mode="static", order=order, tiles=table)
    assert torch.equal(got["picked"][0, 0], want["emitted"])
    assert torch.equal(got["valid"][0, 0], want["valid"]) and torch.equal(got["protected"][0, 0], want["protected"])
    torch.testing.assert_close(got["values"][0, 0], want["states"], atol=1e-6, rtol=1e-6)
    assert not torch.equal(want["protected"], protected[0, 0, want["emitted"]] & want["valid"])   # a key moved


@pytest.mark.slow
def test_batch_equals_alone():
    model, program = _built("llava_next")
    ex = family_zoo.example(model, batch=2, pad=(0, 3), seed=52)
    pruned = gp.prune(model, "mustdrop(keep=20, merge_layer=None, window=2, tau=0.05, layers=(1, 2), gamma=0.01, alpha=0.05)", program=program)
    assert_batch_equals_samples(pruned, ex, STEPS)


def test_inside_the_encoder_refused_naming_the_features():
    """layer=1 (the paper's place, the default) on anyres images with the authors' compact positions (or exact
    mode) is refused before any work, naming positions='keep' (in place, masked) and layer=None (the features)."""
    model, program = _built("llava_next")
    with pytest.raises(PassNotApplicable, match=r"layer=1 merges inside the vision encoder.*5 crops.*"
                                                r"positions='compact', mode='static'.*positions='keep', "
                                                r"order='raster'.*layer=None \(mustdrop\(merge_layer=None\)\).*"
                                                r"merge at the features"):
        gp.prune(model, "mustdrop(keep=20, layers=(1, 2), gamma=0.01, alpha=0.05)", program=program)
    with pytest.raises(PassNotApplicable, match=r"positions='keep', mode='exact'"):
        gp.prune(model, "mustdrop_merge(layer=1, window=2, positions='keep', order='raster', mode='exact')",
                 program=program)


# family, image size, encoder layer that first sees the merged tokens, window
ENCODER_CASES = [("llava_next", (50, 90), 1, 2), ("llava_next", (112, 56), 1, 3), ("llava_onevision", (50, 90), 2, 2)]


@pytest.mark.parametrize("family,size,layer,window", [
    pytest.param(*case, marks=() if i == 0 else pytest.mark.slow) for i, case in enumerate(ENCODER_CASES)])
def test_merge_inside_the_encoder_matches_reference(family, size, layer, window):
    """mustdrop_merge(layer=L, positions='keep', order='raster') on anyres images: each crop's tiles merge
    after encoder layer L - 1 (the paper's place for L = 1), merged tokens at their tile's first slot,
    merged-away patches masked as keys in layers L.. of their crop, their slots masked in the LLM; against
    reference_vision_llava_next_merge.encoder_merge_run (the model's own encoder layers crop by crop, the merge
    and mask applied by hand): slots, logits, 16 greedy tokens on a left-padded batch of 2."""
    model, program = _built(family)
    ex = _example(model, size, seed=53)
    scores = RM.encoder_tile_scores(model, ex, layer, window).sort().values
    tau = round(float(scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2, 6)
    ref = RM.encoder_merge_run(model, ex, layer=layer, window=window, tau=tau, steps=STEPS)
    spec = f"mustdrop_merge(layer={layer}, window={window}, tau={tau!r}, order='raster', positions='keep')"
    pruned = gp.prune(model, spec, program=program)
    out = assert_same_run(pruned, ex, ref, STEPS, kept=ref["keep"])
    assert int((out.cache[-1].mask == 0).sum()) > int((ex.attention_mask == 0).sum())   # some tokens merged away
    # recorded at prune time, on the probe bucket's crops
    assert pruned.program.results[0].info["at"]== f"encoder layer {layer}, per crop grid"


@pytest.mark.slow
@pytest.mark.parametrize("positions", ["compact", "keep"])
def test_mustdrop_pipeline_inside_the_encoder_matches_reference(positions):
    """mustdrop(merge_positions='keep') on LLaVA-NeXT, in the paper's order: the merge after encoder layer 0 in
    place, the key set off the merged tokens' CLS attention at the feature layer (merged-away tokens masked,
    never keys), static filters after LLM layers 1 and 2 numbering what they keep by `positions`, the caches
    of layers 1..2 cut to the final set."""
    model, program = _built("llava_next")
    ex = _example(model, seed=55)
    scores = RM.encoder_tile_scores(model, ex, 1, 2).sort().values
    tau = round(float(scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2, 6)
    filters = {1: (0.01, 0.05, 20), 2: (0.01, 0.05, 20)}
    ref = RM.mustdrop_run(model, ex, window=2, tau=tau, keys=0.08, filters=filters, steps=STEPS, encoder_layer=1,
                          positions=positions)
    ref["keep"] = ref["vision_keep"].gather(1, ref["keep"])
    spec = (f"mustdrop(keep=20, merge_positions='keep', positions={positions!r}, window=2, tau={tau!r}, "
            "layers=(1, 2), gamma=0.01, alpha=0.05)")
    assert_same_run(gp.prune(model, spec, program=program), ex, ref, STEPS, kept=ref["keep"])


@pytest.mark.slow
def test_merge_inside_the_encoder_batch_equals_alone():
    model, program = _built("llava_next")
    ex = family_zoo.example(model, batch=2, pad=(0, 3), seed=54)
    pruned = gp.prune(model, "mustdrop_merge(layer=1, window=2, tau=0.05, order='raster', positions='keep')",
                      program=program)
    assert_batch_equals_samples(pruned, ex, STEPS)


@pytest.mark.slow
def test_onevision_video_refused():
    """LLaVA-OneVision's pooled video tokens are no cells of a crop grid: refused before the prefill."""
    model, program = _built("llava_onevision")
    ex = family_zoo.example(model, batch=1, items=("video",), frames=2, seed=41)
    pruned = gp.prune(model, "mustdrop_merge(layer=None, window=2)", program=program)
    with pytest.raises(PassNotApplicable, match="tokens here are pooled from 4 encoder patches"):
        pruned(**ex.as_kwargs())
