"""MustDrop's key set from the last CLIP layer, as the authors' code takes it (mustdrop_keys(key_layer="last")).

LLaVA reads the features of layer -2, so Hugging Face never uses the last encoder layer and torch.export
drops it; asking for it makes the pipeline capture the vision stage through that layer. The authors' rule
(tests/authors_reference.key_set: top ceil(0.08 x patches) by head-averaged CLS attention) runs on the
reference's CLS attention of that last layer (tests/reference.clip_cls_attention, on the feature layer's
output): graphprune keeps the same key set, with and without the merge before it, and the pruned model's
logits and 16 greedy tokens equal the reference run."""
import authors_reference as A
import pytest
import reference as R
import reference_dart as D
import torch
from checks import assert_onnx_matches, assert_same_run

import graphprune as gp
from graphprune.errors import PassConfigError
from graphprune.tools.zoo import llava_example

STEPS = 16


def _last_layer(model):
    return model.config.vision_config.num_hidden_layers - 1


def _mask(index_rows, v):
    return torch.stack([torch.zeros(v, dtype=torch.bool).scatter(0, rows, True) for rows in index_rows])


def _kept_patches(model, ex, kept):
    """Per sample, the patch index (image-token slot minus the first one) of each kept image token."""
    img = ex.input_ids == model.config.image_token_id
    out = []
    for b in range(kept.shape[0]):
        first = int(img[b].nonzero()[0])
        out.append(sorted((kept[b][img[b, kept[b]]] - first).tolist()))
    return out


def test_key_set_of_the_last_layer_is_authors(llava):
    model, program = llava
    ex = llava_example(model, batch=2, pad=(0, 3), seed=2)
    vis = R.llava_vision(model, ex.pixel_values)
    v = vis["cls_attn"].shape[1]
    last = R.clip_cls_attention(model, vis["hidden"], _last_layer(model))
    keys = _mask([A.key_set(row) for row in last], v)
    assert keys.sum(1).tolist() == [3, 3]                                   # ceil(0.08 x 36)
    assert not torch.equal(keys, _mask([A.key_set(row) for row in vis["cls_attn"]], v))   # the layer matters here
    emb, am, pos, vm, prot = R.llava_inputs_from_vision(model, ex, vis, positions="compact", protected=keys)
    ref = R.lm_generate(model, emb, am, pos, selects={2: D.random_select(3, seed=0)}, protected=prot,
                        max_new_tokens=STEPS, vision_mask=vm)
    pruned = gp.prune(model, "mustdrop_keys(key_layer='last') | random(keep=3, layer=2)", program=program)
    out = assert_same_run(pruned, ex, ref, STEPS, kept=ref["keep"])
    assert _kept_patches(model, ex, out.kept) == [k.nonzero()[:, 0].tolist() for k in keys]   # kept = key set


def test_key_set_of_the_last_layer_after_the_merge_is_authors(llava):
    """The authors' pipeline order: windows merged after layer 0 (their emitted order), the rest of the
    tower, the last layer included, runs on the merged tokens; the key set is read there."""
    model, program = llava
    ex = llava_example(model, seed=3)
    top = A.window_scores(R.llava_vision_layer0(model, ex.pixel_values)[0, 1:])[0].sort(descending=True).values
    tau = float((top[1] + top[2]) / 2)                                       # two windows merge

    def merge(h, ctx):
        merged, source = A.conditional_pooling(h[0], tau)
        index = torch.cat([torch.zeros(1, dtype=torch.long), source + 1])
        return merged[None], index[None], torch.ones(1, merged.shape[0], dtype=torch.bool)

    vis = R.llava_vision(model, ex.pixel_values, after_layer={0: merge})
    rows = A.key_set(R.clip_cls_attention(model, vis["hidden"], _last_layer(model))[0])
    expect = sorted(vis["patch_index"][0][rows].tolist())                  # each key token's representative patch
    assert expect != sorted(vis["patch_index"][0][A.key_set(vis["cls_attn"][0])].tolist())   # the layer matters
    pruned = gp.prune(model, f"mustdrop_merge(tau={tau!r}, mode='exact') | mustdrop_keys(key_layer='last') | "
                             f"random(keep={len(expect)}, layer=2)", program=program)
    out = pruned(**ex.as_kwargs())
    assert vis["patch_index"].shape[1] == 36 - 2 * (9 - 1)                  # the merge acted
    assert _kept_patches(model, ex, out.kept) == [expect]


def test_key_layer_option_is_checked(llava):
    model, program = llava
    with pytest.raises(PassConfigError, match="key_layer"):
        gp.prune(model, "mustdrop_keys(key_layer='first')", program=program)
    with pytest.raises(PassConfigError, match="key_layer"):
        gp.prune(model, "mustdrop", keep=64, key_layer=23, program=program)


@pytest.mark.slow
def test_last_layer_key_set_exports_to_onnx(llava, tmp_path):
    """The vision stage captured through its last layer exports and runs on ONNX Runtime as eagerly."""
    pytest.importorskip("onnxruntime")
    model, program = llava
    pruned = gp.prune(model, "mustdrop_keys(key_layer='last') | fastv(layer=2, keep=8)", program=program)
    assert_onnx_matches(pruned, tmp_path / "out", llava_example(model, batch=2, pad=(0, 3), seed=9).as_kwargs())
