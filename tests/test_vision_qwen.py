"""Vision-stage pruning on Qwen2.5-VL (and Qwen2-VL's encoder): the encoder captured per patch-grid bucket,
vision_topk (attention received, no CLS), random at the vision stage and VisionZip with attention-received
dominance, on images and video frames.

Against tests/reference_vision_qwen.py (independent: scores recomputed by hand from the block's weights,
the pruned prompt run through the model's own forward with the original M-RoPE positions): kept tokens,
prefill logits (fp32, atol 1e-5) and 16 greedy tokens; a left-padded batch of 2 equals each sample alone;
bad options are refused before any work. One tiny model per family, shared by the module."""
import warnings

import pytest
import reference_vision_qwen as RQ
import torch
from checks import assert_batch_equals_samples, assert_same_run

import graphprune as gp
from graphprune.capture.export import capture_vision
from graphprune.errors import InputError, PassConfigError, PassNotApplicable, ShapeBucketWarning
from graphprune.families import family_of
from graphprune.rewrite.pipeline import Program
from graphprune.tools import family_zoo, zoo
from graphprune.verify.eager import check_against_eager

STEPS = 16
TOPK = "vision_topk(keep=6)"
RANDOM = "random(stage='vision', keep=7, seed=3)"
pytestmark = pytest.mark.filterwarnings("ignore::graphprune.errors.ShapeBucketWarning")


@pytest.fixture(scope="module")
def qwen25():
    model = family_zoo.build("qwen2_5_vl")
    return model, Program.capture(model, stages=("vision", "prefill", "decode"))


@pytest.fixture(scope="module")
def pruned(qwen25):
    """The pruned models the tests share (each captures its buckets once)."""
    model, program = qwen25
    return {spec: gp.prune(model, spec, program=program) for spec in (TOPK, RANDOM)}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_captured_encoder_equals_get_image_features(request, family):
    """Per bucket: the captured graph gives get_image_features' features, image by image, for two grids
    (Qwen2.5-VL's windowed blocks included); the capture checks itself against get_image_features."""
    model = request.getfixturevalue("qwen25" if family == "qwen2_5_vl" else "qwen")[0]
    fam = family_of(model)
    dim = 3 * 2 * 14 * 14
    for h, w in [(8, 8), (4, 12)]:
        stage = capture_vision(fam, bucket=(h, w))
        pixels = torch.randn(3 * h * w, dim, generator=torch.Generator().manual_seed(h * w))
        with torch.no_grad():
            want = model.model.get_image_features(pixels, torch.tensor([[1, h, w]] * 3))
            want = torch.cat(list(getattr(want, "pooler_output", want)))     # transformers 4.x: the split features
            got = stage.gm(pixels.reshape(3, h * w, dim))[0]
        assert got.shape == (3, h * w // 4, model.config.text_config.hidden_size)
        assert check_against_eager(stage) < 1e-5 and "get_image_features" in str(type(stage.module).forward.__code__.co_names)
        torch.testing.assert_close(got.reshape(want.shape), want, atol=1e-5, rtol=1e-5)


def test_buckets_captured_once_and_bounded(qwen25):
    model, program = qwen25
    with pytest.warns(ShapeBucketWarning, match=r"patch grid \(16, 16\) \(shape bucket 1 of at most 8\)"):
        pruned = gp.prune(model, "vision_topk(keep=3)", program=program)   # the prune-time check bucket
    rewritten = pruned.program
    for grid in [(8, 8), (4, 8)]:
        ex = family_zoo.example(model, grid=grid, seed=grid[1])
        with pytest.warns(ShapeBucketWarning, match=rf"patch grid \({grid[0]}, {grid[1]}\)"):
            pruned(**ex.as_kwargs())
        with warnings.catch_warnings():
            warnings.simplefilter("error", ShapeBucketWarning)         # a second call reuses the bucket
            pruned(**ex.as_kwargs())
    assert list(rewritten.buckets) == [(16, 16), (8, 8), (4, 8)]
    rewritten.family.vision_buckets = 3                             # this model's family object only
    try:
        with pytest.raises(InputError, match=r"patch grid \(8, 12\) would be shape bucket 4.*at most 3"):
            pruned(**family_zoo.example(model, grid=(8, 12)).as_kwargs())
    finally:
        rewritten.family.vision_buckets = type(rewritten.family).vision_buckets


@pytest.mark.parametrize("spec,keep,how,batch,pad,items", [
    (TOPK, 6, "attention", 2, (0, 2), ("image", "video")),    # units: the image, the video's 2 frames
    (RANDOM, 7, "random", 2, (0, 3), ("video", "image")),
])
def test_matches_reference(qwen25, pruned, spec, keep, how, batch, pad, items):
    model, _ = qwen25
    ex = family_zoo.example(model, batch=batch, pad=pad, items=items, seed=batch + 40)
    kept = RQ.kept_positions(model, ex, keep, how, seed=3)
    ref = RQ.hf_generate(model, ex, kept, STEPS)
    assert_same_run(pruned[spec], ex, ref, STEPS, kept=kept)


def test_visionzip_attention_matches_reference(qwen25):
    """VisionZip with attention-received dominance (the CLS-free variant): kept tokens, merged contextual
    tokens through the merger's MLP, logits and 16 greedy tokens; batch of 2 with left padding."""
    model, program = qwen25
    ex = family_zoo.example(model, batch=2, pad=(0, 2), items=("image", "video"), seed=44)
    kept, embeds = RQ.visionzip(model, ex, keep=8, contextual=3)
    ref = RQ.hf_generate(model, ex, kept, STEPS, embeds)
    pruned = gp.prune(model, "visionzip(keep=8, contextual=3, dominant='attention', positions='keep')",
                      program=program)
    assert_same_run(pruned, ex, ref, STEPS, kept=kept)


def test_vision_topk_on_llava_clip(llava):
    """The same score on a tower with CLS (LLaVA-1.5's CLIP, CLS among the queries, not the keys):
    reference.llava_vision's feature-layer attention, positions kept."""
    import reference as R
    model, program = llava
    ex = zoo.llava_example(model, batch=2, pad=(0, 3), seed=2)
    vis = R.llava_vision(model, ex.pixel_values)
    patches = vis["received"].topk(9, dim=-1).indices.sort(-1).values
    feats = vis["features"].gather(1, patches[..., None].expand(-1, -1, vis["features"].shape[-1]))
    emb, am, pos, vm, _ = R.llava_inputs_from_vision(model, ex, {"features": feats, "patch_index": patches},
                                                     positions="keep")
    ref = R.lm_generate(model, emb, am, pos, max_new_tokens=STEPS, vision_mask=vm)
    pruned = gp.prune(model, "vision_topk(keep=9)", program=program)
    out = pruned(**ex.as_kwargs())
    assert pruned.report.patches_kept == patches.tolist()
    torch.testing.assert_close(out.logits[out.cache[-1].mask.bool()], ref["prefill_logits"][am.bool()],
                               atol=1e-5, rtol=1e-5)
    ids = pruned.generate(**ex.as_kwargs(), max_new_tokens=STEPS, eos_token_id=[])
    assert torch.equal(ids[:, -STEPS:], ref["tokens"])


def test_batch_equals_alone(qwen25, pruned):
    model, _ = qwen25
    ex = family_zoo.example(model, batch=2, pad=(0, 3), items=("image", "video"), seed=47)
    assert_batch_equals_samples(pruned[TOPK], ex, STEPS)


def test_bad_options_refused_before_work(qwen25, pruned):
    model, program = qwen25
    with pytest.raises(PassConfigError, match="score must be one of"):
        gp.prune(model, "vision_topk(score='cls')", program=program)
    with pytest.raises(PassConfigError, match="layer=0 applies to score='attention' only"):
        gp.prune(model, "vision_topk(score='norm', layer=0)", program=program)
    with pytest.raises(PassNotApplicable, match="vision_topk"):        # cls_topk names what scores a CLS-free tower
        gp.prune(model, "cls_topk(keep=4)", program=program)
    with pytest.raises(PassNotApplicable, match="dominant='attention'"):
        gp.prune(model, "visionzip(keep=8, positions='keep')", program=program)
    with pytest.raises(PassConfigError, match="dominant must be"):
        gp.prune(model, "visionzip(keep=8, dominant='cls_free')", program=program)
    with pytest.raises(PassNotApplicable, match="positions='compact'.*M-RoPE"):
        gp.prune(model, "vision_topk(keep=4, positions='compact')", program=program)
    image = family_zoo.example(model, grid=(4, 16), seed=5)               # 16 tokens, as an 8 x 8 video frame has
    ex = family_zoo.example(model, items=("image", "video"), seed=5)
    ex.pixel_values, ex.image_grid_thw = image.pixel_values, image.image_grid_thw
    with pytest.raises(InputError, match=r"patch grids \[\(4, 16\), \(8, 8\)\]"):
        pruned[TOPK](**ex.as_kwargs())
    # whole videos (video_unit="video") run one graph of the videos' frames: a prompt with images too is refused
    ex = family_zoo.example(model, items=("image", "video"), frames=2, seed=5)     # a 1-frame video: 16 tokens
    with pytest.raises(InputError, match=r"whole videos \(video_unit='video'\).*also holds images"):
        gp.prune(model, TOPK, program=program, video_unit="video")(**ex.as_kwargs())


WHOLE_VIDEO = [("vision_topk(keep=12)", "attention"),
               pytest.param("random(stage='vision', keep=12, seed=3)", "random", marks=pytest.mark.slow)]


@pytest.mark.parametrize("spec,how", WHOLE_VIDEO)
def test_whole_videos_match_reference(qwen25, spec, how):
    """video_unit="video": one budget over every frame of a video (12 of its 2 x 16 tokens), each frame encoded
    on its own (the captured bucket checked against get_video_features), positions kept; batch 2, left-padded."""
    model, program = qwen25
    ex = family_zoo.example(model, batch=2, pad=(0, 3), items=("video",), seed=71)
    kept = RQ.kept_positions(model, ex, 12, how, seed=3, video_unit="video")
    assert not torch.equal(kept, RQ.kept_positions(model, ex, 6, how, seed=3))      # the unit matters here
    pruned = gp.prune(model, spec, program=program, video_unit="video")
    assert_same_run(pruned, ex, RQ.hf_generate(model, ex, kept, STEPS), STEPS, kept=kept)
    assert ("video", 2, 8, 8) in pruned.program.buckets


@pytest.mark.slow
def test_whole_videos_batch_equals_alone(qwen25):
    model, program = qwen25
    ex = family_zoo.example(model, batch=2, pad=(0, 3), items=("video",), seed=48)
    assert_batch_equals_samples(gp.prune(model, "vision_topk(keep=12)", program=program, video_unit="video"), ex, STEPS)


@pytest.mark.slow
def test_visionzip_and_vispruner_over_whole_videos_match_reference(qwen25):
    """The passes reading hidden states (what enters the merger's MLP) and keys over a whole video: VisionZip's
    contextual tokens merge across frames, VisPruner's diverse tokens are chosen among every frame's."""
    import reference_vision_qwen_methods as RM
    model, program = qwen25
    ex = family_zoo.example(model, batch=2, pad=(0, 3), items=("video",), seed=72)
    kept, embeds = RQ.visionzip(model, ex, keep=12, contextual=3, video_unit="video")
    pruned = gp.prune(model, "visionzip(keep=12, contextual=3, dominant='attention', positions='keep')",
                      program=program, video_unit="video")
    assert_same_run(pruned, ex, RQ.hf_generate(model, ex, kept, STEPS, embeds), STEPS, kept=kept)
    kept = RM.vispruner(model, ex, 12, 0.25, video_unit="video")
    pruned = gp.prune(model, "vispruner(keep=12, important='attention', important_ratio=0.25, positions='keep')",
                      program=program, video_unit="video")
    assert_same_run(pruned, ex, RQ.hf_generate(model, ex, kept, STEPS), STEPS, kept=kept)
