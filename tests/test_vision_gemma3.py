"""Vision-stage pruning of Gemma 3 images: the captured vision stage runs the SigLIP tower (no CLS), averages each
image token's k x k patch block (the projector's AvgPool2d) and applies the projector's norm and input projection;
a token's encoder signals are the means over its block's patches, its hidden state the pooled feature entering the
projector's norm. Checked: vision_topk (attention received; projected norm), random(stage='vision'),
visionzip(dominant='attention'), vispruner(important='attention'); a left-padded batch of 2 equals each sample
alone; the kept image tokens of each image still attend to one another (token_type_ids); what needs a CLS token or
merges inside the encoder is refused naming why.

Against tests/reference_vision_gemma3.py (independent: the tower's last layer's attention by hand, pooled by the
model's own avg_pool, the pruned prompt run by reference.lm_generate with the image groups at the kept tokens):
kept tokens, prefill logits (fp32, atol 1e-5) and 16 greedy tokens. The tiny model: 8 x 8 patches an image, pooled
to 4 x 4 tokens. The fast set keeps the capture check and vision_topk; the rest is slow."""
import pytest
import reference_vision_gemma3 as RG
import torch
from checks import assert_batch_equals_samples, assert_same_run

import graphprune as gp
from graphprune.capture.export import capture_vision
from graphprune.errors import PassNotApplicable, UnsupportedModelError
from graphprune.families import family_of
from graphprune.families.gemma3 import pooled_index
from graphprune.rewrite.pipeline import Program
from graphprune.tools import family_zoo
from graphprune.verify.eager import check_against_eager

STEPS = 16
_BUILT = {}


def _built():
    if not _BUILT:
        model = family_zoo.build("gemma3")
        _BUILT["m"] = model, Program.capture(model, stages=("vision", "prefill", "decode"))
    return _BUILT["m"]


def _images(model, seed=90, pad=(0, 2)):
    return family_zoo.example(model, batch=2, pad=pad, items=("image", "image"), seed=seed)


def test_captured_vision_stage_equals_the_model():
    """The captured stage gives the model's get_image_features and the hand-run tower and projector; each token's
    patches are its 2 x 2 block; a projector that does not average blocks (a max pool) is refused up front."""
    model, program = _built()
    fam = family_of(model)
    assert pooled_index(fam)[:5].tolist() == [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15],
                                              [16, 17, 24, 25]]
    stage = program.stages["vision"]
    ex = _images(model)
    with torch.no_grad():
        got = stage.gm(ex.pixel_values)[0]
        want = model.model.get_image_features(ex.pixel_values).pooler_output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, RG.features(model, ex.pixel_values), atol=1e-5, rtol=1e-5)
    assert want.abs().mean() > 0.1          # the images reach the LM (the tiny projector is not zero)
    assert check_against_eager(stage) < 1e-5
    assert program.anatomy["vision"].summary()["tokens"] == 16
    projector = model.model.multi_modal_projector
    pool = projector.avg_pool
    projector.avg_pool = torch.nn.MaxPool2d(pool.kernel_size, pool.stride)
    try:
        with pytest.raises(UnsupportedModelError, match="avg_pool does not average 2 x 2 blocks"):
            capture_vision(fam)
    finally:
        projector.avg_pool = pool


@pytest.mark.parametrize("positions", ["keep", pytest.param("compact", marks=pytest.mark.slow)])
def test_vision_topk_attention_matches_reference(positions):
    """Each image's 5 tokens whose 2 x 2 patches receive the most attention in the last encoder layer."""
    model, program = _built()
    ex = _images(model)
    chosen = RG.picks(model, ex, 5, "received")
    ref = RG.generate(model, ex, chosen, STEPS, positions)
    pruned = gp.prune(model, f"vision_topk(keep=5, positions={positions!r})", program=program)
    assert_same_run(pruned, ex, ref, STEPS, kept=ref["keep"])


@pytest.mark.slow
@pytest.mark.parametrize("spec,how,keep", [("vision_topk(keep=6, score='norm')", "norm", 6),
                                           ("random(stage='vision', keep=7, seed=3)", "random", 7)])
def test_other_selections_match_reference(spec, how, keep):
    model, program = _built()
    ex = _images(model, seed=91)
    chosen = RG.picks(model, ex, keep, how, seed=3)
    ref = RG.generate(model, ex, chosen, STEPS, "keep")
    assert_same_run(gp.prune(model, spec, program=program), ex, ref, STEPS, kept=ref["keep"])


@pytest.mark.slow
@pytest.mark.parametrize("positions", ["compact", "keep"])
def test_visionzip_matches_reference(positions):
    """VisionZip by attention received: 4 dominant tokens, 2 contextual ones merged by the pooled keys, their
    values the merged pooled features through the projector's norm and projection."""
    model, program = _built()
    ex = _images(model, seed=92)
    chosen, values = RG.visionzip(model, ex, 6, 2, authors_order=positions == "compact")
    ref = RG.generate(model, ex, chosen, STEPS, positions, values)
    spec = f"visionzip(keep=6, contextual=2, dominant='attention', positions={positions!r})"
    assert_same_run(gp.prune(model, spec, program=program), ex, ref, STEPS, kept=ref["keep"])


@pytest.mark.slow
def test_vispruner_matches_reference():
    """VisPruner: 2 tokens of highest attention received, 4 diverse ones by the pooled features."""
    model, program = _built()
    ex = _images(model, seed=93)
    chosen = RG.vispruner(model, ex, 6, 0.34)
    ref = RG.generate(model, ex, chosen, STEPS, "compact")
    assert not torch.equal(ref["keep"], RG.keep_index(model, ex, RG.picks(model, ex, 6, "received")))
    pruned = gp.prune(model, "vispruner(keep=6, important_ratio=0.34, important='attention')", program=program)
    assert_same_run(pruned, ex, ref, STEPS, kept=ref["keep"])


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["vision_topk(keep=5)", "visionzip(keep=6, contextual=2, dominant='attention')"])
def test_batch_equals_alone(spec):
    model, program = _built()
    ex = _images(model, seed=94, pad=(0, 3))
    assert_batch_equals_samples(gp.prune(model, spec, program=program), ex, STEPS)


@pytest.mark.slow
def test_refusals():
    """What needs a CLS token (cls_topk, visiontrim_vision, mustdrop_keys, VisionZip / VisPruner by CLS) or
    merges patches inside the encoder before the pooling (tome, mustdrop_merge) is refused naming why."""
    model, program = _built()
    for spec, why in [("cls_topk(keep=3)", "cls_topk needs a \\[CLS\\] token.*vision_topk"),
                      ("visiontrim_vision(keep=4)", "visiontrim_vision needs the CLS token"),
                      ("mustdrop_keys", "mustdrop_keys needs the CLS token"),
                      ("visionzip(keep=6)", "visionzip needs the CLS token.*dominant='attention'"),
                      ("vispruner(keep=6)", "vispruner needs the CLS token.*important='attention'"),
                      ("tome(keep=4, layers=(0,))", "tome: .*pooled from 4 encoder patches"),
                      ("mustdrop_merge(layer=None, window=2)", "mustdrop_merge: .*pooled from 4 encoder patches")]:
        with pytest.raises(PassNotApplicable, match=why):
            gp.prune(model, spec, program=program)


@pytest.mark.slow
def test_onnx_export_refused_before_work(tmp_path):
    """The captured vision stage gives Gemma 3 every graph, but its prefill's attention groups do not export: the
    export is refused naming them, before anything is written."""
    pytest.importorskip("onnx")
    from graphprune.targets.onnx import export_onnx
    model, program = _built()
    pruned = gp.prune(model, "vision_topk(keep=5)", program=program)
    with pytest.raises(UnsupportedModelError, match="bidirectional attention groups"):
        export_onnx(pruned, tmp_path / "out", example=_images(model).as_kwargs())
    assert not (tmp_path / "out").exists()
