"""Elementwise ops of a lowered prefill written into an operand nothing else reads.

A captured graph is functional: every op allocates its output. An MLP's activation and product are
each as large as its projections' outputs (S x intermediate floats: 35 MB on the video-length
Qwen2.5-VL prompt, above glibc's mmap threshold even as `graphprune bench` sets it), so each is a
fresh mapping that page-faults on first touch, call after call; the gate projection's output is dead
as soon as the activation has read it, the activation's once the product has. `write_in_place(gm)`
has such an op write into that operand instead (silu_, gelu_, mul_, add_): the operand was
allocated by an op of the graph (a linear, an activation, a product or sum: never an input, a
weight, a view or another alias), the op is its only reader, and the output has its shape and dtype.

Transformers runs the same ops out of place; this lowering is how graphprune's unpruned prefill gets
ahead of it rather than level (issue 19). Prefill graphs run under no_grad (PrunedModel.forward).
"""
from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten
IN_PLACE = {aten.silu.default: aten.silu_.default, aten.gelu.default: aten.gelu_.default,
            aten.mul.Tensor: aten.mul_.Tensor, aten.add.Tensor: aten.add_.Tensor}
# ops whose output is a tensor of its own (not a view or alias of an operand); mkldnn's: packed linears
ALLOCATING = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.bmm.default,
              torch.ops.mkldnn._linear_pointwise.default, *IN_PLACE}


def write_in_place(gm: fx.GraphModule) -> int:
    """Rewrite gm in place: each elementwise op of IN_PLACE whose first operand it may overwrite
    (module docstring) runs in place on it. Returns how many."""
    fresh = set()                        # nodes whose output is a buffer of their own (or, in place, of a fresh operand)
    n = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in ALLOCATING:
            fresh.add(node)
        if node.target in IN_PLACE and _may_overwrite(node, fresh):
            node.target = IN_PLACE[node.target]
            n += 1
    if n:
        gm.recompile()
    return n


def _may_overwrite(node: fx.Node, fresh: set) -> bool:
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node) or first not in fresh or len(first.users) != 1:
        return False
    have, want = first.meta.get("val"), node.meta.get("val")
    return (isinstance(have, torch.Tensor) and isinstance(want, torch.Tensor) and have.dtype == want.dtype
            and [str(d) for d in have.shape] == [str(d) for d in want.shape])
