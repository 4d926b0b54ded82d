"""Vision-stage pruning on LLaVA-NeXT anyres images (CLIP with CLS): the tower captured per image size (its
crops, unpadding and newline rows constant), vision_topk (attention received), cls_topk, random at the vision
stage and VisionZip, `keep` counting per image.

Against tests/reference_vision_llava_next.py (independent: the feature layer's attention by hand per crop, laid
in prompt order by the model's own pack_image_features, the pruned prompt run by reference.lm_generate): kept
tokens, prefill logits (fp32, atol 1e-5) and 16 greedy tokens, two images per prompt and two image sizes (two
buckets); a left-padded batch of 2 equals each sample alone; what cannot apply is refused before any work."""
import pytest
import reference_vision_llava_next as RN
import torch
from checks import assert_batch_equals_samples, assert_same_run

import graphprune as gp
from graphprune.capture.export import capture_vision
from graphprune.errors import InputError, PassNotApplicable
from graphprune.families import family_of
from graphprune.rewrite.pipeline import Program
from graphprune.tools import family_zoo
from graphprune.verify.eager import check_against_eager

STEPS = 16
pytestmark = pytest.mark.filterwarnings("ignore::graphprune.errors.ShapeBucketWarning")


@pytest.fixture(scope="module")
def llava_next():
    model = family_zoo.build("llava_next")
    return model, Program.capture(model, stages=("vision", "prefill", "decode"))


def _example(model, size=(50, 90), seed=40, **kw):
    return family_zoo.example(model, batch=2, pad=(0, 2), items=("image", "image"), image_size=size, seed=seed, **kw)


@pytest.mark.parametrize("size", [(50, 90), (112, 56)])
def test_captured_stage_equals_get_image_features(llava_next, size):
    """Per image size: the captured graph gives the model's get_image_features rows, newline rows left out
    (those equal to image_newline), image by image; the capture checks itself against that."""
    model, _ = llava_next
    stage = capture_vision(family_of(model), bucket=size)
    ex = _example(model, size)
    crops = RN.crops_of(model, torch.tensor(size))
    with torch.no_grad():
        want = model.model.get_image_features(ex.pixel_values, ex.image_sizes,
                                              vision_feature_layer=-2, vision_feature_select_strategy="default")
        got = stage.gm(ex.pixel_values[:, :crops])[0]
    for image, rows in enumerate(want.pooler_output):
        rows = rows[~(rows == model.model.image_newline).all(-1)]
        torch.testing.assert_close(got[image], rows, atol=1e-5, rtol=1e-5)
    assert check_against_eager(stage) < 1e-5


@pytest.mark.parametrize("spec,how,keep,positions,size", [
    ("vision_topk(keep=6)", "received", 6, "keep", (50, 90)),
    ("vision_topk(keep=6)", "received", 6, "keep", (112, 56)),          # a second bucket, tall image
    ("cls_topk(keep=5)", "cls", 5, "compact", (50, 90)),
    ("random(stage='vision', keep=7, seed=3)", "random", 7, "keep", (50, 90)),
])
def test_matches_reference(llava_next, spec, how, keep, positions, size):
    model, program = llava_next
    ex = _example(model, size)
    chosen = RN.picks(model, ex, keep, how, seed=3)
    ref = RN.generate(model, ex, chosen, STEPS, positions)
    assert_same_run(gp.prune(model, spec, program=program), ex, ref, STEPS, kept=ref["keep"])


def test_visionzip_matches_reference(llava_next):
    """VisionZip (CLS dominance, contextual merging by key similarity, the authors' compact sequence)."""
    model, program = llava_next
    ex = _example(model, seed=44)
    chosen, values = RN.visionzip(model, ex, keep=8, contextual=3)
    ref = RN.generate(model, ex, chosen, STEPS, "compact", values)
    assert_same_run(gp.prune(model, "visionzip(keep=8, contextual=3)", program=program), ex, ref, STEPS,
                    kept=ref["keep"])


def test_batch_equals_alone(llava_next):
    model, program = llava_next
    ex = family_zoo.example(model, batch=2, pad=(0, 3), seed=47)
    assert_batch_equals_samples(gp.prune(model, "cls_topk(keep=6)", program=program), ex, STEPS)


def test_refused_before_work(llava_next):
    model, program = llava_next
    pruned = gp.prune(model, "vision_topk(keep=6)", program=program)
    ex = _example(model)
    ex.image_sizes = torch.tensor([[50, 90], [50, 90], [50, 90], [48, 90]])   # the same tokens, another size
    with pytest.raises(InputError, match=r"images of sizes \[\(48, 90\), \(50, 90\)\].*must share one size"):
        pruned(**ex.as_kwargs())
