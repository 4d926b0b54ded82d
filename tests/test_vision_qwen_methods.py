"""VisPruner and ToMe on a tiny Qwen2.5-VL (no CLS, 2x2 merger, M-RoPE LM; its ViT here 3 blocks: windowed,
windowed, full, so that ToMe merges before a windowed block as well as a full one), the encoder captured per
patch grid: kept (and merged) sets, prefill logits (fp32, atol 1e-5) and 16 greedy tokens equal the independent
references (tests/reference_vision_qwen_methods.py, the pruned prompt run through the model's own forward by
reference_vision_qwen.hf_generate); a left-padded batch of 2 equals each sample alone; bad options are refused
before any work."""
import pytest
import reference_vision_qwen as RQ
import reference_vision_qwen_methods as RM
import torch
from checks import assert_batch_equals_samples, assert_same_run
from reference_families import family_inputs

import graphprune as gp
from graphprune.errors import InputError, PassConfigError, PassNotApplicable
from graphprune.rewrite.pipeline import Program
from graphprune.tools import family_zoo, zoo

STEPS = 16
VISPRUNER = "vispruner(keep={keep}, important='attention', positions='keep')"
pytestmark = pytest.mark.filterwarnings("ignore::graphprune.errors.ShapeBucketWarning")


@pytest.fixture(scope="module")
def qwen25():
    model = family_zoo.build("qwen2_5_vl", vision=dict(depth=3, fullatt_block_indexes=[2]))
    return model, Program.capture(model, stages=("vision", "prefill", "decode"))


@pytest.mark.parametrize("keep,ratio,batch,pad,items,seed", [
    # units: the image and each of the video's 2 frames; 1 important, 4 diverse after two rounds (15 -> 7 -> 4)
    (5, 0.25, 2, (0, 2), ("image", "video"), 44),
])
def test_vispruner_attention_matches_reference(qwen25, keep, ratio, batch, pad, items, seed):
    model, program = qwen25
    ex = family_zoo.example(model, batch=batch, pad=pad, items=items, seed=seed)
    kept = RM.vispruner(model, ex, keep, ratio)
    assert not torch.equal(kept, RQ.kept_positions(model, ex, keep, "attention"))    # the diverse tokens matter
    ref = RQ.hf_generate(model, ex, kept, STEPS)
    pruned = gp.prune(model, VISPRUNER.format(keep=keep)[:-1] + f", important_ratio={ratio})", program=program)
    assert_same_run(pruned, ex, ref, STEPS, kept=kept)


def test_vispruner_attention_on_llava_clip(llava):
    """The same option on a tower with CLS (LLaVA-1.5's CLIP: CLS among the queries, not the tokens ranked):
    the feature layer's attention received, the diversity on the features entering the projector, compact."""
    import reference as R
    model, program = llava
    ex = zoo.llava_example(model, batch=2, pad=(0, 3), seed=2)
    vis = R.llava_vision(model, ex.pixel_values)
    patches = torch.stack([RM.vispruner_choice(vis["received"][i], vis["pre_features"][i], 9, 0.5)
                           for i in range(vis["received"].shape[0])])
    assert not torch.equal(patches, vis["received"].topk(9, dim=-1).indices.sort(-1).values)
    feats = vis["features"].gather(1, patches[..., None].expand(-1, -1, vis["features"].shape[-1]))
    emb, am, pos, vm, _ = R.llava_inputs_from_vision(model, ex, {"features": feats, "patch_index": patches})
    ref = R.lm_generate(model, emb, am, pos, max_new_tokens=STEPS, vision_mask=vm)
    pruned = gp.prune(model, "vispruner(keep=9, important='attention')", program=program)
    assert_same_run(pruned, ex, ref, STEPS)
    assert pruned.report.patches_kept == patches.tolist()


def test_vispruner_batch_equals_alone(qwen25):
    model, program = qwen25
    ex = family_zoo.example(model, batch=2, pad=(0, 3), items=("image", "video"), seed=47)
    assert_batch_equals_samples(gp.prune(model, VISPRUNER.format(keep=6), program=program), ex, STEPS)


def test_reference_encoder_is_the_models(qwen25):
    """The reference's encoder by hand, merging nothing, gives the model's own features (images, video frames)."""
    model, _ = qwen25
    ex = family_zoo.example(model, batch=2, pad=(0, 2), items=("image", "video"), seed=44)
    kept, embeds = RM.tome(model, ex, 16, ())
    emb = family_inputs(model, ex)[0]
    assert kept.shape[1] == ex.input_ids.shape[1]
    torch.testing.assert_close(embeds, emb, atol=1e-5, rtol=1e-5)


TOME = "tome(keep={keep}, layers={layers}, positions='keep')"


@pytest.mark.parametrize("keep,layers,batch,pad,items,seed", [
    (7, (0, 1), 2, (0, 2), ("image", "video"), 46),    # 16 -> 11 before windowed block 1, -> 7 before full block 2
])
def test_tome_in_place_matches_reference(qwen25, keep, layers, batch, pad, items, seed):
    model, program = qwen25
    ex = family_zoo.example(model, batch=batch, pad=pad, items=items, seed=seed)
    kept, embeds = RM.tome(model, ex, keep, layers)
    assert not torch.equal(kept, RM.tome(model, ex, keep, layers, windows=False)[0])    # the windows matter
    ref = RQ.hf_generate(model, ex, kept, STEPS, embeds)
    pruned = gp.prune(model, TOME.format(keep=keep, layers=layers), program=program)
    assert_same_run(pruned, ex, ref, STEPS, kept=kept)


def test_tome_batch_equals_alone(qwen25):
    model, program = qwen25
    ex = family_zoo.example(model, batch=2, pad=(0, 3), items=("image",), seed=48)
    assert_batch_equals_samples(gp.prune(model, TOME.format(keep=8, layers=(0, 1)), program=program), ex, STEPS)


@pytest.mark.parametrize("spec,error,words", [
    ("tome(keep=8)", PassNotApplicable, ["tome", "CLS token", "positions='keep'"]),
    ("tome(keep=8, positions='keep')", PassConfigError, ["layers=(0, 1, 2,", "0..1", "layers=(0, 1)"]),
    ("tome(keep=8, layers=(1, 2), positions='keep')", PassConfigError, ["last encoder layer (2)", "merger"]),
    ("tome(keep=8, layers=(0,), positions='shift')", PassConfigError, ["positions", "'shift'"]),
    ("vispruner(keep=8, positions='keep')", PassNotApplicable, ["vispruner", "CLS token", "important='attention'"]),
    ("vispruner(keep=8, important='cls_free', positions='keep')", PassConfigError, ["important", "'cls_free'"]),
    ("vispruner(keep=8, important='attention')", PassNotApplicable, ["positions='compact'", "M-RoPE"]),
    ("vispruner(keep=0, important='attention', positions='keep')", PassConfigError, ["keep=0"]),
])
def test_bad_options_refused_before_work(qwen25, spec, error, words):
    model, program = qwen25
    with pytest.raises(error) as err:
        gp.prune(model, spec, program=program)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_tome_refuses_merges_no_window_allows():
    """Where fewer A tokens have a B token in their window than merges are asked for, ToMe says so."""
    from graphprune.passes.tome import bipartite_merge
    keys, hidden = torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 12)
    together = torch.eye(6, dtype=torch.bool).expand(1, 1, 6, 6) | torch.tensor([[1, 1, 0, 0, 0, 0]] * 6).bool().T
    args = dict(k=None, protected=None, valid=None, vision_pos=None, keys=keys, hidden=hidden, sizes=None, keep=None,
                layers_left=1, heads=None, cls=False, in_place=True)
    assert bipartite_merge(together=together, r=1, **args)["picked"].tolist() == [[[1, 2, 3, 4, 5]]]
    with pytest.raises(InputError, match="2 merges.*attention window"):
        bipartite_merge(together=together, r=2, **args)


def test_tome_keep_positions_refused_with_cls(llava):
    """In place, the bipartite split would start at CLS's place: a CLS tower keeps ToMe's own order."""
    model, program = llava
    with pytest.raises(PassNotApplicable, match="positions='compact'"):
        gp.prune(model, "tome(keep=8, positions='keep')", program=program)
