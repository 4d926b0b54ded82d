"""Position ids between LLM layers: compact renumbering after a selection, per-layer decode positions.

A language model computes its rotary cos/sin once, at the top of the graph, from `position_ids`
(the "rotary slice": every node outside the layers that depends on that input). Renumbering the
kept tokens therefore means running a copy of that slice on the new position ids and handing the
copy to the layers that run on the renumbered sequence. Decoding with one position per layer (each
layer continues its own numbering) runs one copy of the slice per layer.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx

from graphprune.anatomy.read import Anatomy, layer_of
from graphprune.errors import PassConfigError, PassNotApplicable
from graphprune.rewrite.pass_api import TokenPass

LAYER_POSITIONS = "layer_positions"     # decode input: (layers, B, 1) position of the new token in each layer


def rotary_slice(gm: fx.GraphModule, anat: Anatomy) -> list[fx.Node]:
    """The nodes before the first layer that compute from `position_ids` (in graph order)."""
    pos = anat.inputs.get("position_ids")
    if pos is None:
        raise PassNotApplicable(f"{anat.model_class}: the {anat.stage} graph takes no position_ids to renumber")
    first = anat.layers[0].first
    tainted, out = {pos}, []
    for n in gm.graph.nodes:
        if n is first:
            break
        if n.op == "call_function" and layer_of(n) is None and any(a in tainted for a in n.all_input_nodes):
            tainted.add(n)
            out.append(n)
    return out


def check_one_axis(anat: Anatomy, p: TokenPass) -> None:
    """Compact renumbering is defined for 1-D positions; M-RoPE's (3, B, S) ids are refused, saying
    whether the pass would run with positions='keep'."""
    val = anat.inputs["position_ids"].meta.get("val")
    if val is not None and val.dim() != 2:
        raise PassNotApplicable(f"{p.name}: positions='compact' renumbers 1-D rotary positions; {anat.model_class} "
                                f"takes {val.dim()}-D position ids (M-RoPE), whose renumbering is not defined; "
                                f"{_keep_instead(p)}")


def _keep_instead(p: TokenPass) -> str:
    """positions='keep', or why the pass as configured cannot take it (the same pass with that option)."""
    options = {f.name: getattr(p.config, f.name) for f in dataclasses.fields(p.config)}
    if "positions" not in options:
        return f"{p.name} renumbers by design, so it cannot run on this model"
    try:
        type(p)(**{**options, "positions": "keep"})
    except PassConfigError as e:
        return f"positions='keep' is refused too: {e}"
    return "use positions='keep'"


def copy_rotary(gm: fx.GraphModule, nodes: list[fx.Node], pos_input: fx.Node, new_pos: fx.Node) -> dict:
    """Copies of the rotary slice computed from new_pos, inserted at the current insertion point:
    {original node: copy}."""
    env = {pos_input: new_pos}
    for n in nodes:
        env[n] = gm.graph.node_copy(n, lambda a: env.get(a, a))
        env[n].meta["rotary_of"] = n       # a later renumbering replaces copies like their original
    return env


def compact_positions(attention_mask, seq_index, key_valid=None):
    """(B, S') positions of the current tokens renumbered 0..n-1 over the real (and valid) ones, as
    Hugging Face numbers a left-padded prompt (padding: 0)."""
    real = attention_mask.gather(1, seq_index).bool()
    if key_valid is not None:
        real = real & key_valid
    pos = real.long().cumsum(-1) - 1
    return pos.masked_fill(~real, 0)


def renumber(gm: fx.GraphModule, anat: Anatomy, anchor: fx.Node, layer: int, seq_index: fx.Node,
             key_valid: fx.Node | None, replaced: dict) -> None:
    """Layers >= `layer` see compact positions: the rotary values they read (already gathered to the
    kept tokens by the reroute) are replaced by the slice recomputed on the renumbered positions."""
    g = gm.graph
    pos_input = anat.inputs["position_ids"]
    reductions = set(replaced.values())     # at layer 0 they sit before the first layer too: not rotary values
    nodes = [n for n in rotary_slice(gm, anat) if n not in reductions]
    with g.inserting_before(anchor):
        new_pos = g.call_function(compact_positions, (anat.inputs["attention_mask"], seq_index, key_valid))
        env = copy_rotary(gm, nodes, pos_input, new_pos)
    for orig, reduced in replaced.items():
        orig = orig.meta.get("rotary_of", orig)
        if reduced is not None and orig in env:
            reduced.replace_all_uses_with(env[orig])
            g.erase_node(reduced)
    gm.meta["graphprune_decode_positions"] = "cache_length"


def per_layer_rotary(gm: fx.GraphModule, anat: Anatomy) -> fx.GraphModule:
    """Decode graph taking LAYER_POSITIONS (layers, B, 1): layer i's rotary values come from row i."""
    g = gm.graph
    pos_input = anat.inputs["position_ids"]
    nodes = rotary_slice(gm, anat)
    with g.inserting_after(pos_input):
        rows = g.placeholder(LAYER_POSITIONS)
    slice_set = set(nodes)
    for layer in anat.layers:
        users = [n for n in layer.nodes if any(a in slice_set or a is pos_input for a in n.all_input_nodes)]
        if not users:
            continue
        with g.inserting_before(layer.first):
            row = g.call_function(operator.getitem, (rows, layer.index))
            env = copy_rotary(gm, nodes, pos_input, row)
        for u in users:
            for a in list(u.all_input_nodes):
                if a in env:
                    u.replace_input_with(a, env[a])
    gm.recompile()
    return gm


def layer_lengths(cache) -> torch.Tensor:
    """(layers, B, 1) real tokens each layer's cache holds: the position its next token takes when
    every layer continues its own numbering (MustDrop's decode rule)."""
    return torch.stack([c.mask.sum(1, keepdim=True).long() for c in cache])
