"""Lint for graphs that must keep static shapes (CUDA graphs, reduce-overhead, static ONNX).

check_static(gm, inputs): an fx graph; check_static_onnx(path): exported ONNX files.

A rewritten graph calls Python functions (token ops, pass functions) whose insides an fx graph
does not show, so the lint first re-traces the graph to ATen with torch.export on example inputs,
then rejects what breaks static capture: data-dependent ops (nonzero, .item(), masked_select,
unique, ...) and any size that is an unbacked symbol (known only after running).
"""
from __future__ import annotations

import json
import os

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from graphprune.errors import GraphVerificationError, InputError

from .manifest import MANIFEST, Manifest

DATA_DEPENDENT = {
    torch.ops.aten.nonzero.default, torch.ops.aten.nonzero_static.default, torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.masked_select.default, torch.ops.aten.unique_dim.default, torch.ops.aten._unique2.default,
    torch.ops.aten.unique_consecutive.default, torch.ops.aten.repeat_interleave.Tensor,
}


class _Positional(torch.nn.Module):
    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, *args):
        return self.gm(*args)


def aten_graph(gm: fx.GraphModule, inputs: dict) -> fx.Graph:
    """The graph re-traced to ATen ops on example inputs given by placeholder name."""
    names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    args = tuple(inputs[n] for n in names)
    try:
        ep = torch.export.export(_Positional(gm), args, strict=False)
    except Exception as e:  # data-dependent control flow fails here already
        raise GraphVerificationError(f"graph is not statically traceable: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0]}") from e
    return ep.graph


def check_static(gm: fx.GraphModule, inputs: dict, what: str = "graph") -> None:
    """Raise GraphVerificationError if gm has data-dependent ops or unbacked sizes."""
    bad = []
    for n in aten_graph(gm, inputs).nodes:
        if n.op == "call_function" and n.target in DATA_DEPENDENT:
            bad.append(f"{n.name} ({n.target})")
            continue
        val = n.meta.get("val")
        vals = val if isinstance(val, (tuple, list)) else [val]
        if any(isinstance(v, torch.Tensor) and free_unbacked_symbols(v.shape) for v in vals):
            bad.append(f"{n.name} (data-dependent shape)")
    if bad:
        raise GraphVerificationError(f"{what} is marked CUDA-graph safe but has data-dependent ops: {', '.join(bad[:8])}"
                                     f"{' ...' if len(bad) > 8 else ''}; use static (fixed-capacity) modes")


# -- ONNX ------------------------------------------------------------------------------------------

FORBIDDEN_OPS = ("NonZero", "If", "Loop", "Scan")


def _nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _nodes(attr.g)
            for sub in attr.graphs:
                yield from _nodes(sub)


def check_static_onnx(path) -> list[str]:
    """Check exported files for ops that break static shapes, CUDA graphs or ORT's CUDA TopK:
    NonZero, If, Loop, Scan, and TopK without sorted=1. `path`: an export directory, or one .onnx
    file (its directory's manifest, when present, says whether the export is static; a non-static
    export is not checked). Returns the files checked; raises GraphVerificationError listing the
    offending nodes."""
    import onnx

    path = os.fspath(path)
    if os.path.isdir(path):
        manifest = Manifest.load(path)
        files = [manifest.path(s) for s in manifest["stages"]]
    else:
        files = [path]
        mpath = os.path.join(os.path.dirname(os.path.abspath(path)), MANIFEST)
        manifest = None
        if os.path.isfile(mpath):           # only its "static" flag is read for a single file
            try:
                with open(mpath) as f:
                    manifest = json.load(f)
            except ValueError as e:
                raise InputError(f"{mpath}: not valid JSON ({e})") from None
            if not isinstance(manifest, dict):
                raise InputError(f"{mpath}: a JSON object was expected")
    if manifest is not None and not manifest.get("static", True):
        return []
    problems = []
    for file in files:
        try:
            model = onnx.load(file, load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends: a corrupt file
            raise InputError(f"{file}: not a readable ONNX model ({type(e).__name__}: {e})") from None
        graphs = [model.graph] + [f for f in model.functions]
        for gr in graphs:
            for node in _nodes(gr):
                if node.op_type in FORBIDDEN_OPS:
                    problems.append(f"{os.path.basename(file)}: {node.op_type} node {node.name!r}")
                elif node.op_type == "TopK":
                    sorted_attr = next((a.i for a in node.attribute if a.name == "sorted"), 1)
                    if sorted_attr != 1:
                        problems.append(f"{os.path.basename(file)}: TopK node {node.name!r} with sorted=0")
    if problems:
        raise GraphVerificationError("the export is marked static but has data-dependent or unsorted ops "
                                     "(no NonZero/If/Loop/Scan, TopK sorted=1 needed): " + "; ".join(problems))
    return files
