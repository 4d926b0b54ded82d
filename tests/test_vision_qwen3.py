"""Vision-stage pruning on Qwen3-VL: its encoder (learned position grid interpolated per grid, DeepStack
taps through their own mergers) captured per patch-grid bucket, then vision_topk (attention received),
random (vision), VisionZip (attention-received dominance) and DivPrune, on images and video frames.

Against tests/reference_vision_qwen.py (independent: scores by hand from the block's weights, the pruned
prompt and the kept tokens' DeepStack rows run through the model's own language model): kept tokens,
prefill logits (fp32, atol 1e-5) and 16 greedy tokens; a left-padded batch of 2 equals each sample alone.
The captured encoder returns get_image_features' features and DeepStack features, in fp32 and bf16."""
import copy

import pytest
import reference_families as RF
import reference_new_methods as N
import reference_vision_qwen as RQ
import reference_vision_qwen_methods as RM
import torch
from checks import assert_batch_equals_samples, assert_same_run

import graphprune as gp
from graphprune.capture.export import capture_vision
from graphprune.errors import InputError, PassNotApplicable
from graphprune.families import family_of
from graphprune.families.qwen_vision import probe_grid
from graphprune.rewrite.pipeline import Program
from graphprune.tools import family_zoo
from graphprune.verify.eager import check_against_eager

STEPS = 16
TOPK = "vision_topk(keep=6)"
RANDOM = "random(stage='vision', keep=7, seed=3)"
VISIONZIP = "visionzip(keep=8, contextual=3, dominant='attention', positions='keep')"
pytestmark = pytest.mark.filterwarnings("ignore::graphprune.errors.ShapeBucketWarning")


@pytest.fixture(scope="module")
def qwen3():
    import transformers
    if not hasattr(transformers, "Qwen3VLForConditionalGeneration"):
        pytest.skip(f"Qwen3-VL is newer than transformers {transformers.__version__}")
    model = family_zoo.build("qwen3_vl")
    return model, Program.capture(model, stages=("vision", "prefill", "decode"))


@pytest.fixture(scope="module")
def pruned(qwen3):
    model, program = qwen3
    return {spec: gp.prune(model, spec, program=program) for spec in (TOPK, RANDOM, VISIONZIP)}


def test_captured_encoder_equals_get_image_features(qwen3):
    """Per bucket (a non-square grid): the features and each DeepStack level's features, image by image, equal
    get_image_features'; the position grid the encoder adds is interpolated for each grid."""
    model, _ = qwen3
    fam, vc = family_of(model), model.config.vision_config
    dim = 3 * 2 * vc.patch_size ** 2
    h, w = 4, 12          # (8, 8): each pruned run below checks its bucket against the model too
    stage = capture_vision(fam, bucket=(h, w))
    assert stage.gm.meta["graphprune_outputs"] == ["features", "deepstack_features"]
    pixels = torch.randn(3 * h * w, dim, generator=torch.Generator().manual_seed(h * w))
    with torch.no_grad():
        want = model.model.get_image_features(pixels, torch.tensor([[1, h, w]] * 3))
        feats, deep = stage.gm(pixels.reshape(3, h * w, dim))
    assert feats.shape == (3, h * w // 4, model.config.text_config.hidden_size)
    assert deep.shape == (3, h * w // 4, len(vc.deepstack_visual_indexes), feats.shape[-1])
    assert check_against_eager(stage) < 1e-5
    torch.testing.assert_close(feats.reshape(-1, feats.shape[-1]), torch.cat(want.pooler_output), atol=1e-5, rtol=1e-5)
    for level, rows in enumerate(want.deepstack_features):
        torch.testing.assert_close(deep[:, :, level].reshape(-1, feats.shape[-1]), torch.cat(rows), atol=1e-5, rtol=1e-5)


def test_probe_exact_in_bf16(qwen3):
    """In bf16 the probe's index digits ride on the added position grid: decoded in fp32 they give the
    processor's order back (Qwen3-VL permutes nothing) and the grid as the bf16 encoder adds it."""
    model, _ = qwen3
    visual = copy.deepcopy(model.model.visual).to(torch.bfloat16)
    visual.pos_embed.weight.data.mul_(40)          # position rows far larger than the digits' spacing
    tables = probe_grid(visual, 8, 8)
    seen = {}
    hook = visual.blocks[0].register_forward_pre_hook(lambda m, a, kw: seen.update(h=a[0] if a else kw["hidden_states"]),
                                                      with_kwargs=True)
    zero = visual.patch_embed.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    with torch.no_grad():
        visual(torch.zeros(64, 3 * 2 * 16 * 16, dtype=torch.bfloat16), grid_thw=torch.tensor([[1, 8, 8]]))
    hook.remove()
    zero.remove()
    assert tables["added"].dtype == torch.bfloat16 and torch.equal(tables["added"], seen["h"])
    assert tables["added"].abs().max() > 1         # rounding hidden states alone would misread the digits


@pytest.mark.parametrize("spec,keep,how,pad,items", [
    (TOPK, 6, "attention", (0, 2), ("image", "video")),    # units: the image, each of the video's 2 frames
    (RANDOM, 7, "random", (0, 3), ("video", "image")),
    # VisionZip: kept and merged tokens; a contextual token carries its target's DeepStack rows
    (VISIONZIP, 8, "visionzip", (0, 2), ("image", "video")),
])
def test_matches_reference(qwen3, pruned, spec, keep, how, pad, items):
    model, _ = qwen3
    ex = family_zoo.example(model, batch=2, pad=pad, items=items, seed=50)
    if how == "visionzip":
        kept, embeds = RQ.visionzip(model, ex, keep=keep, contextual=3)
    else:
        kept, embeds = RQ.kept_positions(model, ex, keep, how, seed=3), None
    assert_same_run(pruned[spec], ex, RQ.hf_generate(model, ex, kept, STEPS, embeds), STEPS, kept=kept)


def test_deepstack_rows_follow_the_kept_tokens(qwen3, pruned):
    """The reference with every DeepStack row zeroed differs: the kept tokens' rows reach the LM."""
    model, _ = qwen3
    ex = family_zoo.example(model, items=("image",), seed=51)
    kept = RQ.kept_positions(model, ex, 6, "attention")
    ref = RQ.hf_generate(model, ex, kept, 1)
    out = pruned[TOPK](**ex.as_kwargs())
    torch.testing.assert_close(out.logits, ref["prefill_logits"], atol=1e-5, rtol=1e-5)
    level_0 = model.model.visual.deepstack_merger_list[0].linear_fc2
    saved = level_0.bias.data.clone(), level_0.weight.data.clone()
    level_0.bias.data.zero_(), level_0.weight.data.zero_()
    try:
        without = RQ.hf_generate(model, ex, kept, 1)["prefill_logits"]
    finally:
        level_0.bias.data.copy_(saved[0]), level_0.weight.data.copy_(saved[1])
    assert (without - out.logits).abs().max() > 1e-3


@pytest.mark.parametrize("unit,items,top,keep", [("frame", ("image", "video"), 10, 5),
                                                  pytest.param("video", ("video",), 20, 10, marks=pytest.mark.slow)])
def test_divprune_after_vision_topk_matches_reference(qwen3, unit, items, top, keep):
    """divprune on the projected tokens of the captured vision stage, after vision_topk: the greedy
    max-min cosine choice among each unit's `top` top tokens (images and video frames, or whole videos)."""
    model, program = qwen3
    ex = family_zoo.example(model, batch=2, pad=(0, 3), items=items, seed=55)
    first = RQ.kept_positions(model, ex, top, "attention", video_unit=unit)
    emb = RF.family_inputs(model, ex)[0]
    rows = []
    for i, blocks in enumerate(RQ.units(model, ex, unit)):
        drop = torch.zeros(ex.input_ids.shape[1], dtype=torch.bool)
        for blk in blocks:
            chosen = blk[torch.isin(blk, first[i])]
            drop[blk] = True
            drop[chosen[N.divprune_indices(emb[i, chosen], keep)]] = False
        rows.append((~drop).nonzero()[:, 0])
    kept = torch.stack(rows)
    ref = RQ.hf_generate(model, ex, kept, STEPS)
    pruned = gp.prune(model, f"vision_topk(keep={top}) | divprune(keep={keep}, positions='keep')", program=program,
                      video_unit=unit)
    assert_same_run(pruned, ex, ref, STEPS, kept=kept)


def test_batch_equals_alone(qwen3, pruned):
    model, _ = qwen3
    ex = family_zoo.example(model, batch=2, pad=(0, 3), items=("image", "video"), seed=57)
    assert_batch_equals_samples(pruned[TOPK], ex, STEPS)


def test_deepstack_rows_follow_merges_around_the_taps(qwen3):
    """ToMe merging after blocks 0 and 1 (taps at both): the rewritten graph returns the DeepStack rows at the
    features' count (the rows tapped at block 0 taken by both merges), and the first level's rows are the kept
    tokens' own, unmerged ones (the cheap check; the reference: VC::test_tome_after_block_0_on_qwen3_matches_reference)."""
    model, program = qwen3
    pruned = gp.prune(model, "tome(keep=7, layers=(0, 1), positions='keep')", program=program)
    (bucket, (stage, _)), = pruned.program.buckets.items()
    shape = family_of(model).vision_example(bucket, 2).shape
    pixels = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    outs = dict(zip(stage.gm.meta["graphprune_outputs"], stage.gm(pixels)))
    assert outs["deepstack_features"].shape[:2] == outs["features"].shape[:2] == (2, 18)     # 64 -> 35 -> 18 tokens
    full = capture_vision(family_of(model), bucket=bucket).gm(pixels)[1]
    kept = outs["patches_kept"]
    torch.testing.assert_close(outs["deepstack_features"][:, :, 0],
                               full[:, :, 0].gather(1, kept[..., None].expand(-1, -1, full.shape[-1])))


WHOLE_VIDEO = [pytest.param(TOPK.replace("6", "12"), "attention", marks=pytest.mark.slow),
               (RANDOM.replace("7", "12"), "random"),
               pytest.param(VISIONZIP.replace("8", "12"), "visionzip", marks=pytest.mark.slow),
               pytest.param("vispruner(keep=12, important='attention', important_ratio=0.25, positions='keep')",
                            "vispruner", marks=pytest.mark.slow)]


@pytest.mark.parametrize("spec,how", WHOLE_VIDEO)
def test_whole_videos_match_reference(qwen3, spec, how):
    """video_unit="video": one budget over every frame of a video (12 of its 2 x 16 tokens; each frame its own block
    behind a time stamp), each frame encoded on its own (the bucket checked against get_video_features), the kept
    tokens' DeepStack rows (a contextual token: its target's) reaching the LM; batch 2, left-padded."""
    model, program = qwen3
    ex = family_zoo.example(model, batch=2, pad=(0, 3), items=("video",), seed=73)
    if how == "visionzip":
        kept, embeds = RQ.visionzip(model, ex, keep=12, contextual=3, video_unit="video")
    elif how == "vispruner":
        kept, embeds = RM.vispruner(model, ex, 12, 0.25, video_unit="video"), None
    else:
        kept, embeds = RQ.kept_positions(model, ex, 12, how, seed=3, video_unit="video"), None
    assert not torch.equal(kept, RQ.kept_positions(model, ex, 6, "random" if how == "random" else "attention", seed=3))
    pruned = gp.prune(model, spec, program=program, video_unit="video")
    assert_same_run(pruned, ex, RQ.hf_generate(model, ex, kept, STEPS, embeds), STEPS, kept=kept)


@pytest.mark.slow
def test_whole_videos_batch_equals_alone(qwen3):
    model, program = qwen3
    ex = family_zoo.example(model, batch=2, pad=(0, 3), items=("video",), seed=74)
    assert_batch_equals_samples(gp.prune(model, TOPK.replace("6", "12"), program=program, video_unit="video"), ex, STEPS)


def test_whole_video_refusals_before_the_prefill(qwen3):
    """Over whole videos the encoder runs each frame as its own sequence and gathers the video's tokens after it:
    a selection inside the encoder (ToMe) is refused at the call naming video_unit='frame', and so is a prompt of
    images and whole videos (two encoder graphs)."""
    model, program = qwen3
    video = family_zoo.example(model, items=("video",), seed=5)
    tome = gp.prune(model, "tome(keep=7, layers=(1,), positions='keep')", program=program, video_unit="video")
    why = "tome: merges between vision encoder layers.* 2 crops.*whole video's frames: on video use video_unit='frame'"
    with pytest.raises(PassNotApplicable, match=why):
        tome(**video.as_kwargs())
    one_frame = family_zoo.example(model, items=("video",), frames=2, seed=5)          # one grid frame: 1 sequence
    with pytest.raises(PassNotApplicable, match=r"tome: .* 1 crop, .*on video use video_unit='frame'"):
        tome(**one_frame.as_kwargs())       # gathered merger groups, not pooled ones (Gemma 3's refusal)
    both = family_zoo.example(model, items=("image", "video"), frames=2, seed=5)     # a 1-frame video: 16 tokens
    with pytest.raises(InputError, match=r"whole videos \(video_unit='video'\).*also holds images"):
        gp.prune(model, TOPK, program=program, video_unit="video")(**both.as_kwargs())
