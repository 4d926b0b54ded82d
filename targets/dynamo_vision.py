"""The vision tower's frame, run without the encoder layers the model's own code never reads.

A LLaVA-style model reads its image features from `hidden_states[vision_feature_layer]` (LLaVA-1.5:
the second to last CLIP layer), yet the tower's frame dynamo hands the backend also returns
`last_hidden_state` and `pooler_output`: transformers' output capturing breaks the graph as the tower
is called, so the frame ends at the tower's return and those outputs stay live (LLaVA hands them back
to the caller as `out.image_outputs`). Run as captured, the frame computes the layers past the feature
layer that graphprune's eager lowering drops (its captured vision stage returns the features only).

The frame is split here at those layers: the head (everything the read hidden states need) is compiled
and runs; the tail (the later layers and what only they feed) runs on first use of one of its outputs.
Those outputs come back as DeferredTensor: a tensor of the right shape, dtype and device whose every
use (an op, a method, printing) first computes the tail once, under the grad mode the frame ran in.
With grad enabled and an input requiring grad the tail runs at once (autograd needs real tensors).
Which layers the model's own code reads is the family's knowledge (Family.vision_tower_read).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import fx
from torch.utils import _pytree as pytree

from graphprune.anatomy.read import layer_of, module_path


class DeferredTensor(torch.Tensor):
    """One output of a frame's tail, computed (with the tail's other outputs) on first use."""

    @staticmethod
    def __new__(cls, like: torch.Tensor, tail: "_TailRun", index: int):
        out = torch.Tensor._make_wrapper_subclass(cls, like.shape, strides=like.stride(), dtype=like.dtype,
                                                  device=like.device, requires_grad=False)
        out._tail, out._index = tail, index
        return out

    def value(self) -> torch.Tensor:
        return self._tail.values()[self._index]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # every use goes through here (ops, Tensor methods such as numpy() or tolist(), repr): the real
        # tensor stands in, so the result is a plain tensor; what the wrapper knows (shape, dtype,
        # device) is read without computing it
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        args, kwargs = pytree.tree_map_only(DeferredTensor, DeferredTensor.value, (args, kwargs or {}))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        args, kwargs = pytree.tree_map_only(DeferredTensor, DeferredTensor.value, (args, kwargs or {}))
        return func(*args, **kwargs)


_METADATA = {torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,
             torch.Tensor.ndim.__get__, torch.Tensor.layout.__get__, torch.Tensor.requires_grad.__get__,
             torch.Tensor.size, torch.Tensor.dim, torch.Tensor.stride, torch.Tensor.numel}


class _TailRun:
    """The tail of one frame call: its inputs, held until the first use runs it."""

    def __init__(self, tail: fx.GraphModule, inputs: list, inference: bool):
        self.tail, self.inputs, self.inference, self.outputs = tail, inputs, inference, None

    def values(self) -> tuple:
        if self.outputs is None:
            with torch.inference_mode() if self.inference else torch.no_grad():
                self.outputs = tuple(self.tail(*self.inputs))
            self.inputs = None                   # the boundary activations are no longer needed
        return self.outputs


@dataclass
class DeferringFrame:
    """The frame's head (compiled) run now, its tail deferred (see the module docstring)."""
    head: object
    tail: fx.GraphModule
    kept_at: list[int]              # frame output positions the head returns (first, in order)
    deferred_at: list[int]          # frame output positions the tail returns
    tail_inputs: list[tuple[str, int]]   # ("arg", frame input i) or ("head", head output j)
    shapes: dict

    def __call__(self, *args):
        got = self.head(*args)
        inputs = [args[i] if where == "arg" else got[i] for where, i in self.tail_inputs]
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
            late = tuple(self.tail(*inputs))
        else:
            run = _TailRun(self.tail, inputs, torch.is_inference_mode_enabled())
            late = tuple(DeferredTensor(like, run, j) for j, like in enumerate(self._shapes(inputs)))
        outputs = [None] * (len(self.kept_at) + len(self.deferred_at))
        for position, value in zip(self.kept_at, got):
            outputs[position] = value
        for position, value in zip(self.deferred_at, late):
            outputs[position] = value
        return tuple(outputs)

    def _shapes(self, inputs) -> tuple:
        """The tail's outputs as fake tensors (shape, strides, dtype, device), once per input shapes."""
        key = tuple((tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else t for t in inputs)
        if key not in self.shapes:
            from torch._subclasses.fake_tensor import FakeTensorMode
            with FakeTensorMode() as mode:
                fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs]
                self.shapes[key] = tuple(self.tail(*fake))
        return self.shapes[key]


def deferring_frame(gm: fx.GraphModule, compile_head, ancestors) -> DeferringFrame | None:
    """The frame split at the vision encoder layers the model's own code does not read, when it runs a
    vision tower whose family knows them (None: run the frame as captured).
    compile_head(gm): the frame's compiler, applied to the head; ancestors(node, through=True): a node
    and every node it is computed from (targets/dynamo.py's, handed in: this module does not import it)."""
    def upstream(node):
        return ancestors(node, through=True)

    tower = _tower_read()
    if tower is None:
        return None
    within, read = tower
    outputs = list(gm.graph.find_nodes(op="output")[0].args[0])
    depth = [_depth(upstream(o), within) if isinstance(o, fx.Node) else -1 for o in outputs]
    deferred_at = [i for i, d in enumerate(depth) if d >= read]
    kept_at = [i for i in range(len(outputs)) if i not in deferred_at]
    # the call reads what the family says (the frame returns the feature layer's output, or features
    # made from it): a vision_feature_layer given to this call reads another layer, maybe a deferred one
    if not deferred_at or read - 1 not in (depth[i] for i in kept_at):
        return None
    early = set().union(*(upstream(outputs[i]) for i in kept_at if isinstance(outputs[i], fx.Node)))
    late = {n for i in deferred_at for n in upstream(outputs[i]) if n not in early and n.op != "placeholder"}
    if any(module_path(n) and not module_path(n).startswith(within) for n in late):
        return None              # the later layers feed more than the tower's outputs (a projector): read
    crossing = [n for n in gm.graph.nodes if n not in late and any(u in late for u in n.users)]
    handed = [n for n in crossing if n.op != "placeholder"]
    placeholders = list(gm.graph.find_nodes(op="placeholder"))

    head, copied = fx.Graph(), {}
    head.graph_copy(gm.graph, copied)
    head.output(tuple(copied[o] if isinstance(o, fx.Node) else o for o in [outputs[i] for i in kept_at] + handed))
    head.eliminate_dead_code()
    tail, env = fx.Graph(), {}
    for n in crossing:
        env[n] = tail.placeholder(n.name)
    for n in gm.graph.nodes:
        if n in late:
            env[n] = tail.node_copy(n, lambda a: env[a])
    tail.output(tuple(env[outputs[i]] for i in deferred_at))
    tail_inputs = [("arg", placeholders.index(n)) if n.op == "placeholder" else ("head", len(kept_at) + handed.index(n))
                   for n in crossing]
    return DeferringFrame(compile_head(fx.GraphModule(gm, head)), fx.GraphModule(gm, tail), kept_at, deferred_at,
                          tail_inputs, {})


def _depth(upstream: set, within: str) -> int:
    """The last encoder layer of the tower at module path `within` that the nodes `upstream` (an output
    and what it is computed from) pass through (-1: none)."""
    return max((layer_of(n) for n in upstream
                if n.op != "placeholder" and layer_of(n) is not None and module_path(n).startswith(within)), default=-1)


def _tower_read() -> tuple[str, int] | None:
    """(the vision tower's module path in the frame dynamo is tracing, how many of its encoder layers the
    model's own code reads); None when the frame runs no vision tower of a model whose family knows
    (Family.vision_tower_read). The frame's module is the model's body (the frame holds the tower
    call), the tower or a part of it (a graph break at the tower's call: transformers' output
    capturing); the model is then the nearest caller on the Python stack of a family graphprune reads:
    dynamo compiles a frame as it is called, so its callers are running below the backend."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    from graphprune.errors import UnsupportedModelError
    from graphprune.families import family_of
    tx = InstructionTranslator.current_tx()
    owner = tx.f_locals.get("self") if tx is not None else None
    if not isinstance(owner, torch.nn.Module):
        return None
    frame = sys._getframe(1)
    for model in _callers(owner, frame):
        try:
            found = family_of(model).vision_tower_read()
        except UnsupportedModelError:
            continue
        if found is None:
            return None
        tower, read = found
        if any(m is owner for m in tower.modules()):
            return "L['self']", read
        named = [name for name, m in owner.named_modules() if m is tower]
        return (f"L['self'].{named[0]}.", read) if named else None
    return None


def _callers(owner: torch.nn.Module, frame):
    """The frame's module, then each module on the Python stack that holds it, nearest first."""
    yield owner
    seen = {id(owner)}
    while frame is not None:
        caller = frame.f_locals.get("self")
        if isinstance(caller, torch.nn.Module) and id(caller) not in seen and any(m is owner for m in caller.modules()):
            seen.add(id(caller))
            yield caller
        frame = frame.f_back
