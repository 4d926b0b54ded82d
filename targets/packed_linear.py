"""Linear layers with their weights pre-packed for oneDNN, for graphs that run on the CPU.

Every `aten.linear` of a graph whose weight is a float32 CPU constant becomes
`mkldnn._linear_pointwise` on a copy of that weight reordered once, at lowering time, into
oneDNN's blocked layout (what Inductor's CPU freezing does). Why it matters for pruning: the BLAS
behind `aten.linear` re-packs the whole weight matrix on every call, a cost proportional to the
weight size and not to the token count (1.7 ms for a 1024 x 2816 weight on the 2-core test
machine). At 587 tokens it hides inside the matmul (17.7 vs 15.9 ms packed once); at the 75 tokens
a layer keeps after pruning it is almost half of it (3.9 vs 2.1 ms), so pruned layers ran well
short of their FLOPs-ideal speed. Packed once, a linear's time is close to proportional to its rows.

The graph's other nodes and its outputs are untouched; results match `aten.linear` to float32
rounding. Cost: the packed copies are held beside the model's own weights (the linear layers'
weight memory twice), which is why it is opt-in: `graphprune.prune(..., linear="packed")`. Every
graph lowered from one model shares one packed copy per weight while any of them is alive (a model
pruned several ways, as `graphprune bench` does, holds it once). Weights are packed when a model is
pruned: one whose weights change afterwards (in place or not) must be pruned again.

Graphs handed to Inductor (the torch.compile backend's rewritten prefill, `for_inductor=True`) get
the same packing through an opaque kernel, `graphprune::packed_linear`: Inductor cannot lower
`mkldnn._linear_pointwise` on a pre-packed weight constant, and with dynamic shapes its own freezing
does not pre-pack float32 linears (it wants a static row count), so left to itself it runs them
on the BLAS that re-packs per call (measured on the speed model's FastV prefill, loaded 2-core
machine, medians of 7: aten graph 933 ms, Inductor 1167 ms in an earlier run with aten at 1175,
packed graph 474 ms, packed kernel inside Inductor 460 ms). The backend's other frames (vision
tower, projector, head, decode steps) get the same kernel on the parameters dynamo lifts to frame
inputs (`pack_frame_linears`), as graphprune.prune packs every stage.
"""
from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import torch
from torch import fx
from torch.utils.weak import WeakIdKeyDictionary

_LINEAR = torch.ops.aten.linear.default
# Smaller weights stay on aten: oneDNN's call costs ~15 us more, which a small matmul does not win
# back (measured on the 2-core test machine: a 64 x 192 weight at 75 rows is 25 us on aten, 36 us
# packed; from 256 x 768 on, packed wins at every row count, decode's single row included)
MIN_ELEMENTS = 1 << 17
# weight -> (its version when packed, rows hint, weak reference to the packed copy): the graphs
# hold the packed copies, this only lets them share one
_PACKED = WeakIdKeyDictionary()


def packing_available() -> bool:
    """oneDNN is built into this torch (the x86/ARM CPU wheels have it)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _constant(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, torch.Tensor) else None


def packed_weight(weight: torch.Tensor, rows_hint: int = 128) -> torch.Tensor:
    """weight (out, in) reordered for oneDNN, shared by every graph that asks for the same tensor."""
    held = _PACKED.get(weight)
    packed = held[2]() if held is not None and held[:2] == (weight._version, rows_hint) else None
    if packed is None:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)
        _PACKED[weight] = (weight._version, rows_hint, weakref.ref(packed))
    return packed


@dataclass
class _Twin:
    """The packed copy registered under a key of graphprune::packed_linear. `follows`: the weight
    reaches the kernel as a graph input (a dynamo frame's lifted parameter), which may be another
    tensor on a later call, so the kernel checks each call that it is the one packed (its storage
    and version) and packs the one it is handed otherwise."""
    packed: torch.Tensor
    follows: bool = False
    storage: int = 0
    version: int = 0


# key -> its _Twin; a key lives as long as the graph calling it
_TWINS: dict[int, _Twin] = {}
_KEYS = itertools.count()


@torch.library.custom_op("graphprune::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, key: int) -> torch.Tensor:
    """x @ weight.T + bias on the packed copy of `weight` registered under `key` (the plain weight
    is an argument so that compilers see its shape and keep it alive; read only by a key that
    follows its weight, to tell whether it is still the one packed)."""
    twin = _TWINS[key]
    if twin.follows and (weight.data_ptr() != twin.storage or weight._version != twin.version):
        twin = _TWINS[key] = _follow(weight)
    return torch.ops.mkldnn._linear_pointwise(x, twin.packed, bias, "none", [], "")


def _follow(weight: torch.Tensor) -> _Twin:
    return _Twin(packed_weight(weight), True, weight.data_ptr(), weight._version)


@packed_linear.register_fake
def _(x, weight, bias, key):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def pack_linear_weights(gm: fx.GraphModule, rows_hint: int = 128, for_inductor: bool = False) -> int:
    """Rewrite gm in place: linears with float32 CPU constant weights of at least MIN_ELEMENTS run
    on oneDNN-packed copies (`for_inductor`: through graphprune::packed_linear, which Inductor keeps
    as an opaque kernel).
    Returns how many were rewritten. `rows_hint` is the token count oneDNN tunes the layout for
    (any count runs; measured here it barely matters above a few rows)."""
    packed = 0
    for node in list(gm.graph.find_nodes(op="call_function", target=_LINEAR)):
        weight = _constant(gm, node.args[1])
        bias_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if (weight is None or weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2
                or weight.numel() < MIN_ELEMENTS):
            continue
        if bias_node is not None and _constant(gm, bias_node) is None:
            continue                                 # a computed bias: leave this one to aten
        if for_inductor:
            key = next(_KEYS)
            _TWINS[key] = _Twin(packed_weight(weight, rows_hint))
            weakref.finalize(gm, _TWINS.pop, key, None)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(torch.ops.graphprune.packed_linear.default,
                                             (node.args[0], node.args[1], bias_node, key))
        else:
            name = f"_packed_linear_{packed}"
            gm.register_buffer(name, packed_weight(weight, rows_hint), persistent=False)
            with gm.graph.inserting_before(node):
                w = gm.graph.get_attr(name)
                new = gm.graph.call_function(torch.ops.mkldnn._linear_pointwise.default,
                                             (node.args[0], w, bias_node, "none", [], ""))
        new.meta.update(node.meta)
        plain = node.args[1]
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        if not plain.users:                          # the plain weight is no longer read
            gm.graph.erase_node(plain)
        packed += 1
    if packed:
        gm.recompile()
    return packed


def _packable(weight) -> bool:
    return (isinstance(weight, torch.Tensor) and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and weight.dim() == 2 and weight.numel() >= MIN_ELEMENTS)


def pack_frame_linears(gm: fx.GraphModule, example_inputs) -> int:
    """Rewrite a dynamo frame's graph in place (the torch.compile backend's vision, projector, head
    and decode frames, with linear="packed"): F.linear calls whose weight is a frame input holding
    a float32 CPU parameter of at least MIN_ELEMENTS run graphprune::packed_linear on a packed copy.
    Dynamo lifts parameters to frame inputs and reuses a frame for every module of the same class
    without guarding on which, and weights may change in place: the kernel follows the weight it is
    handed (_Twin.follows). Returns how many were rewritten."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    packed = 0
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear]:
        args = dict(zip(("input", "weight", "bias"), node.args), **node.kwargs)
        weight, bias = args.get("weight"), args.get("bias")
        if not isinstance(weight, fx.Node) or weight.op != "placeholder":
            continue
        value = example_inputs[placeholders.index(weight)]
        if not isinstance(value, torch.nn.Parameter) or not _packable(value):
            continue
        key = next(_KEYS)
        _TWINS[key] = _follow(value)
        weakref.finalize(gm, _TWINS.pop, key, None)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.graphprune.packed_linear.default,
                                         (args["input"], weight, bias, key))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        packed += 1
    if packed:
        gm.recompile()
    return packed
