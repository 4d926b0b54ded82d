"""Cost accountant: matmul FLOPs per layer, counted from the graph's own nodes.

An fx Interpreter runs the (rewritten) graph under FakeTensorMode, so no real compute happens
and full-size models built on the meta device work too. Every linear / matmul / bmm / SDPA
node adds 2 FLOPs per multiply-add, attributed to the layer in its nn_module_stack
("head" for the lm_head / projector, "other" for the rest). Token-op nodes (scoring,
selection) are not counted: their matmuls cover a few query rows (nq x S), not S x S.

Attention counts the score entries a kernel computes (QK^T and PV alike): causal attention
(anatomy.read.attends_causally: a prefill's captured causal mask or kept tokens of it, or
is_causal) the entries at or below the diagonal, S(S+1)/2 per head for a prefill of S tokens, as
the mask-free causal kernel (graphprune.lower.causal) and flash kernels skip the blocks above it;
attention whose mask is not causal (a bidirectional attention group, a pass's static-capacity key
mask, a vision encoder) the full S x S square, which a masked kernel computes.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import fx
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

from graphprune.anatomy.read import SDPA, attends_causally, layer_of, module_path

aten = torch.ops.aten


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


def node_flops(target, args, kwargs, out, causal: bool = False) -> int:
    """FLOPs of one node's call; causal: an SDPA node attends causally (see the module docstring)."""
    if target == aten.linear.default:
        x, w = args[0], args[1]
        return 2 * _numel(x.shape[:-1]) * w.shape[0] * w.shape[1]
    if target in (aten.mm.default, aten.bmm.default, aten.matmul.default, torch.matmul):
        a = args[0]
        return 2 * _numel(out.shape) * a.shape[-1]
    if target == aten.addmm.default:
        return 2 * _numel(out.shape) * args[1].shape[-1]
    if target == SDPA:
        q, k = args[0], args[1]
        sq, sk, d = q.shape[-2], k.shape[-2], q.shape[-1]
        # causal: query i (of the last sq) attends to the keys up to its own position sk - sq + i
        scores = sq * (sk - sq) + sq * (sq + 1) // 2 if causal and sq <= sk else sq * sk
        return 2 * 2 * _numel(q.shape[:-2]) * scores * d      # QK^T and PV
    if target in (aten.convolution.default, aten.conv2d.default):
        w = args[1]
        return 2 * _numel(out.shape) * _numel(w.shape[1:])
    return 0


class _Counter(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.flops = defaultdict(int)

    def run_node(self, n):
        out = super().run_node(n)
        if n.op != "call_function":
            return out
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        f = node_flops(n.target, args, kwargs, out, n.target == SDPA and attends_causally(n))
        if f:
            layer = layer_of(n)
            path = module_path(n)
            key = layer if layer is not None else ("head" if ("head" in path or "projector" in path) else "other")
            self.flops[key] += f
        return out


def run_fake(gm: fx.GraphModule, **inputs) -> tuple[dict, tuple]:
    """(FLOPs per layer, fake outputs) of one call of gm on inputs given by placeholder name."""
    names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    missing = [k for k in names if k not in inputs]
    if missing:
        raise KeyError(f"graph inputs {missing} were not given")
    try:
        # no autograd: the prompt may hold inference-mode tensors (a report read after an inference_mode call)
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = [mode.from_tensor(inputs[k]) if isinstance(inputs[k], torch.Tensor) else inputs[k] for k in names]
            counter = _Counter(gm)
            outs = counter.run(*fake)
    except (DynamicOutputShapeException, DataDependentOutputException):
        # exact-threshold passes keep a data-dependent number of tokens: count on the real values
        with torch.no_grad():
            counter = _Counter(gm)
            outs = counter.run(*[inputs[k] for k in names])
    return dict(counter.flops), outs if isinstance(outs, (tuple, list)) else (outs,)


def count_flops(gm: fx.GraphModule, **inputs) -> dict:
    """FLOPs per layer of one call of gm on inputs (by placeholder name) of these shapes."""
    return run_fake(gm, **inputs)[0]
