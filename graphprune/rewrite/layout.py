"""The token layout of a stage graph: which tokens exist after each selection, and where.

A TokenState per layer boundary holds graph nodes: the vision tokens' positions per image, the
original index of every token, and (for static-capacity and key-set rules) validity and
protection masks. Layout inputs (vision_pos, text_index, ...) are placeholders the runtime fills.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from graphprune import tokenops
from graphprune.anatomy.read import Anatomy


@dataclass
class TokenState:
    """Graph nodes describing the token sequence from `layer` on.

    coords: "sequence" (prefill), "encoder" (vision encoder layers: CLS first, then patches) or
    "features" (the patch features around the projector). seq_index holds, for every current
    token, its original index: prompt index (prefill) or patch index (vision; CLS = -1).
    """
    layer: int
    vision_pos: fx.Node          # (B, images, tokens) positions of vision tokens in the current sequence
    seq_index: fx.Node           # (B, S) original index of every current token
    coords: str = "sequence"
    valid: fx.Node | None = None      # (B, images, tokens) bool, None: all valid
    protected: fx.Node | None = None  # (B, images, tokens) bool, None: none protected
    generation: int = 0               # bumped by every rule that changes which tokens exist
    masked: bool = False              # some slots may be invalid (static capacity): later attention masks them
    key_valid: fx.Node | None = None  # (B, S) False at invalid slots, when masked
    rewritten: int = 0                # generation of the last rule that merged or reordered tokens (0: none)
    sizes: fx.Node | None = None      # (B, images, tokens) float: original tokens each one stands for (None: 1)
    stream: fx.Node | None = None     # the residual stream entering `layer` after the selection there (a second
                                      # selection at the same layer reduces it)


def output_names(gm: fx.GraphModule) -> list[str]:
    return gm.meta.setdefault("graphprune_outputs", [])


def add_output(gm: fx.GraphModule, node: fx.Node, name: str) -> None:
    out = gm.graph.find_nodes(op="output")[0]
    out.args = (tuple(out.args[0]) + (node,),)
    output_names(gm).append(name)


def layout_input(gm: fx.GraphModule, anat: Anatomy, name: str) -> fx.Node:
    """A layout input of the graph (vision_pos, text_index, ...), added on first use; the runtime fills it."""
    if name not in anat.inputs:
        last = list(gm.graph.find_nodes(op="placeholder"))[-1]
        with gm.graph.inserting_after(last):
            anat.inputs[name] = gm.graph.placeholder(name)
    return anat.inputs[name]


def init_tokens(gm: fx.GraphModule, anat: Anatomy) -> None:
    """Give the graph its token layout: the nodes passes read vision positions from."""
    if anat.tokens:
        return
    g = gm.graph
    if anat.stage == "vision":
        with g.inserting_before(anat.layers[0].first):
            vp = g.call_function(patch_positions, (anat.inputs["pixel_values"], anat.grid[0] * anat.grid[1],
                                                   int(bool(anat.has_cls))))
            si = g.call_function(encoder_index, (vp, int(bool(anat.has_cls))))
        anat.tokens.append(TokenState(0, vp, si, "encoder"))
    else:
        vp = layout_input(gm, anat, "vision_pos")
        prot = layout_input(gm, anat, "vision_protected")
        with g.inserting_before(anat.layers[0].first):
            si = g.call_function(tokenops.seq_positions, (anat.inputs["attention_mask"],))
        anat.tokens.append(TokenState(0, vp, si, protected=prot))


def patch_positions(pixel_values, v: int, offset: int):
    """(images, 1, tokens) positions of the patch tokens of each image in the encoder sequence."""
    return (torch.arange(v, device=pixel_values.device) + offset).expand(pixel_values.shape[0], 1, v)


def encoder_index(vision_pos, offset: int):
    """(images, offset + tokens) original patch index of each encoder token (CLS: -1)."""
    n, v = vision_pos.shape[0], vision_pos.shape[2]
    return torch.arange(-offset, v, device=vision_pos.device).expand(n, v + offset)


def _flatten_positions(vision_pos):
    return vision_pos[:, 0, :]


def _to_features(vision_pos, seq_index, offset: int):
    # encoder coordinates -> feature coordinates: the projector sees the patches without CLS
    return vision_pos - offset, seq_index[:, offset:]


def state_at(anat: Anatomy, layer: int) -> TokenState:
    return [t for t in anat.tokens if t.layer <= layer][-1]
