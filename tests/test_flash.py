"""flash-attn lowering (graphprune.targets.flash), on CPU with a reference variable-length kernel.

flash-attn itself needs CUDA; its varlen kernel is replaced here by `reference_varlen`, written
from the definition (per packed sequence: softmax(q k^T * scale [+ causal]) v), so the packing,
the mask analysis and the scatter back run for real and are compared with SDPA and with eager
graphprune. The real kernel runs in examples/gpu_check.py and the GPU-marked test below.
"""
import pytest
import torch

import graphprune as gp
from graphprune.errors import InputError
from graphprune.targets import flash
from graphprune.tools import zoo


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
    reference_varlen.calls += 1
    out = torch.empty_like(q)
    for i in range(len(cu_q) - 1):
        a, b = int(cu_q[i]), int(cu_q[i + 1])
        qi, ki, vi = q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)   # (H, n, d)
        if ki.shape[0] != qi.shape[0]:                                                        # GQA
            ki = ki.repeat_interleave(qi.shape[0] // ki.shape[0], 0)
            vi = vi.repeat_interleave(qi.shape[0] // vi.shape[0], 0)
        scale = softmax_scale if softmax_scale is not None else qi.shape[-1] ** -0.5
        s = qi @ ki.transpose(1, 2) * scale
        if causal:
            s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        out[a:b] = (s.softmax(-1) @ vi).transpose(0, 1)
    return out


reference_varlen.calls = 0


@pytest.fixture
def on_cpu(monkeypatch):
    """Pretend flash-attn is there, with the reference kernel standing in for it."""
    monkeypatch.setattr(flash, "_kernel", lambda q: reference_varlen)
    monkeypatch.setattr(flash, "flash_available", lambda device: True)
    reference_varlen.calls = 0


def _padded_causal(b, s, pad):
    valid = torch.ones(b, s, dtype=torch.bool)
    for i, p in enumerate(pad):
        valid[i, :p] = False
    tri = torch.ones(s, s, dtype=torch.bool).tril()
    return (tri[None] & valid[:, None, :])[:, None], valid


def test_layout_reads_causal_padding_and_refuses_other_masks():
    mask, valid = _padded_causal(2, 6, (0, 2))
    got, causal = flash.varlen_layout(mask, False, 2, 6, 6)
    assert causal and torch.equal(got, valid)
    got, causal = flash.varlen_layout(None, False, 2, 6, 6)
    assert not causal and bool(got.all())
    odd = mask.clone()
    odd[0, 0, 5, 1] = False                       # a valid query that may not see a valid key
    assert flash.varlen_layout(odd, False, 2, 6, 6) is None
    assert flash.varlen_layout(mask[..., :1, :], False, 2, 1, 6) is None      # decode rows stay SDPA


def test_attention_op_matches_sdpa_on_valid_rows(on_cpu):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    mask, valid = _padded_causal(2, 6, (0, 2))
    got = torch.ops.graphprune.attention(q, k, v, mask, 0.3, False, False)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    assert reference_varlen.calls == 1
    rows = valid[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[rows], want[rows], atol=1e-5, rtol=0)
    assert bool((got[~rows] == 0).all())


def test_attention_op_passes_opcheck():
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask, _ = _padded_causal(2, 6, (0, 1))
    torch.library.opcheck(torch.ops.graphprune.attention.default, (q, k, v, mask, None, False, True))


@pytest.mark.parametrize("pipeline, pad", [("fastv(layer=2, keep=8)", (0, 3)), ("dart(layer=2, keep=8)", ()),
                                           pytest.param("mustdrop_filter(layers=(1, 2), gamma=0.01, alpha=0.02, "
                                                        "capacity=24)", (0, 2), marks=pytest.mark.slow)])
def test_pruned_model_with_flash_attention_matches_sdpa(on_cpu, pipeline, pad):
    model = zoo.tiny_llava()
    kw = zoo.llava_example(model, batch=2, pad=pad).as_kwargs()
    want = gp.prune(model, pipeline, attention="sdpa")
    got = gp.prune(model, pipeline, attention="flash")
    assert got.attention == "flash" and want.attention == "sdpa"
    a, b = got(**kw), want(**kw)
    assert reference_varlen.calls > 0, "the flash path did not run"
    assert torch.equal(a.kept, b.kept)
    real = kw["attention_mask"].gather(1, b.kept).bool()
    torch.testing.assert_close(a.logits[real], b.logits[real], atol=1e-4, rtol=0)
    assert torch.equal(got.generate(**kw, max_new_tokens=6), want.generate(**kw, max_new_tokens=6))


def test_attention_choice_is_checked():
    model = zoo.tiny_llava()
    with pytest.raises(InputError, match="flash_attn package and a CUDA model"):
        gp.prune(model, "fastv(layer=2, keep=8)", attention="flash")
    with pytest.raises(InputError, match="attention must be"):
        gp.prune(model, "fastv(layer=2, keep=8)", attention="xformers")
    assert gp.prune(model, "fastv(layer=2, keep=8)").attention == "sdpa"      # auto on CPU


@pytest.mark.skipif(not torch.cuda.is_available() or flash.flash_kernel() is None,
                    reason="needs CUDA and the flash_attn package (pip install 'graphprune[gpu]')")
def test_real_flash_kernel_matches_sdpa_on_gpu():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    mask, valid = _padded_causal(2, 64, (0, 9))
    mask, valid = mask.cuda(), valid.cuda()
    got = torch.ops.graphprune.attention(q, k, v, mask, None, False, False)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    rows = valid[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[rows], want[rows], atol=2e-3, rtol=0)
