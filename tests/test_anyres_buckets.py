"""LLaVA-NeXT's anyres vision stage is captured per packing, not per image size: images of different sizes with
the same crop grid and the same unpadded patch grid (hence the same crop count, gather and newline rows) share
one captured stage; a different packing (another unpadding of the same crop grid, or another grid) is another
bucket, announced once, and the bounded count refuses one too many naming the packings captured.

Against the model itself: its get_image_features on the size that reuses another's bucket, and its forward's
logits (fp32, atol 1e-5) on every size when the vision-stage pass keeps every token."""
import warnings

import pytest
import reference as R
import reference_dart as D
import reference_families as RF
import reference_vision_llava_next as RN
import torch
from checks import assert_same_run

import graphprune as gp
from graphprune.errors import InputError, ShapeBucketWarning
from graphprune.rewrite.pipeline import Program
from graphprune.tools import family_zoo

STEPS = 16
pytestmark = pytest.mark.filterwarnings("ignore::graphprune.errors.NothingPrunedWarning")
# the tiny LLaVA-NeXT's crops are 56 px (4 x 4 patches); these sizes all take the 56 x 112 crop grid (1 x 2)
SHARED = [(50, 90), (48, 90)]        # 90 / h * 4 rounds to 7 or 8: no column unpadded away, 4 x 8 patches each
OTHER_UNPADDING = (56, 90)           # 90 / 56 * 4 = 6.4: a column unpadded off each side, 4 x 6 patches
OTHER_GRID = (112, 56)               # the 112 x 56 crop grid (2 x 1)


@pytest.fixture(scope="module")
def llava_next():
    model = family_zoo.build("llava_next")
    return model, Program.capture(model, stages=("vision", "prefill", "decode"))


@pytest.fixture(scope="module")
def every(llava_next):
    """The tiny LLaVA-NeXT pruned by a vision-stage pass that keeps every token (its buckets shared by the tests)."""
    model, program = llava_next
    with pytest.warns(ShapeBucketWarning):                     # the prune-time probe bucket
        return model, gp.prune(model, "random(stage='vision', keep=1.0, seed=1)", program=program)


def _example(model, size, seed=40):
    return family_zoo.example(model, batch=2, pad=(0, 2), items=("image", "image"), image_size=size, seed=seed)


def _features(model, ex):
    """The model's own get_image_features per image, its image_newline rows left out."""
    cfg = model.config
    with torch.no_grad():
        feats = model.model.get_image_features(ex.pixel_values, ex.image_sizes, vision_feature_layer=cfg.vision_feature_layer,
                                               vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    feats = getattr(feats, "pooler_output", feats)            # transformers 4.x: the features themselves
    feats = feats.chunk(ex.pixel_values.shape[0]) if isinstance(feats, torch.Tensor) else feats
    return torch.stack([rows[~(rows == model.model.image_newline).all(-1)] for rows in feats])


def _hf_logits(model, ex):
    kw = ex.as_kwargs()
    with torch.no_grad():
        return model(**kw, position_ids=(ex.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits


def _new_buckets(pruned, ex) -> int:
    """Run the pruned model on ex; how many vision buckets that captured (ShapeBucketWarnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ShapeBucketWarning)
        pruned(**ex.as_kwargs())
    return sum(issubclass(w.category, ShapeBucketWarning) for w in caught)


def test_sizes_packed_alike_share_one_bucket(every):
    """(50, 90) captures a bucket; (48, 90), packed alike, reuses it: the shared graph gives (48, 90)'s own
    get_image_features, and with every token kept both sizes give the model's own logits."""
    model, pruned = every
    crops = RN.crops_of(model, torch.tensor(SHARED[0]))
    assert crops == RN.crops_of(model, torch.tensor(SHARED[1])) == 3
    first, second = (_example(model, size, seed=40 + i) for i, size in enumerate(SHARED))
    assert _new_buckets(pruned, first) == 1
    assert _new_buckets(pruned, second) == 0                  # the same packing: no new capture
    assert len(pruned.program.buckets) == 2                   # the prune-time probe's and (50, 90)'s
    stage = next(reversed(pruned.program.buckets.values()))[0]
    with torch.no_grad():
        got = stage.gm(second.pixel_values[:, :crops])[0]
    torch.testing.assert_close(got, _features(model, second), atol=1e-5, rtol=1e-5)
    for ex in (first, second):
        torch.testing.assert_close(pruned(**ex.as_kwargs()).logits, _hf_logits(model, ex), atol=1e-5, rtol=1e-5)


def test_packings_differ_get_buckets(every):
    """The same crop grid unpadded otherwise, and another crop grid, are buckets of their own, each announced
    naming its packing (and right: the model's logits); past the family's limit the next packing is refused
    naming the ones captured, while a packing captured is still served."""
    model, pruned = every
    assert RN.crops_of(model, torch.tensor(OTHER_UNPADDING)) == RN.crops_of(model, torch.tensor(SHARED[0]))
    _new_buckets(pruned, _example(model, SHARED[0]))         # (captured already where the test above ran)
    ex = _example(model, OTHER_UNPADDING)
    with pytest.warns(ShapeBucketWarning, match=r"crop grid 1 x 2 unpadded to 4 x 6 patches, first seen at image "
                                                r"size \(56, 90\) \(shape bucket 3 of at most 8\)"):
        logits = pruned(**ex.as_kwargs()).logits
    torch.testing.assert_close(logits, _hf_logits(model, ex), atol=1e-5, rtol=1e-5)
    pruned.program.family.vision_buckets = 3                   # this model's family object only
    try:
        with pytest.raises(InputError, match=r"crop grid 2 x 1 unpadded to 8 x 4 patches, first seen at image size "
                                             r"\(112, 56\) would be shape bucket 4.*at most 3 \(captured: crop grid 2 x 2"
                                             r".*crop grid 1 x 2 unpadded to 4 x 8.*crop grid 1 x 2 unpadded to 4 x 6"):
            pruned(**_example(model, OTHER_GRID).as_kwargs())
        assert _new_buckets(pruned, _example(model, SHARED[1])) == 0     # a packing captured: still served
    finally:
        pruned.program.family.vision_buckets = type(pruned.program.family).vision_buckets


def test_instruction_starts_after_the_closing_newline(llava_next):
    """The prefill's instruction (what DART's text pivots, MustDrop's text attention, visiontrim_llm's TGVC
    read) starts after the image_newline slot closing the last image, as the vision stage's does: that slot
    holds the image placeholder, it is image features. DART with random scores draws one per instruction token
    in order, so a newline slot counted as text shifts every draw: kept tokens, logits, 16 greedy tokens
    against tests/reference_dart.py with the instruction after the last placeholder."""
    model, program = llava_next
    ex = _example(model, (50, 90), seed=43)
    emb, am, pos, vm = RF.family_inputs(model, ex)
    text = RF.instruction_mask(model, ex)
    ids = ex.input_ids
    assert not bool((text & (ids == model.config.image_token_id)).any())        # no placeholder is text
    ref = R.lm_generate(model, emb, am, pos, selects={2: D.dart_select(8, 1, 3, criterion="random", seed=5, images=2)},
                        vision_mask=vm, text_mask=text, max_new_tokens=STEPS)
    pruned = gp.prune(model, "dart(layer=2, keep=8, vision_pivots=1, text_pivots=3, criterion='random', seed=5)", program=program)
    assert_same_run(pruned, ex, ref, STEPS, kept=ref["keep"])


@pytest.mark.slow
def test_compile_backend_reads_the_same_instruction(llava_next):
    """The torch.compile backend (no input_ids: the merges' placeholder masks) starts the instruction where
    gp.prune does: DART's text pivots give the same logits and caches."""
    model, program = llava_next
    spec = "dart(layer=2, keep=8, vision_pivots=1, text_pivots=3, criterion='random', seed=5)"
    kw = family_zoo.example(model, batch=1, items=("image", "image"), image_size=(50, 90), seed=43).as_kwargs()
    want = gp.prune(model, spec, program=program)(**kw)
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, backend="graphprune", options={"pipeline": spec, "compiler": "eager"})
    with torch.no_grad():
        got = compiled(**kw)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    assert [layer.keys.shape[2] for layer in got.past_key_values.layers] == want.cache.lengths()
