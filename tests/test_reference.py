"""Validate the hand-written reference (tests/reference.py) against Hugging Face itself.

This is the only place where HF forwards are called: the reference's unpruned numbers must reproduce HF's
logits, greedy tokens and LLaVA image features.
"""
from __future__ import annotations

import functools

import pytest
import torch

from graphprune.tools.zoo import llava_example, qwen2vl_example, tiny_llava, tiny_qwen2vl

try:
    from tests import reference as ref
except ImportError:  # plain `pytest` with tests/ (not the repo root) on sys.path
    import reference as ref

ATOL = 1e-4
NEW = 8


@functools.lru_cache(maxsize=None)
def _model(name: str):
    return tiny_llava() if name == "llava" else tiny_qwen2vl()


def _example(name: str, batch: int):
    model = _model(name)
    pad = (0, 3) if batch == 2 else ()
    fn = llava_example if name == "llava" else qwen2vl_example
    return model, fn(model, batch=batch, pad=pad)


def _inputs(name, model, ex):
    return ref.llava_inputs(model, ex) if name == "llava" else ref.qwen2vl_inputs(model, ex)


def _hf_new_tokens(model, ex, n):
    with torch.no_grad():
        out = model.generate(**ex.as_kwargs(), max_new_tokens=n, do_sample=False)
    return out[:, ex.input_ids.shape[1]:]


def _assert_same_greedy(hf: torch.Tensor, mine: torch.Tensor, eos: int):
    # HF stops a sample at EOS and pads afterwards; compare up to and including the first EOS
    for b in range(hf.shape[0]):
        row = hf[b].tolist()
        n = row.index(eos) + 1 if eos in row else len(row)
        assert mine[b, :n].tolist() == row[:n], (b, mine[b].tolist(), row)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", ["llava", "qwen2vl"])
def test_unpruned_matches_hf(name, batch):
    model, ex = _example(name, batch)
    emb, mask, pos, vis = _inputs(name, model, ex)
    out = ref.lm_generate(model, emb, mask, pos, max_new_tokens=NEW, vision_mask=vis)
    with torch.no_grad():
        hf = model(**ex.as_kwargs()).logits.float()
    real = mask.bool()
    assert out["prefill_logits"].shape == hf.shape
    torch.testing.assert_close(out["prefill_logits"][real], hf[real], atol=ATOL, rtol=0)
    assert out["keep"] is None
    assert out["kv_lens"] == [ex.input_ids.shape[1]] * model.config.text_config.num_hidden_layers
    assert out["tokens"].shape == (batch, NEW) and len(out["step_logits"]) == NEW
    assert torch.equal(out["tokens"][:, 0], out["prefill_logits"][:, -1].argmax(-1))
    _assert_same_greedy(_hf_new_tokens(model, ex, NEW), out["tokens"], model.generation_config.eos_token_id)


@pytest.mark.parametrize("name", ["llava", "qwen2vl"])
def test_step_logits_match_hf_forward(name):
    # decode logits == HF forward on prompt + generated tokens (no cache), at the generated positions
    model, ex = _example(name, 2)
    emb, mask, pos, vis = _inputs(name, model, ex)
    n = 4
    out = ref.lm_generate(model, emb, mask, pos, max_new_tokens=n, vision_mask=vis)
    toks = out["tokens"]
    kw = ex.as_kwargs()
    if name == "qwen2vl" and "mm_token_type_ids" not in kw:
        # transformers < 5.1 takes every image_token_id in input_ids for an image slot: feed the generated
        # tokens only up to the first one the tiny random model emits (step t needs tokens < t)
        hit = (toks == model.config.image_token_id).any(0).nonzero()
        n = int(hit[0]) + 1 if len(hit) else n
        toks = toks[:, :n - 1]
    kw["input_ids"] = torch.cat([ex.input_ids, toks], dim=1)
    kw["attention_mask"] = torch.cat([ex.attention_mask, torch.ones_like(toks)], dim=1)
    if "mm_token_type_ids" in kw:
        kw["mm_token_type_ids"] = torch.cat([kw["mm_token_type_ids"], torch.zeros_like(toks).int()], dim=1)
    with torch.no_grad():
        hf = model(**kw).logits.float()
    s = ex.input_ids.shape[1]
    for t in range(n):
        torch.testing.assert_close(out["step_logits"][t], hf[:, s - 1 + t], atol=ATOL, rtol=0)


def test_llava_two_images_per_sample_matches_hf():
    model = _model("llava")
    ex = llava_example(model, batch=2, pad=(0, 3), images_per_sample=2)
    emb, mask, pos, vis = ref.llava_inputs(model, ex)
    out = ref.lm_generate(model, emb, mask, pos, max_new_tokens=NEW, vision_mask=vis)
    with torch.no_grad():
        hf = model(**ex.as_kwargs()).logits.float()
    real = mask.bool()
    torch.testing.assert_close(out["prefill_logits"][real], hf[real], atol=ATOL, rtol=0)
    _assert_same_greedy(_hf_new_tokens(model, ex, NEW), out["tokens"], model.generation_config.eos_token_id)
    # compact cls_topk inputs: every image keeps k tokens, in image order
    k = 5
    emb_c, mask_c, pos_c, vis_c = ref.llava_inputs(model, ex, cls_keep=k)
    feats, kept = ref.llava_image_features(model, ex.pixel_values, cls_keep=k)
    assert kept.shape == (4, k) and vis_c.sum(1).tolist() == [2 * k, 2 * k]
    torch.testing.assert_close(emb_c[vis_c].view(4, k, -1), feats)
    assert pos_c[0].tolist() == list(range(emb_c.shape[1]))


def test_llava_image_features_match_hf():
    model, ex = _example("llava", 2)
    px = ex.pixel_values
    mine, kept = ref.llava_image_features(model, px)
    assert kept is None
    with torch.no_grad():
        hf = model.model.get_image_features(pixel_values=px)
    pooled = hf.pooler_output if hasattr(hf, "pooler_output") else hf
    hf_feats = torch.stack(list(pooled)) if isinstance(pooled, (list, tuple)) else pooled
    torch.testing.assert_close(mine, hf_feats.float(), atol=ATOL, rtol=0)


def test_llava_cls_topk_matches_hf_attentions():
    model, ex = _example("llava", 2)
    px = ex.pixel_values
    k = 9
    full, _ = ref.llava_image_features(model, px)
    feats, kept = ref.llava_image_features(model, px, cls_keep=k)
    assert kept.shape == (2, k) and bool((kept.diff(dim=-1) > 0).all())
    torch.testing.assert_close(feats, torch.gather(full, 1, kept[..., None].expand(-1, -1, full.shape[-1])))
    # the CLS attention of layer N-2, from HF's own eager attention probabilities
    vt = model.model.vision_tower
    prev = vt.config._attn_implementation
    vt.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            att = vt(px, output_attentions=True).attentions
    finally:
        vt.config._attn_implementation = prev
    n = model.config.vision_config.num_hidden_layers
    layer = model.config.vision_feature_layer % (n + 1) - 1
    scores = att[layer][:, :, 0, 1:].mean(1)
    expect = torch.topk(scores, k, dim=-1).indices.sort(-1).values
    assert torch.equal(kept, expect)


def test_llava_compact_inputs():
    model, ex = _example("llava", 2)
    k = 9
    emb, mask, pos, vis = ref.llava_inputs(model, ex, cls_keep=k)
    v = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    s = ex.input_ids.shape[1]
    assert emb.shape[:2] == (2, s - (v - k)) and vis.sum(1).tolist() == [k, k]
    feats, _ = ref.llava_image_features(model, ex.pixel_values, cls_keep=k)
    torch.testing.assert_close(emb[vis].view(2, k, -1), feats)
    assert pos[1].tolist() == [0, 0, 0] + list(range(s - (v - k) - 3))
    assert pos[0].tolist() == list(range(s - (v - k)))
    assert mask[1, :3].tolist() == [0, 0, 0]


@pytest.mark.parametrize("name", ["llava", "qwen2vl"])
def test_pruned_shapes_and_identity(name):
    model, ex = _example(name, 2)
    emb, mask, pos, vis = _inputs(name, model, ex)
    full = ref.lm_generate(model, emb, mask, pos, max_new_tokens=3, vision_mask=vis)
    s = emb.shape[1]
    nv = int(vis[0].sum())
    # keeping everything == unpruned
    same = ref.lm_generate(model, emb, mask, pos, select=lambda ctx: torch.arange(s).expand(2, -1),
                           select_layer=2, max_new_tokens=3, vision_mask=vis)
    torch.testing.assert_close(same["prefill_logits"], full["prefill_logits"])
    assert torch.equal(same["tokens"], full["tokens"])
    seen = {}

    def spy(ctx):
        seen.update(ctx)
        return ref.fastv_select(4)(ctx)

    fv = ref.lm_generate(model, emb, mask, pos, select=spy, select_layer=2, max_new_tokens=3, vision_mask=vis)
    assert seen["attn"].shape == (2, 4, s, s)
    torch.testing.assert_close(seen["attn"].sum(-1), torch.ones(2, 4, s))
    assert fv["keep"].shape == (2, s - nv + 4)
    assert fv["kv_lens"] == [s, s, s - nv + 4, s - nv + 4]
    assert fv["prefill_logits"].shape[:2] == (2, s - nv + 4)
    kept_vis = torch.gather(vis, 1, fv["keep"])
    assert kept_vis.sum(1).tolist() == [4, 4]
    # layers before K are untouched: pruning at the last layer only changes that layer
    vt = ref.lm_generate(model, emb, mask, pos, select=ref.vtw_select(), select_layer=2, max_new_tokens=3,
                         vision_mask=vis)
    assert vt["kv_lens"] == [s, s, s - nv, s - nv]
    assert not bool(torch.gather(vis, 1, vt["keep"]).any())
    kl = ref.vtw_kl(full["prefill_logits"][:, -1], vt["prefill_logits"][:, -1])
    assert kl >= 0.0
    assert ref.vtw_kl(full["prefill_logits"][:, -1], full["prefill_logits"][:, -1]) == pytest.approx(0.0, abs=1e-6)


def test_hf_eager_attention_probs_match_reference():
    # the attention probabilities handed to `select` == HF's eager attentions of layer K-1
    model, ex = _example("llava", 2)
    emb, mask, pos, vis = ref.llava_inputs(model, ex)
    seen = {}

    def spy(ctx):
        seen.update(ctx)
        return torch.arange(emb.shape[1]).expand(2, -1)

    ref.lm_generate(model, emb, mask, pos, select=spy, select_layer=2, max_new_tokens=1, vision_mask=vis)
    lm = model.model.language_model
    prev = lm.config._attn_implementation
    lm.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            att = model(**ex.as_kwargs(), position_ids=pos, output_attentions=True).attentions
    finally:
        lm.config._attn_implementation = prev
    real = mask.bool()
    mine, theirs = seen["attn"], att[1].float()
    for b in range(2):
        r = real[b]
        torch.testing.assert_close(mine[b][:, r][:, :, r], theirs[b][:, r][:, :, r], atol=1e-5, rtol=0)
