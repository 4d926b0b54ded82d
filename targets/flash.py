"""flash-attn as the layers' own attention (prefill and vision graphs), SDPA otherwise.

`use_flash_attention(gm)` replaces every `scaled_dot_product_attention` node of a rewritten graph
with `graphprune::attention`, a `torch.library` op. At run time it uses flash-attn's variable-length
kernel when the package imports, the tensors are on CUDA in fp16/bf16, and the mask says what
flash can express: causal (or full) attention over each sample's valid tokens, which is what
left padding and graphprune's static-capacity key masks produce. The valid tokens are packed
(`cu_seqlens`), attended, and scattered back; rows of invalid tokens come out as zeros (no valid
token reads them: they are masked as keys everywhere). Any other mask, CPU tensors or fp32 fall
back to SDPA. Token scores never need the kernel: passes recompute the attention rows they read
from the layer's own q and k (tokenops.attention_rows).

The decode step keeps SDPA: one query row per step and static shapes for CUDA graphs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from graphprune.anatomy.read import SDPA, Attention, layer_of


def flash_kernel(q: torch.Tensor | None = None):
    """flash-attn's varlen kernel for tensors like `q` (CUDA, fp16/bf16), or None: the package does
    not import, or the tensors are not ones it takes."""
    if q is not None and not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:       # ImportError, or a build for another CUDA / torch
        return None
    return flash_attn_varlen_func


_kernel = flash_kernel      # tests substitute a reference varlen attention to run the packing on CPU


def flash_available(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda" and flash_kernel() is not None


def varlen_layout(mask: torch.Tensor | None, is_causal: bool, b: int, sq: int, sk: int):
    """(valid (B, S) bool, causal) when `mask` is causal-or-full attention restricted to each
    sample's valid tokens (valid queries = valid keys), else None (flash cannot express it)."""
    if sq != sk:
        return None
    if mask is None:
        return torch.ones(b, sk, dtype=torch.bool), is_causal
    if mask.dim() != 4 or mask.shape[1] != 1 or is_causal:
        return None
    allowed = (mask if mask.dtype == torch.bool else mask == 0).expand(b, 1, sq, sk)[:, 0]
    valid = allowed.diagonal(dim1=1, dim2=2)            # a valid token attends to itself
    tri = torch.ones(sq, sk, dtype=torch.bool, device=mask.device).tril()
    for causal, shape in ((True, tri), (False, torch.ones_like(tri))):
        want = shape[None] & valid[:, None, :]
        if bool(((allowed == want) | ~valid[:, :, None]).all()):    # rows of invalid queries do not matter
            return valid, causal
    return None


@torch.library.custom_op("graphprune::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
              is_causal: bool, enable_gqa: bool) -> torch.Tensor:
    kernel = _kernel(q)
    layout = varlen_layout(mask, is_causal, q.shape[0], q.shape[2], k.shape[2]) if kernel is not None else None
    if layout is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    valid, causal = layout
    return packed_attention(q, k, v, valid.to(q.device), causal, scale, kernel)


@attention.register_fake
def _(q, k, v, mask, scale, is_causal, enable_gqa):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def packed_attention(q, k, v, valid, causal: bool, scale, kernel):
    """Pack each sample's valid tokens, run the varlen kernel, scatter back (zeros elsewhere).
    q, k, v: (B, heads, S, d) as SDPA takes them; the kernel takes (tokens, heads, d)."""
    b, h, s, d = q.shape
    lens = valid.sum(1, dtype=torch.int32)
    cu = torch.zeros(b + 1, dtype=torch.int32, device=q.device)
    cu[1:] = lens.cumsum(0)
    flat = valid.reshape(-1).nonzero()[:, 0]

    def pack(x):
        return x.transpose(1, 2).reshape(b * s, x.shape[1], x.shape[3])[flat]
    longest = int(lens.max())
    out = kernel(pack(q), pack(k), pack(v), cu, cu, longest, longest, 0.0, softmax_scale=scale, causal=causal)
    full = q.new_zeros(b * s, h, v.shape[-1])
    full[flat] = out.to(q.dtype)
    return full.reshape(b, s, h, v.shape[-1]).transpose(1, 2)


def use_flash_attention(gm: fx.GraphModule) -> int:
    """Route every SDPA node of `gm` through graphprune::attention; returns how many."""
    n = 0
    for node in list(gm.graph.find_nodes(op="call_function", target=SDPA)):
        if node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0):
            continue                # training-time dropout: leave to SDPA
        att = Attention.of(layer_of(node), node)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.graphprune.attention.default,
                                         (att.q, att.k, att.v, att.mask, att.scale, att.is_causal, att.enable_gqa))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        n += 1
    gm.recompile()
    return n
