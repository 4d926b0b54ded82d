"""The mask-free causal kernel where a prefill's attention mask is plain causal.

A captured prefill builds its attention mask in the graph (causal AND the prompt's padding, as
transformers does while tracing) and every layer's SDPA reads it, or the kept rows and columns of
it (`tokenops.take_tokens`, ascending kept positions) after a pass. Transformers itself, at run
time, drops the mask when nothing is padded and calls SDPA with `is_causal=True`, whose kernels are
faster than the masked ones (on the speed model's CPU prefill the mask made attention 1.3-1.9x
slower, more the longer the prompt).

`use_causal_kernel(gm, text_config)` gives a prefill graph the same choice: every SDPA node whose
mask is the captured one, or kept tokens of it, becomes `causal_or_masked_attention`, which runs
SDPA with `is_causal=True` and no mask when the prompt is plain causal and with the mask otherwise.
Plain causal (`plain_causal`, computed once per call from the graph's `attention_mask` input):
no padding and no invalid static-capacity slot anywhere in the prompt (the runtime writes those
into `attention_mask`), no bidirectional attention group (the `attention_groups` input of Gemma 3
and PaliGemma prefills) and, for a sliding-window model, a prompt no longer than the window. Kept
tokens stay causal among themselves because every LLM-stage selection keeps them in prompt order
(a reordering choice is refused outside the vision stage, whose output the LLM sees as a new
sequence with its own causal mask). Attention behind a static-capacity key mask
(`tokenops.mask_keys`) or any other mask a pass built keeps its mask.

Two more things transformers does on such a prompt, which the captured graph does not (issue 19: the
unpruned Qwen2.5-VL video-length prefill ran at 0.97x transformers' speed without them). It builds no
mask: here every node that feeds nothing but the rewritten attention's mask operand (the captured
mask's construction, the kept rows of it) becomes `unless_plain(op)`, skipped on a plain-causal
prompt; a mask a pass's signal reads (FastV's attention scores) is still built. And with
grouped-query attention it reads each KV head once (SDPA's `enable_gqa`) where the graph captured
`repeat_kv`, a copy of the keys and values per query head: the rewritten attention takes the keys
and values before the repeat (`_repeat_kv_source`), and the repeat goes when nothing else reads it.

This is a lowering: the program's graphs (ONNX export, reports) keep the masked attention. The
torch.compile backend cannot branch on the mask's content inside a graph Inductor compiles (a
guard sees shapes, not values), so it compiles two graphs, the masked one and `always=True`'s
copy whose attention is mask-free unconditionally (the mask's construction then dead and dropped),
and picks one per call on the host with `plain_causal` (targets/dynamo.py, CausalChoice).
"""
from __future__ import annotations

import functools
import re
import sys

import torch
import torch.nn.functional as F
from torch import fx

from graphprune.anatomy.read import SDPA, Attention, captured_mask, layer_of
from graphprune.compat import sliding_window


def causal_or_masked_attention(q, k, v, mask, plain: bool, scale=None, enable_gqa: bool = False):
    """SDPA over the layer's mask, or mask-free with is_causal=True when the prompt is plain causal
    (then the mask is the lower triangle, and the two agree)."""
    if plain:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)


def plain_causal(attention_mask: torch.Tensor, window: int | None, groups: torch.Tensor | None = None) -> bool:
    """The captured mask is the lower triangle: nothing padded or masked, no bidirectional attention
    group (Family.attention_groups), and the prompt fits the sliding window (if the model has one)."""
    return (bool(attention_mask.all()) and (groups is None or not bool((groups >= 0).any()))
            and (window is None or attention_mask.shape[-1] <= window))


@functools.cache
def unless_plain(op):
    """op as a graph node's target taking the prompt's `plain` first: op(*args, **kwargs), or None when
    the prompt is plain causal (the node builds nothing but the attention mask, or kept tokens of it,
    which the mask-free kernel does not read). A function per op, which fx's code names."""
    def run(plain: bool, *args, **kwargs):
        return None if plain else op(*args, **kwargs)
    run.__name__ = run.__qualname__ = "unless_plain_" + re.sub(r"\W", "_", getattr(op, "__name__", str(op)))
    run.op = op
    return run


def use_causal_kernel(gm: fx.GraphModule, text_config, always: bool = False) -> int:
    """Rewrite a prefill graph in place: SDPA nodes over the captured causal mask choose the
    mask-free causal kernel per call (see the module docstring), or, `always`, run it on every call
    (the graph is then valid for plain-causal prompts only: the caller checks `plain_causal`).
    Keys and values repeated per query head (transformers' repeat_kv) are read once per KV head
    instead (SDPA's enable_gqa), as transformers does where it drops the mask. Returns how many."""
    g = gm.graph
    placeholders = {n.name: n for n in g.find_nodes(op="placeholder")}
    attention_mask, groups = placeholders.get("attention_mask"), placeholders.get("attention_groups")
    window = sliding_window(text_config)
    if attention_mask is None or window == 0:
        return 0
    todo = []
    for node in g.find_nodes(op="call_function", target=SDPA):
        att = Attention.of(layer_of(node), node)
        dropout = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
        if not (att.is_causal or dropout or captured_mask(att.mask) is None):
            todo.append((node, att))
    if not todo:
        return 0
    plain = None
    if not always:                          # decided once per call, before anything builds the mask
        with g.inserting_after(list(placeholders.values())[-1]):
            plain = g.call_function(plain_causal, (attention_mask, window, groups))
    rewritten = set()
    for node, att in todo:
        k, v, gqa, repeats = _unrepeated_kv(att)
        with g.inserting_before(node):
            if always:
                new = g.call_function(F.scaled_dot_product_attention, (att.q, k, v),
                                      {"is_causal": True, "scale": att.scale, "enable_gqa": gqa})
            else:
                new = g.call_function(causal_or_masked_attention, (att.q, k, v, att.mask, plain),
                                      {"scale": att.scale, "enable_gqa": gqa})
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        # each repeat from its output down to its first node (once, should k and v share one)
        for dead in (n for n in dict.fromkeys(n for repeat in repeats for n in repeat) if not n.users):
            g.erase_node(dead)
        rewritten.add(new)
    if always:                              # the mask's construction, now read by nothing (a functional graph)
        g.eliminate_dead_code()
    else:
        for node in _mask_only(g, rewritten):
            node.args, node.target = (plain, *node.args), unless_plain(node.target)
    gm.recompile()
    return len(todo)


def _unrepeated_kv(att: Attention) -> tuple:
    """(k, v, enable_gqa, the repeats' nodes) for the rewritten attention: the per-KV-head keys and
    values where both operands are transformers' repeat_kv of them by one factor, else the operands
    as they are (and no nodes)."""
    k, v = _repeat_kv_source(att.k), _repeat_kv_source(att.v)
    if att.enable_gqa or k is None or v is None or k[1] != v[1]:
        return att.k, att.v, att.enable_gqa, ()
    return k[0], v[0], True, (k[2], v[2])


def _repeat_kv_source(node) -> tuple | None:
    """(x, factor, the repeat's nodes) when `node` is repeat_kv(x, factor) as captured: x (B, H_kv, S, D)
    unsqueezed at dim 2 (full slices around it), expanded to (B, H_kv, factor, S, D) and reshaped to
    (B, H_kv * factor, S, D); kv head i then serves query heads i * factor ... (i + 1) * factor - 1, as
    SDPA's enable_gqa reads them. None for anything else."""
    aten = torch.ops.aten
    if not _is_call(node, aten.reshape.default) or not _is_call(node.args[0], aten.expand.default):
        return None
    expand = node.args[0]
    size, shape = list(expand.args[1]), list(node.args[1])
    if len(size) != 5 or len(shape) != 4 or not all(isinstance(d, int) for d in (size[1], size[2], shape[1])):
        return None
    if shape[1] != size[1] * size[2] or size[2] < 2:
        return None
    chain = [node, expand]
    x = _through_full_slices(expand.args[0], chain)
    if not _is_call(x, aten.unsqueeze.default) or x.args[1] != 2:
        return None
    chain.append(x)
    return _through_full_slices(x.args[0], chain), size[2], chain


def _through_full_slices(node, chain: list):
    """The tensor under any slices that keep every element (x[:, :] as captured), those appended to chain."""
    while _is_call(node, torch.ops.aten.slice.Tensor):
        start, end, step = (list(node.args[2:]) + [None, None, None])[:3]
        if start not in (0, None) or (end is not None and end < sys.maxsize) or step not in (1, None):
            break
        chain.append(node)
        node = node.args[0]
    return node


def _is_call(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _mask_only(g: fx.Graph, attentions: set) -> list:
    """The nodes whose values reach nothing but the mask operand of the rewritten attention (the
    captured mask's construction, kept tokens of it), in graph order: none of them runs when the
    prompt is plain causal."""
    only = set()
    for node in reversed(g.nodes):
        if node.op == "call_function" and node.users and all(
                u in only or (u in attentions and u.args[3] is node and node not in u.args[:3]) for u in node.users):
            only.add(node)
    return [n for n in g.nodes if n in only]
