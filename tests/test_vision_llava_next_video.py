"""Vision-stage pruning of LLaVA-NeXT-Video videos: the captured vision stage runs its CLIP tower per frame, the
vision_resampler's average pooling (each token the mean of a spatial_pool_stride x spatial_pool_stride patch
block, *before* the projector, unlike LLaVA-OneVision's pooling after it), then the projector; a token's encoder
signals are the means over its patches. `keep` counts per frame (video_unit='frame') or per whole video
('video'). Checked: vision_topk (attention received, projected norm: alone at LLM layer 0 and after cls_topk in
the captured stage), cls_topk (a pooled token's CLS attention: the mean of its frame's CLS attention to its
patches), random(stage='vision'), divprune (alone, image + video, and after vision_topk in the captured stage),
cdpruner, evs, dycoke, mustdrop_keys (in mustdrop(merge=False): a pooled token's key score the same mean, then the
filters); images (LLaVA-NeXT's anyres stage) in the same model; a left-padded batch of 2 equals
each sample alone; what has no signal is refused naming it.

Against tests/reference_vision_llava_next_video.py (independent: the tower's feature layer by hand per frame,
pooled by the model's own vision_resampler, the pruned prompt run by reference.lm_generate): kept tokens, prefill
logits (fp32, atol 1e-5) and 16 greedy tokens. The tiny model: 4 x 4 patches a frame, pooled to 2 x 2 tokens. The
fast set keeps the capture check; the rest is slow."""
import pytest
import reference as R
import reference_evs as E
import reference_new_methods as N
import reference_vision_coverage as RC
import reference_vision_llava_next as RN
import reference_vision_llava_next_video as RV
import torch
from checks import assert_batch_equals_samples, assert_same_run
from reference_families import family_inputs

import graphprune as gp
from graphprune.capture.export import capture_vision
from graphprune.errors import InputError, PassNotApplicable
from graphprune.families import family_of
from graphprune.families.anyres_vision import resampled_index
from graphprune.rewrite.pipeline import Program
from graphprune.tools import family_zoo
from graphprune.verify.eager import check_against_eager

STEPS = 16
pytestmark = pytest.mark.filterwarnings("ignore::graphprune.errors.ShapeBucketWarning")
_BUILT = {}


def _built():
    if not _BUILT:
        model = family_zoo.build("llava_next_video")
        _BUILT["m"] = model, Program.capture(model, stages=("vision", "prefill", "decode"))
    return _BUILT["m"]


def _video(model, frames=3, seed=70, items=("video",), **kw):
    return family_zoo.example(model, batch=2, pad=(0, 2), items=items, frames=frames, seed=seed, **kw)


def test_captured_video_stage_equals_the_model():
    """The captured stage of a 3-frame video unit gives the model's get_video_features and the hand-run tower,
    resampler and projector; each token's patches are its 2 x 2 block (a stride of 3: the one 3 x 3 block the
    pooling reads); a max-pooling resampler (no token a mean of patches) is refused naming spatial_pool_mode."""
    model = family_zoo.build("llava_next_video")
    fam = family_of(model)
    assert resampled_index(fam).tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    stage = capture_vision(fam, bucket=("video", 3))
    ex = _video(model, frames=3)
    with torch.no_grad():
        got = stage.gm(ex.pixel_values_videos)[0]
        want = model.model.get_video_features(ex.pixel_values_videos, vision_feature_layer=-2,
                                              vision_feature_select_strategy="default")
    want = getattr(want, "pooler_output", want)
    for video in range(ex.pixel_values_videos.shape[0]):
        torch.testing.assert_close(got[video], want[video], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[video], RV.features(model, ex.pixel_values_videos[video]), atol=1e-5, rtol=1e-5)
    assert check_against_eager(stage) < 1e-5
    model.config.spatial_pool_mode = "max"
    try:
        with pytest.raises(PassNotApplicable, match="spatial_pool_mode='max'.*no mean of encoder patches"):
            resampled_index(fam)
    finally:
        model.config.spatial_pool_mode = "average"
    # a stride that does not divide the 4 x 4 grid: one 3 x 3 block, the last patch row and column left out
    resampler = model.model.vision_resampler
    model.config.spatial_pool_stride = 3
    model.model.vision_resampler = type(resampler)(model.config)
    try:
        assert resampled_index(fam).tolist() == [[0, 1, 2, 4, 5, 6, 8, 9, 10]]
        stage = capture_vision(fam, bucket=("video", 2))
        with torch.no_grad():
            got = stage.gm(ex.pixel_values_videos[:, :2])[0]
        for video in range(ex.pixel_values_videos.shape[0]):
            torch.testing.assert_close(got[video], RV.features(model, ex.pixel_values_videos[video, :2]),
                                       atol=1e-5, rtol=1e-5)
    finally:
        model.config.spatial_pool_stride, model.model.vision_resampler = 2, resampler


# (spec, how the reference picks, keep, video_unit, positions)
ENCODER_CASES = [
    ("vision_topk(keep=2)", "received", 2, "frame", "keep"),
    ("vision_topk(keep=5)", "received", 5, "video", "keep"),
    ("cls_topk(keep=3)", "cls", 3, "frame", "compact"),
    ("cls_topk(keep=6, positions='keep')", "cls", 6, "video", "keep"),
    ("random(stage='vision', keep=2, seed=3)", "random", 2, "frame", "keep"),
    ("random(stage='vision', keep=7, seed=3)", "random", 7, "video", "keep"),
]


@pytest.mark.slow
@pytest.mark.parametrize("spec,how,keep,unit,positions", ENCODER_CASES, ids=[f"{c[0].split('(')[0]}-{c[3]}"
                                                                             for c in ENCODER_CASES])
def test_encoder_rules_match_reference(spec, how, keep, unit, positions):
    model, program = _built()
    ex = _video(model)
    chosen = RV.picks(model, ex, keep, how, seed=3, video_unit=unit)
    ref = RN.generate(model, ex, chosen, STEPS, positions, video_unit=unit)
    assert_same_run(gp.prune(model, spec, program=program, video_unit=unit), ex, ref, STEPS, kept=ref["keep"])


@pytest.mark.slow
@pytest.mark.parametrize("unit,keep", [("frame", 2), ("video", 5)])
def test_norm_topk_matches_reference(unit, keep):
    """vision_topk(score='norm') alone reads only the projected tokens: it runs at LLM layer 0."""
    model, program = _built()
    ex = _video(model, seed=71)
    chosen = RC.norm_picks_anyres(model, ex, keep, video_unit=unit)
    ref = RN.generate(model, ex, chosen, STEPS, "keep", video_unit=unit)
    pruned = gp.prune(model, f"vision_topk(keep={keep}, score='norm')", program=program, video_unit=unit)
    assert_same_run(pruned, ex, ref, STEPS, kept=ref["keep"])


@pytest.mark.slow
@pytest.mark.parametrize("spec,keep,contextual,dominant,unit", [
    ("visionzip(keep=3, contextual=1)", 3, 1, "cls", "frame"),
    ("visionzip(keep=6, contextual=2, dominant='attention')", 6, 2, "received", "video"),
])
def test_visionzip_matches_reference(spec, keep, contextual, dominant, unit):
    """VisionZip on pooled tokens: their hidden states, the patches' means the resampler gives the projector, merge
    around contextual targets by the pooled keys; the authors' compact sequence."""
    model, program = _built()
    ex = _video(model, seed=79)
    chosen, values = RV.visionzip(model, ex, keep, contextual, dominant, unit)
    ref = RN.generate(model, ex, chosen, STEPS, "compact", values, video_unit=unit)
    assert_same_run(gp.prune(model, spec, program=program, video_unit=unit), ex, ref, STEPS, kept=ref["keep"])


@pytest.mark.slow
def test_vispruner_matches_reference():
    """VisPruner per whole video: 2 tokens of highest CLS attention, 6 diverse ones by the pooled hidden states."""
    model, program = _built()
    ex = _video(model, seed=80)
    chosen = RV.vispruner(model, ex, 8, 0.25, "cls", "video")
    ref = RN.generate(model, ex, chosen, STEPS, "compact", video_unit="video")
    assert not torch.equal(ref["keep"], RN.keep_index(model, ex, RV.picks(model, ex, 8, "cls", video_unit="video"),
                                                      "video"))      # diversity matters
    pruned = gp.prune(model, "vispruner(keep=8, important_ratio=0.25)", program=program, video_unit="video")
    assert_same_run(pruned, ex, ref, STEPS, kept=ref["keep"])


def _then(model, ex, first, rule, unit="video"):
    """Per sample, per unit: of the tokens `first` kept, those `rule(features (k, D))` picks (ascending)."""
    emb = family_inputs(model, ex)[0]
    return [[top[torch.as_tensor(rule(emb[i, blk[top]]))].sort().values for blk, top in zip(row, first[i])]
            for i, row in enumerate(RN.units(model, ex, unit))]


@pytest.mark.slow
def test_norm_after_cls_topk_in_the_captured_stage():
    """After an encoder pass the norm runs inside the captured vision stage: of each video's 8 tokens of highest
    CLS attention, the 5 of largest projected norm, compactly numbered."""
    model, program = _built()
    ex = _video(model, seed=72)
    first = RV.picks(model, ex, 8, "cls", video_unit="video")
    chosen = _then(model, ex, first, lambda f: f.norm(dim=-1).topk(5).indices)
    ref = RN.generate(model, ex, chosen, STEPS, "compact", video_unit="video")
    pruned = gp.prune(model, "cls_topk(keep=8) | vision_topk(keep=5, score='norm', positions='compact')",
                      program=program, video_unit="video")
    assert_same_run(pruned, ex, ref, STEPS, kept=ref["keep"])


@pytest.mark.slow
def test_divprune_after_vision_topk_in_the_captured_stage():
    """divprune on the captured stage's projected tokens, after vision_topk: the greedy max-min cosine choice
    among each video's 8 tokens that receive the most attention."""
    model, program = _built()
    ex = _video(model, seed=73)
    first = RV.picks(model, ex, 8, "received", video_unit="video")
    chosen = _then(model, ex, first, lambda f: N.divprune_indices(f, 5))
    ref = RN.generate(model, ex, chosen, STEPS, "keep", video_unit="video")
    pruned = gp.prune(model, "vision_topk(keep=8) | divprune(keep=5, positions='keep')", program=program,
                      video_unit="video")
    assert_same_run(pruned, ex, ref, STEPS, kept=ref["keep"])


PICKS = {"divprune": lambda count: lambda feats, text: N.divprune_indices(feats, count),
         "cdpruner": lambda count: lambda feats, text: N.cdpruner_indices(feats, text, count)}


@pytest.mark.slow
@pytest.mark.parametrize("method,items,unit,units,positions", [
    ("divprune", ("video",), "frame", 3, "compact"),               # units: the video's 3 frames
    ("cdpruner", ("video",), "video", 1, "keep"),
    ("divprune", ("image", "video"), "video", 2, "keep"),          # the image's 48 tokens, the video's 12 x 4
])
def test_projected_token_methods_match_reference(method, items, unit, units, positions):
    """The projected-token methods alone run at LLM layer 0 on the model's own features (reference_new_methods'
    choices per unit); with an image beside the video, the image is one unit and the whole video another."""
    model, program = _built()
    keep = 2 if unit == "frame" else 5
    ex = _video(model, frames=12 if "image" in items else 3, seed=74, items=items, image_size=(50, 90))
    kept, emb, am, pos = N.choose_on_input_embeds(model, ex, units, PICKS[method](keep))
    if positions == "compact":
        pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
    ref = R.lm_generate(model, emb, am, pos, max_new_tokens=STEPS)
    pruned = gp.prune(model, f"{method}(keep={keep}, positions={positions!r})", program=program, video_unit=unit)
    assert_same_run(pruned, ex, ref, STEPS, kept=kept)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["evs", "dycoke"])
def test_video_methods_match_reference(method):
    """EVS and DyCoke's TTM at LLM layer 0 on whole videos (reference_evs: their rules on the model's own video
    features): 6 frames of 4 tokens, rate 0.5."""
    model, program = _built()
    ex = _video(model, frames=6, seed=75)
    ref = E.evs_generate(model, ex, 0.5, STEPS, **({"rule": E.ttm_mask} if method == "dycoke" else {}))
    out = assert_same_run(gp.prune(model, method, rate=0.5, program=program), ex, ref, STEPS, kept=ref["keep"])
    assert out.kept.shape[1] < ex.input_ids.shape[1]


@pytest.mark.slow
def test_image_prompt_matches_reference():
    """The same model's anyres images through LLaVA-NeXT's vision stage (reference_vision_llava_next)."""
    model, program = _built()
    ex = family_zoo.example(model, batch=2, pad=(0, 2), items=("image", "image"), image_size=(50, 90), seed=76)
    chosen = RN.picks(model, ex, 6, "received")
    ref = RN.generate(model, ex, chosen, STEPS, "keep")
    assert_same_run(gp.prune(model, "vision_topk(keep=6)", program=program), ex, ref, STEPS, kept=ref["keep"])


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["vision_topk(keep=5)", "cls_topk(keep=5)"])
def test_batch_equals_alone(spec):
    model, program = _built()
    ex = family_zoo.example(model, batch=2, pad=(0, 3), items=("video",), frames=3, seed=77)
    assert_batch_equals_samples(gp.prune(model, spec, program=program, video_unit="video"), ex, STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("unit,capacity", [("frame", 2), ("video", 6)])
def test_mustdrop_keys_protect_pooled_tokens(unit, capacity):
    """mustdrop(merge=False): the key set, a pooled token's key score the mean of its frame's CLS attention to its
    patches (the top ceil(0.25 x tokens) per unit), then static filters after LLM layers 1 and 2 (capacity per
    unit; protected tokens first) and the caches of layers 1..2 cut to the final set. The keys change what the
    filters keep (the reference without a key set keeps other tokens)."""
    model, program = _built()
    ex = _video(model, seed=83)
    filters = {1: (0.01, 0.05, capacity), 2: (0.01, 0.05, capacity)}
    ref = RV.mustdrop_filters(model, ex, ratio=0.25, filters=filters, video_unit=unit, steps=STEPS)
    unprotected = RV.mustdrop_filters(model, ex, ratio=None, filters=filters, video_unit=unit, steps=1)
    assert not torch.equal(ref["keep"], unprotected["keep"])               # the key set is observable
    spec = f"mustdrop(keep={capacity}, merge=False, ratio=0.25, layers=(1, 2), gamma=0.01, alpha=0.05)"
    out = assert_same_run(gp.prune(model, spec, program=program, video_unit=unit), ex, ref, STEPS, kept=ref["keep"])
    for i, c in enumerate(out.cache):
        assert torch.equal(c.mask.bool(), ref["kv_valid"][i]), f"layer {i} cache validity"


@pytest.mark.slow
def test_refusals():
    """A pass that reads a pooled token's crop-grid cells (visiontrim_vision, mustdrop_merge) or merges inside the
    encoder (tome in place: a patch merged away would have no value for the pool after the encoder) is refused
    naming why; so is a prompt of images and videos in the vision stage (one encoder graph a call)."""
    model, program = _built()
    ex = _video(model, seed=78)
    for spec, why in [("visiontrim_vision(keep=3)", "pooled from 4 encoder patches, no cells of one crop grid"),
                      ("mustdrop_merge(layer=None, window=2)", "pooled from 4 encoder patches each.*no cells of a crop"),
                      ("tome(keep=2, layers=(0,), positions='keep')",
                       "tome: merges between vision encoder layers.*pooled from 4 encoder patches after the encoder.*"
                       "no value of its own for the pool")]:
        with pytest.raises(PassNotApplicable, match=why):
            gp.prune(model, spec, program=program, video_unit="video")(**ex.as_kwargs())
    both = family_zoo.example(model, batch=1, items=("image", "video"), frames=12, image_size=(50, 90), seed=78)
    with pytest.raises(InputError, match="holds images and videos"):
        gp.prune(model, "vision_topk(keep=5)", program=program, video_unit="video")(**both.as_kwargs())
