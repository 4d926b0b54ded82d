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

This is a lowering: the program's graphs (ONNX export, reports) keep the masked attention. The
torch.compile backend cannot branch on the mask's content inside a graph Inductor compiles (a
guard sees shapes, not values), so it compiles two graphs, the masked one and `always=True`'s
copy whose attention is mask-free unconditionally (the mask's construction then dead and dropped),
and picks one per call on the host with `plain_causal` (targets/dynamo.py, CausalChoice).
"""
from __future__ import annotations

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


def use_causal_kernel(gm: fx.GraphModule, text_config, always: bool = False) -> int:
    """Rewrite a prefill graph in place: SDPA nodes over the captured causal mask choose the
    mask-free causal kernel per call (see the module docstring), or, `always`, run it on every call
    (the graph is then valid for plain-causal prompts only: the caller checks `plain_causal`).
    Returns how many."""
    g = gm.graph
    attention_mask = next((n for n in g.find_nodes(op="placeholder") if n.name == "attention_mask"), None)
    groups = next((n for n in g.find_nodes(op="placeholder") if n.name == "attention_groups"), None)
    window = sliding_window(text_config)
    if attention_mask is None or window == 0:
        return 0
    plain = None
    n = 0
    for node in list(g.find_nodes(op="call_function", target=SDPA)):
        att = Attention.of(layer_of(node), node)
        dropout = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
        if att.is_causal or dropout or captured_mask(att.mask) is None:
            continue
        if plain is None and not always:    # decided once per call, before the first attention
            with g.inserting_before(node):
                plain = g.call_function(plain_causal, (attention_mask, window, groups))
        with g.inserting_before(node):
            if always:
                new = g.call_function(F.scaled_dot_product_attention, (att.q, att.k, att.v),
                                      {"is_causal": True, "scale": att.scale, "enable_gqa": att.enable_gqa})
            else:
                new = g.call_function(causal_or_masked_attention, (att.q, att.k, att.v, att.mask, plain),
                                      {"scale": att.scale, "enable_gqa": att.enable_gqa})
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        n += 1
    if n:
        if always:                          # the mask's construction, now read by nothing (a functional graph)
            g.eliminate_dead_code()
        gm.recompile()
    return n
