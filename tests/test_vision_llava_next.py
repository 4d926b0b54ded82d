"""Vision-stage pruning on LLaVA-NeXT (CLIP, with CLS) and LLaVA-OneVision (SigLIP, no CLS) anyres images: the
tower captured per image size (its crops, unpadding and newline rows constant), vision_topk (attention
received), cls_topk, random at the vision stage, VisionZip and VisionTrim's vision stage (LTAM per crop grid),
`keep` counting per image.

Against tests/reference_vision_llava_next.py (independent: the feature layer's attention by hand per crop, laid
in prompt order by the model's own pack_image_features, the pruned prompt run by reference.lm_generate): kept
tokens, prefill logits (fp32, atol 1e-5) and 16 greedy tokens, two images per prompt and two image sizes (two
buckets); a left-padded batch of 2 equals each sample alone; what cannot apply is refused before any work."""
import pytest
import reference_vision_llava_next as RN
import reference_visiontrim as VT
import torch
from checks import assert_batch_equals_samples, assert_same_run

import graphprune as gp
from graphprune import tokenops
from graphprune.capture.export import capture_vision
from graphprune.errors import InputError, PassConfigError, PassNotApplicable, ShapeBucketWarning
from graphprune.families import family_of
from graphprune.families.anyres_vision import packed_index, pooled_index
from graphprune.rewrite.blocks import table_ltam_scores
from graphprune.rewrite.pipeline import Program
from graphprune.targets.onnx import export_onnx
from graphprune.tools import family_zoo
from graphprune.tools.zoo import Example, left_pad
from graphprune.verify.eager import check_against_eager

STEPS = 16
pytestmark = pytest.mark.filterwarnings("ignore::graphprune.errors.ShapeBucketWarning")


_BUILT = {}


def _built(family):
    """One tiny model and its captured program per family, for the module."""
    if family not in _BUILT:
        model = family_zoo.build(family)
        _BUILT[family] = model, Program.capture(model, stages=("vision", "prefill", "decode"))
    return _BUILT[family]


@pytest.fixture(scope="module", params=["llava_next", "llava_onevision"])
def anyres(request):
    return _built(request.param)


@pytest.fixture(scope="module")
def llava_next():
    return _built("llava_next")


def _example(model, size=(50, 90), seed=40, **kw):
    return family_zoo.example(model, batch=2, pad=(0, 2), items=("image", "image"), image_size=size, seed=seed, **kw)


def test_captured_stage_equals_get_image_features(anyres):
    """The captured graph of an image size gives the model's get_image_features rows, newline rows left out
    (those equal to image_newline), image by image; the capture checks itself against that."""
    model, _ = anyres
    cfg, size = model.config, (50, 90)
    stage = capture_vision(family_of(model), bucket=size)
    ex = _example(model, size)
    crops = RN.crops_of(model, torch.tensor(size))
    extra = {"vision_aspect_ratio": cfg.vision_aspect_ratio} if cfg.model_type == "llava_onevision" else {}
    with torch.no_grad():
        want = model.model.get_image_features(ex.pixel_values, ex.image_sizes, vision_feature_layer=cfg.vision_feature_layer,
                                              vision_feature_select_strategy=cfg.vision_feature_select_strategy, **extra)
        got = stage.gm(ex.pixel_values[:, :crops])[0]
    want = getattr(want, "pooler_output", want)            # transformers 4.x: the features themselves
    want = want.chunk(ex.pixel_values.shape[0]) if isinstance(want, torch.Tensor) else want     # concatenated
    for image, rows in enumerate(want):
        rows = rows[~(rows == model.model.image_newline).all(-1)]
        torch.testing.assert_close(got[image], rows, atol=1e-5, rtol=1e-5)
    assert check_against_eager(stage) < 1e-5


CASES = {"llava_next": [("vision_topk(keep=6)", "received", 6, "keep", (112, 56)),      # a second bucket, tall image
                        ("cls_topk(keep=5)", "cls", 5, "compact", (50, 90))],
         "llava_onevision": [("vision_topk(keep=6)", "received", 6, "keep", (50, 90)),
                             ("random(stage='vision', keep=7, seed=3)", "random", 7, "keep", (50, 90))]}


@pytest.mark.parametrize("case", [0, 1])
def test_matches_reference(anyres, case):
    model, program = anyres
    spec, how, keep, positions, size = CASES[model.config.model_type][case]
    ex = _example(model, size)
    chosen = RN.picks(model, ex, keep, how, seed=3)
    ref = RN.generate(model, ex, chosen, STEPS, positions)
    assert_same_run(gp.prune(model, spec, program=program), ex, ref, STEPS, kept=ref["keep"])


def test_visionzip_matches_reference(anyres):
    """VisionZip: contextual merging by key similarity, the authors' compact sequence; dominance by CLS
    attention (LLaVA-NeXT's CLIP) or, on SigLIP (no CLS), by the attention each token receives."""
    model, program = anyres
    ex = _example(model, seed=44)
    dominant = "cls" if model.config.model_type == "llava_next" else "received"
    chosen, values = RN.visionzip(model, ex, keep=8, contextual=3, dominant=dominant)
    ref = RN.generate(model, ex, chosen, STEPS, "compact", values)
    spec = f"visionzip(keep=8, contextual=3, dominant={'cls' if dominant == 'cls' else 'attention'!r})"
    assert_same_run(gp.prune(model, spec, program=program), ex, ref, STEPS, kept=ref["keep"])


def test_visiontrim_vision_matches_reference(llava_next):
    """VisionTrim's DVTS + TGVC on LLaVA-NeXT's anyres images: LTAM on each crop's own patch grid (patches unpadded
    away are no tokens: never neighbours, never kept), the K + R budget over the image's tokens as a whole."""
    model, program = llava_next
    ex = _example(model, seed=45)
    chosen, values = RN.visiontrim(model, ex, keep=8)
    ref = RN.generate(model, ex, chosen, STEPS, "keep", values)
    assert_same_run(gp.prune(model, "visiontrim_vision(keep=8)", program=program), ex, ref, STEPS, kept=ref["keep"])


def test_crop_ltam_matches_reference_on_sparse_crops():
    """LTAM per crop grid against reference_visiontrim's LTAM of present tokens: two 4 x 4 crops, tokens in a
    shuffled order, some patches absent (unpadded away) so that one token has no neighbour (it scores 0)."""
    side, gen = 4, torch.Generator().manual_seed(5)
    present = [p for p in range(32) if p not in (1, 4, 5, 17, 18, 20, 21, 22, 24, 25, 26)]   # patch 16: isolated
    patches = torch.tensor(present)[torch.randperm(len(present), generator=gen)]
    feats = torch.randn(2, 1, len(present), 6, generator=gen)
    table = tokenops.crop_neighbours(patches[:, None], torch.arange(len(present)).expand(2, 1, -1), 0, side, 2, 3)
    got = table_ltam_scores(feats, table, 3, 1.0, 0.7, 0.5)
    crop, cell = patches // 16, patches % 16              # crops one under the other, a row apart: no shared window
    slots = (crop * (side + 1) + cell // side) * side + cell % side
    want = VT.ltam_scores(feats[:, 0], side, 3, 1.0, 0.7, 0.5, patch_index=slots.expand(2, -1))
    torch.testing.assert_close(got[:, 0], want, atol=1e-6, rtol=1e-5)
    assert got[0, 0, (patches == 16).nonzero()[0, 0]] == 0


def test_batch_equals_alone(llava_next):
    model, program = llava_next
    ex = family_zoo.example(model, batch=2, pad=(0, 3), seed=47)
    assert_batch_equals_samples(gp.prune(model, "cls_topk(keep=6)", program=program), ex, STEPS)


def test_refused_before_work(llava_next, tmp_path):
    """Images of two packings in one call (two encoder graphs) are refused naming the sizes, while sizes packed
    alike run as one; an ONNX export, whose vision.onnx is the model's own unpruned encoding, refuses a
    vision-stage pass."""
    model, program = llava_next
    with pytest.warns(ShapeBucketWarning, match=r"image size \(112, 112\) \(shape bucket 1 of at most 8\)"):
        pruned = gp.prune(model, "vision_topk(keep=6)", program=program)   # the prune-time probe: the largest grid
    ex = _example(model)
    with pytest.raises(PassConfigError, match=r"vision_topk\(keep=6.*writes as the model's own encoding of one shape "
                                              r"bucket, unpruned"):
        export_onnx(pruned, tmp_path / "out", example=ex)
    assert not (tmp_path / "out").exists()
    want = pruned(**ex.as_kwargs()).logits
    ex.image_sizes = torch.tensor([[50, 90], [50, 90], [50, 90], [48, 90]])   # the same tokens, another size
    torch.testing.assert_close(pruned(**ex.as_kwargs()).logits, want, atol=0, rtol=0)     # packed alike: one graph
    wide, other = (family_zoo.example(model, image_size=size, seed=41) for size in ((50, 90), (56, 90)))
    ids, mask = left_pad([wide.input_ids[0].tolist() + other.input_ids[0, 1:].tolist()])    # two images, two packings
    ex = Example(ids, mask, pixel_values=torch.cat([wide.pixel_values, other.pixel_values]),
                 image_sizes=torch.cat([wide.image_sizes, other.image_sizes]))
    with pytest.raises(InputError, match=r"vision units of different token counts \[40, 48\].*must be of one size"):
        pruned(**ex.as_kwargs())


def test_encoder_merges_refused_on_anyres_images(llava_next):
    """A pass that merges inside the encoder out of place is refused at prune time, naming why: an anyres image is
    a base view and crops, several encoder sequences, its tokens gathered after the encoder (mustdrop_merge(
    layer=None) merges per crop grid at the features, mustdrop_merge(positions='keep', order='raster') in place
    inside the encoder: tests/test_vision_llava_next_merge.py); tome's default compact order is refused naming
    positions='keep' (in place, per crop: tests/test_vision_llava_next_tome.py)."""
    model, program = llava_next
    with pytest.raises(PassNotApplicable, match=r"layer=1 merges inside the vision encoder.* 5 crops, each run as "
                                                r"its own encoder sequence.*positions='keep', order='raster'"):
        gp.prune(model, "mustdrop_merge(layer=1, window=2)", program=program)
    with pytest.raises(PassNotApplicable, match=r"tome: merges between vision encoder layers.* 5 crops, each run as "
                                                r"its own encoder sequence.*compact order.*give positions='keep'.*"
                                                r"keep / r count per crop"):
        gp.prune(model, "tome(keep=6, layers=(0,))", program=program)
    with pytest.raises(PassConfigError, match=r"tome: keep=17 exceeds the 16 patches of a crop.*keep counts per crop"):
        gp.prune(model, "tome(keep=17, layers=(0,), positions='keep')", program=program)


def test_onevision_cls_and_interpolated_packing_refused(anyres):
    """SigLIP has no CLS: cls_topk and visiontrim_vision are refused naming vision_topk. A crop grid that vision_aspect_ratio packs by
    interpolation (anyres_max_N caps its tokens) has no encoder patch per token: refused, naming the size; so
    is a video frame grid of odd side, which apply_pooling interpolates."""
    model, program = anyres
    if model.config.model_type != "llava_onevision":
        pytest.skip("LLaVA-OneVision only")
    with pytest.raises(PassNotApplicable, match="cls_topk needs a \\[CLS\\] token.*vision_topk"):
        gp.prune(model, "cls_topk(keep=5)", program=program)
    with pytest.raises(PassNotApplicable, match="visiontrim_vision needs the CLS token.*anyres crops vision_topk"):
        gp.prune(model, "visiontrim_vision(keep=8)", program=program)
    fam = family_of(model)
    model.config.vision_aspect_ratio = "anyres_max_2"           # at most 2 x 8 x 8 tokens: a 2 x 2 crop grid's 256 are pooled
    try:
        assert packed_index(fam, (112, 224)).numel() == 64 + 128
        with pytest.raises(InputError, match=r"size \(224, 224\) is packed by interpolating"):
            packed_index(fam, (224, 224))
        model.config.vision_aspect_ratio = "anyres_max_1"
        with pytest.raises(PassNotApplicable, match="every crop grid of image_grid_pinpoints is packed by interpolation"):
            gp.prune(model, "vision_topk(keep=6)", program=program)
    finally:
        model.config.vision_aspect_ratio = "anyres_max_9"
    assert pooled_index(fam).tolist()[:2] == [[0, 1, 8, 9], [2, 3, 10, 11]]     # 2 x 2 blocks of the 8 x 8 grid
    model.config.vision_config.image_size = 98                  # a 7 x 7 frame grid: bilinear pooling interpolates
    try:
        with pytest.raises(InputError, match="7 x 7 patch grid is pooled by interpolation, not 2 x 2 averages"):
            pooled_index(fam)
    finally:
        model.config.vision_config.image_size = 112


@pytest.mark.parametrize("spec,how,keep,unit", [("vision_topk(keep=5)", "received", 5, "frame"),
                                                ("random(stage='vision', keep=9, seed=3)", "random", 9, "video")])
def test_onevision_video_matches_reference(spec, how, keep, unit):
    """LLaVA-OneVision videos: each frame through SigLIP, its tokens 2 x 2 pools of patches (a token's score the
    mean over its 4 patches); `keep` per frame (video_unit='frame') or per video ('video')."""
    model, program = _built("llava_onevision")
    ex = family_zoo.example(model, batch=2, pad=(0, 2), items=("video",), frames=3, seed=41)
    chosen = RN.picks(model, ex, keep, how, seed=3, video_unit=unit)
    ref = RN.generate(model, ex, chosen, STEPS, "keep", video_unit=unit)
    assert_same_run(gp.prune(model, spec, program=program, video_unit=unit), ex, ref, STEPS, kept=ref["keep"])


def test_onevision_video_refusals():
    """A pass that needs a pooled video token's hidden state (visionzip) is refused before the prefill, and so is
    a prompt of images and videos (two encoder graphs) by the vision stage's inputs, naming why."""
    model, program = _built("llava_onevision")
    ex = family_zoo.example(model, batch=1, items=("video",), frames=2, seed=41)
    zipped = gp.prune(model, "visionzip(keep=8, contextual=3, dominant='attention')", program=program)
    with pytest.raises(PassNotApplicable, match="pooled from 4 encoder patches.*no pooled token a hidden state"):
        zipped(**ex.as_kwargs())
    # 11 frames of 16 tokens: a video of the image's 176, so that the units' budgets line up
    both = family_zoo.example(model, batch=1, items=("image", "video"), frames=11, seed=41).as_kwargs()
    ids = both.pop("input_ids")
    layout = family_of(model).vision_layout(ids, video_unit="video",
                                            **{k: v for k, v in both.items() if k != "attention_mask"})
    with pytest.raises(InputError, match="holds images and videos"):
        family_of(model).vision_stage_inputs(layout, video_unit="video", **both)
