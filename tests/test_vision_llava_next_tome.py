"""ToMe on LLaVA-NeXT (CLIP, with CLS) and LLaVA-OneVision (SigLIP, no CLS) anyres images: tome(positions='keep')
merges in place inside the encoder, crop by crop (each crop is one ViT sequence): a crop's surviving patches split
A/B as ToMe splits [CLS, survivors], its r best A -> B matches merge size-weighted into the B slot, never across
crops; merged-away patches are masked as keys in the later layers of their crop (proportional attention adds
log(size) of each key) and as padding in the LLM. `keep` / `r` count per crop.

Against tests/reference_vision_llava_next_tome.py (independent: the model's own encoder layers crop by crop, the
merge and masks by hand, the tokens laid out by the model's own pack_image_features, the pruned prompt run by
reference.lm_generate): which token merged into which, prefill logits (fp32, atol 1e-5) and 16 greedy tokens on
a left-padded batch of 2; a batch equals each sample alone."""
import pytest
import reference_vision_llava_next as RN
import reference_vision_llava_next_tome as RT
import torch
from checks import assert_batch_equals_samples, assert_same_run
from test_vision_llava_next import _built, _example

import graphprune as gp
from graphprune.errors import PassNotApplicable
from graphprune.passes import tome
from graphprune.passes.tome import bipartite_merge
from graphprune.rewrite.pipeline import Program
from graphprune.tools import family_zoo

STEPS = 16
pytestmark = pytest.mark.filterwarnings("ignore::graphprune.errors.ShapeBucketWarning")


@pytest.mark.parametrize("cls,r,keep", [(True, 3, None), (False, None, 4), (True, None, 2)])
def test_crop_merge_on_a_toy_tensor(cls, r, keep):
    """bipartite_merge with crops (CropOf) on three interleaved crops of one image, some tokens already merged
    away (invalid), unequal sizes: against reference_vision_llava_next_tome.crop_merge run crop by crop on the
    survivors: which token merged into which (validity and sizes), the merged values, every slot kept."""
    g = torch.Generator().manual_seed(11)
    v, d, heads = 23, 6, 2
    crop = torch.randint(0, 3, (v,), generator=g)
    valid = torch.rand(v, generator=g) > 0.2
    keys, hidden = torch.randn(1, 1, v, heads * 4, generator=g), torch.randn(1, 1, v, d, generator=g)
    sizes = torch.randint(1, 4, (1, 1, v), generator=g).float()
    crops = torch.stack([crop, torch.full_like(crop, int(cls))], -1)[None, None]
    out = bipartite_merge(k=None, protected=None, valid=valid[None, None], vision_pos=None, keys=keys, hidden=hidden,
                          sizes=sizes, r=r, keep=keep, layers_left=2, heads=heads, together=None, cls=False,
                          in_place=True, crops=crops)
    want_x, want_s, want_valid = hidden[0, 0].clone(), sizes[0, 0].clone(), valid.clone()
    merged_any = False
    for c in range(3):
        rows = [i for i in range(v) if crop[i] == c and valid[i]]     # token order is each crop's raster order
        count = RT.merges_now(len(rows), r, keep, 2)
        ref = RT.crop_merge(keys[0, 0, rows], hidden[0, 0, rows], sizes[0, 0, rows], cls, count, heads)
        assert len(ref["into"]) == count
        want_x[rows], want_s[rows] = ref["hidden"], ref["sizes"]
        for src in ref["into"]:
            want_valid[rows[src]] = False
        merged_any |= bool(ref["into"])
    assert merged_any
    assert out["picked"][0, 0].tolist() == list(range(v))
    assert torch.equal(out["valid"][0, 0], want_valid)
    torch.testing.assert_close(out["sizes"][0, 0], want_s)
    torch.testing.assert_close(out["values"][0, 0], want_x, atol=1e-6, rtol=1e-6)
    assert float(out["sizes"][0, 0][out["valid"][0, 0]].sum()) == float(sizes[0, 0][valid].sum())


# family, image size (a second NeXT bucket: a tall image), options; the first case of each family is fast
CASES = [("llava_next", (50, 90), dict(keep=10, layers=(0,))),
         ("llava_onevision", (50, 90), dict(r=5, layers=(0, 1))),
         ("llava_next", (112, 56), dict(r=3, layers=(0, 1))),
         ("llava_next", (50, 90), dict(keep=9, layers=(0,), heads=4, proportional_attention=False)),
         ("llava_onevision", (112, 56), dict(keep=30, layers=(0, 1, 2), heads=4))]
FAST = {0, 1}


def _merges_seen(pruned, ex, monkeypatch):
    """Each merge step's output as the pruned vision stage computes it: per merge layer, (images, V) validity and
    sizes, recorded off graphprune's per-crop merge rule."""
    seen, rule = [], tome.merge_in_crops

    def recording(*args):
        out = rule(*args)
        seen.append({k: out[k][:, 0].clone() for k in ("valid", "sizes")})
        return out

    monkeypatch.setattr(tome, "merge_in_crops", recording)
    pruned(**ex.as_kwargs())
    monkeypatch.undo()
    return seen


def _expected_merges(model, ex, ref):
    """The same from the reference's merges ({token: token it joined} per image and layer): a merged-away token
    invalid from then on (keeping its size), the token it joined taking its size."""
    counts = [len(blk) for row in RN.units(model, ex) for blk in row]
    valid = [torch.ones(t, dtype=torch.bool) for t in counts]
    sizes = [torch.ones(t) for t in counts]
    steps = []
    for layer in range(len(ref["merges"][0])):
        for i, image in enumerate(ref["merges"]):
            for src, dst in image[layer].items():
                valid[i][src] = False
                sizes[i][dst] += sizes[i][src]
        steps.append({"valid": torch.stack(valid), "sizes": torch.stack(sizes)})
    return steps


def _expected_mask(model, ex, ref):
    """The LLM attention mask of the pruned prompt: the example's, with every merged-away token's slot 0."""
    mask = ex.attention_mask.clone()
    merges = iter(ref["merges"])
    for s, row in enumerate(RN.units(model, ex)):
        for blk in row:
            for into in next(merges):
                mask[s, blk[list(into)]] = 0
    return mask.gather(1, ref["keep"])


@pytest.mark.parametrize("family,size,opts", [
    pytest.param(*case, marks=() if i in FAST else pytest.mark.slow) for i, case in enumerate(CASES)])
def test_tome_in_place_on_crops_matches_reference(family, size, opts, monkeypatch):
    """tome(positions='keep') on anyres images against reference_vision_llava_next_tome.tome_run (the model's own
    encoder layers crop by crop, each crop's merges by hand): per merge layer the merged-away tokens of each image
    and the sizes of the tokens they joined (which token joined which is then in the merged values the logits
    carry), the merged-away slots masked in the LLM, every slot kept, prefill logits and 16 greedy tokens on a
    left-padded batch of 2 two-image prompts."""
    model, program = _built(family)
    ex = _example(model, size, seed=61)
    ref = RT.tome_run(model, ex, layers=opts["layers"], r=opts.get("r"), keep=opts.get("keep"),
                      proportional=opts.get("proportional_attention", True), heads=opts.get("heads"), steps=STEPS)
    assert all(any(step for step in image) for image in ref["merges"])        # every image merged something
    spec = "tome(" + ", ".join(f"{k}={v!r}" for k, v in opts.items()) + ", positions='keep')"
    pruned = gp.prune(model, spec, program=program)
    out = assert_same_run(pruned, ex, ref, STEPS, kept=ref["keep"])
    assert torch.equal(out.cache[-1].mask.bool(), _expected_mask(model, ex, ref).bool())
    # which token merged into which: the merged-away tokens and the sizes the tokens they joined took
    for got, want in zip(_merges_seen(pruned, ex, monkeypatch), _expected_merges(model, ex, ref), strict=True):
        assert torch.equal(got["valid"], want["valid"])
        torch.testing.assert_close(got["sizes"].float(), want["sizes"])
    info = pruned.program.results[0].info           # recorded at prune time, on the probe bucket's crops
    assert info.get("plans", [info])[0]["at"] == "encoder layer 1, per crop grid (its counts per crop)"


def test_onevision_video_and_one_sequence_cls_refused():
    """LLaVA-OneVision's video tokens are pooled from 2 x 2 patches after the encoder: a patch ToMe merged away
    inside it would have no value for the pool, refused at the call naming why (LLaVA-NeXT-Video alike:
    tests/test_vision_llava_next_video.py::test_refusals); on a CLS tower that runs an image as one sequence
    (LLaVA-1.5) positions='keep' is refused naming positions='compact'."""
    model, program = _built("llava_onevision")
    ex = family_zoo.example(model, batch=1, items=("video",), frames=2, seed=41)
    pruned = gp.prune(model, "tome(keep=8, layers=(0,), positions='keep')", program=program)
    why = r"tome: merges between vision encoder layers.*tokens here are each pooled from 4 encoder patches after"
    with pytest.raises(PassNotApplicable, match=why + r" the encoder.*no value of its own for the pool; prune these "
                                                      r"tokens with vision_topk, random\(stage='vision'\) or an "
                                                      r"LLM-stage pass"):
        pruned(**ex.as_kwargs())
    llava = family_zoo.build("llava")
    with pytest.raises(PassNotApplicable, match=r"positions='keep' merges in place on encoders without CLS and on "
                                                r"anyres images.*use positions='compact'"):
        gp.prune(llava, "tome(keep=8, layers=(0,), positions='keep')",
                 program=Program.capture(llava, stages=("vision",)))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_tome_in_place_batch_equals_alone(family):
    model, program = _built(family)
    ex = family_zoo.example(model, batch=2, pad=(0, 3), seed=62)
    pruned = gp.prune(model, "tome(r=3, layers=(0, 1), positions='keep')", program=program)
    assert_batch_equals_samples(pruned, ex, STEPS)
