"""Per-layer KV caches of different lengths, and the graph rewrites that produce them.

`keep_final_tokens` (prefill, MustDrop's output-aware cache) cuts the caches of shallow layers to
the tokens that survive a later selection.

After a pruned prefill, layer l's cache holds exactly the tokens layer l kept. The captured
decode step builds one attention mask from one cache length for all layers; `shrink_kv`
rewires each layer's attention to a mask of its own, made from a per-layer input
`kv_mask_<l>` (B, len_l + 1), so every layer attends to exactly its own cache.

`static_kv` then turns that step into one with static shapes (CUDA graphs, reduce-overhead):
each layer's cache is a buffer sized to what it kept plus the tokens to generate, written in
place at `kv_write_pos[l]`; the mask marks the filled slots. The runtime cache these graphs read
and write is graphprune.lower.cache.PrunedCache.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from graphprune import tokenops
from graphprune.anatomy.read import Anatomy
from graphprune.errors import GraphVerificationError, PassConfigError
from graphprune.rewrite.layout import add_output, state_at


def layer_mask(kv_mask):
    """(B, P) 1/0 padding mask of a layer's cache + new token -> SDPA mask (B, 1, 1, P), True = attend;
    None (every key real: the runtime knows it without looking) -> no mask, as transformers decodes."""
    return None if kv_mask is None else kv_mask.bool()[:, None, None, :]


def key_masks_optional(gm: fx.GraphModule) -> bool:
    """Whether a decode graph reads its kv_mask_<l> inputs only as attention masks (through layer_mask
    into SDPA), so that a step whose keys are all real may pass None and skip building them."""
    masks = [n for n in gm.graph.find_nodes(op="placeholder") if n.name.startswith("kv_mask_")]
    return bool(masks) and all(
        u.op == "call_function" and u.target is layer_mask
        and all(w.op == "call_function" and "scaled_dot_product" in str(w.target) for w in u.users)
        for m in masks for u in m.users)


def shrink_kv(gm: fx.GraphModule, anat: Anatomy) -> fx.GraphModule:
    """Give every decode layer its own cache mask input; drop the shared mask computation."""
    g = gm.graph
    last = list(g.find_nodes(op="placeholder"))[-1]
    masks = []
    for layer in anat.layers:
        with g.inserting_after(last):
            last = g.placeholder(f"kv_mask_{layer.index}")
        masks.append(last)
    for layer, m in zip(anat.layers, masks):
        sdpa = layer.attention.node
        with g.inserting_before(sdpa):
            mask = g.call_function(layer_mask, (m,))
        args = list(sdpa.args) + [None] * (4 - len(sdpa.args))
        args[3] = mask
        sdpa.args = tuple(args[:4]) + tuple(sdpa.args[4:])
        kwargs = dict(sdpa.kwargs)
        kwargs.pop("attn_mask", None)
        kwargs["is_causal"] = False
        sdpa.kwargs = kwargs
    _own_lengths(g, anat)
    g.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
    for n in list(g.find_nodes(op="placeholder")):
        if n.name == "attention_mask" and not n.users:
            g.erase_node(n)
    return _checked(gm, "shrink_kv")


def _checked(gm: fx.GraphModule, rewrite: str) -> fx.GraphModule:
    try:
        gm.graph.lint()
    except Exception as e:  # fx raises plain RuntimeError
        raise GraphVerificationError(f"decode graph malformed after {rewrite}: {e}") from e
    gm.recompile()
    return gm


def _own_lengths(g: fx.Graph, anat: Anatomy) -> None:
    # The export unified every layer's past length with layer 0's (one shared mask forced it), so
    # shapes inside layer l (repeat_kv's expand, ...) read layer 0's length: give each layer its own.
    past = [n for n in g.find_nodes(op="placeholder") if n.name.startswith("past_")]
    sym = past[0].meta["val"].shape[2].node.expr
    for layer in anat.layers:
        own = past[2 * layer.index]
        inside, made = set(layer.nodes), {}
        for n in layer.nodes:
            for a in list(n.all_input_nodes):
                v = a.meta.get("val")
                if a in inside or not isinstance(v, torch.SymInt) or sym not in v.node.expr.free_symbols:
                    continue
                offset = v.node.expr - sym
                if not offset.is_Integer:
                    raise GraphVerificationError(f"decode layer {layer.index}: cannot rebase size {v.node.expr}")
                if a not in made:
                    with g.inserting_before(layer.first):
                        size = g.call_function(torch.ops.aten.sym_size.int, (own, 2))
                        made[a] = g.call_function(operator.add, (size, int(offset))) if offset else size
                n.replace_input_with(a, made[a])


def keep_final_tokens(p, rule, gm: fx.GraphModule, anat: Anatomy) -> dict:
    """Output-aware cache: layers first..last-1 store only the tokens that survive to layer `last`."""
    g = gm.graph
    final = state_at(anat, rule.last)
    if not 0 <= rule.first < rule.last <= anat.num_layers:
        raise PassConfigError(f"{p.name}: cache layers {rule.first}..{rule.last} out of range")
    key_valid = final.key_valid
    out = g.find_nodes(op="output")[0]
    cut = []
    with g.inserting_before(out):
        for i in range(rule.first, rule.last):
            own = state_at(anat, i)
            if own is final:
                continue
            at = g.call_function(tokenops.positions_of, (own.seq_index, final.seq_index))
            k, v = anat.layer(i).kv_write
            kk = g.call_function(tokenops.take_tokens, (k, at, 0, (2,)))
            vv = g.call_function(tokenops.take_tokens, (v, at, 0, (2,)))
            out.replace_input_with(k, kk)
            out.replace_input_with(v, vv)
            anat.layer(i).kv_write = (kk, vv)
            add_output(gm, final.seq_index, f"kv_tokens_{i}")
            if key_valid is not None:
                add_output(gm, key_valid, f"kv_valid_{i}")
            cut.append(i)
    info = {"pass": repr(p), "stage": anat.stage, "layer": rule.last, "keep": "cache", "positions": "keep",
            "rerouted": [], "rule": "KeepCache", "signals": {}, "cut_layers": cut}
    anat.selections.append(info)
    return info


def cache_write(buffer, pos, new):
    """Write the new token's k or v (B, H, 1, d) into a static cache buffer at slot pos, in place."""
    return buffer.index_copy_(2, pos, new)


def static_kv(gm: fx.GraphModule, anat: Anatomy) -> fx.GraphModule:
    """Rewrite a shrink_kv decode step to static per-layer buffers updated in place."""
    g = gm.graph
    placeholders = {n.name: n for n in g.find_nodes(op="placeholder")}
    with g.inserting_after(list(placeholders.values())[-1]):
        write_pos = g.placeholder("kv_write_pos")
    for layer in anat.layers:
        with g.inserting_before(layer.first):
            pos = g.call_function(operator.getitem, (write_pos, slice(layer.index, layer.index + 1)))
        for j, node in enumerate(layer.kv_write):
            if node.target is not torch.ops.aten.cat.default:
                raise GraphVerificationError(f"decode layer {layer.index}: expected the cache update to be a cat, "
                                             f"found {node.target}")
            buffer = placeholders[f"past_{2 * layer.index + j}"]
            with g.inserting_before(node):
                written = g.call_function(cache_write, (buffer, pos, node.args[0][-1]))
            node.replace_all_uses_with(written)
            g.erase_node(node)
    # lengths: every "cache length + 1" of the dynamic step is now the buffer's own length
    for n in list(g.nodes):
        if n.target is not operator.add or 1 not in n.args:
            continue
        size = n.args[1 - n.args.index(1)]
        if getattr(size, "target", None) is torch.ops.aten.sym_size.int and size.args[0].name.startswith("past_"):
            n.replace_all_uses_with(size)
            g.erase_node(n)
    g.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output") or n.target is cache_write)
    return _checked(gm, "static_kv")
