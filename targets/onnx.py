"""ONNX export of a pruned model: three graphs, the embedding matrix and a manifest.

    from graphprune.targets.onnx import export_onnx
    manifest = export_onnx(pruned, "out/fastv")          # gp.prune(model, "fastv", layer=2, keep=64)

writes into `out/fastv/`:

    vision.onnx       pixel_values -> projected features (+ what a vision-stage pass kept:
                      patches_kept / patches_valid / patches_protected), selection nodes inside
    prefill.onnx      the rewritten prefill graph, selection nodes inside: inputs by the graph's
                      placeholder names (inputs_embeds, position_ids, attention_mask, vision_pos,
                      text_index, text_mask, vision_protected, ...; an input that is None for this
                      pipeline is specialised away), outputs by the graph's output names (logits,
                      k_<l>, v_<l>, tokens_from_layer_<l>, ...)
    decode.onnx       one decode step over per-layer caches of different lengths (shrink_kv):
                      inputs_embeds, position_ids, past_k_<l>, past_v_<l> (B, H_kv, len_l, d),
                      kv_mask_<l> (B, len_l + 1); outputs logits, k_<l>, v_<l> (caches + new token)
    embed_tokens.npy  the token-embedding matrix (vocab, hidden): the embedding lookup (a row
                      gather) stays on the host, as in graphprune's runtime
    manifest.json     inputs/outputs of each graph (dtype, shape with named dynamic axes), the
                      pipeline and its budgets, per-layer KV lengths of the reference prompt,
                      opset and versions, and the host-side facts a runner needs (image / video
                      token ids, vision positions mode, eos/pad ids); for an anyres export its
                      "image_bucket" (image_size [H, W], pixel_values [1, crops, C, H, W],
                      features_per_image, newline_slots, packing) or "video_bucket" (pixel_values_videos
                      [1, frames, C, H, W], features_per_video, closing_newlines), for Qwen
                      "host_vision" (no vision.onnx) and "grid_bucket"

LLaVA-NeXT and LLaVA-OneVision (anyres: the crop count, grid and unpadding follow the image size)
export one shape bucket per export, the packing of the example's image size (its crop grid and
unpadded patch grid, as the eager vision stage buckets them): vision.onnx is the model's own
get_image_features for one image of that size (pixel_values (1, crops, C, H, W) -> its placeholder
rows (tokens, D), image_newline rows included), run once per image; the manifest's "image_bucket"
states the size, the pixel shape, the rows per image, which of them are newlines and the packing
with what computes it, and the runner takes images of any size packed alike and refuses others
naming the bucket. An example of videos only (OneVision)
exports a video bucket instead: vision.onnx is get_video_features for one video of the example's
shape (pixel_values_videos (1, frames, C, H, W)), the manifest's "video_bucket" states it; an
export holds images or videos, not both.

Qwen2-VL / Qwen2.5-VL export prefill.onnx and decode.onnx with (3, batch, seq) M-RoPE position_ids
(decode: (3, batch, 1), the rope delta + step the host computes); their vision encoder and
get_rope_index run on the host in torch, so the runner takes the model (`OrtPrunedModel(out,
model=model)`). Their shape bucket is the example's patch grids: the manifest's "grid_bucket"
states the vision units per sample and tokens per unit the prefill takes, and the runner refuses
other grids naming it. An unpruned model (empty pipeline) exports too: the captured graphs as they are.

The host side (where the vision tokens are, text layout, compacting after a vision-stage
selection, merging image features into the embeddings) is graphprune.lower.runtime's, run by
`graphprune.targets.ort.OrtPrunedModel` around ONNX Runtime sessions.

Only static-shape pipelines export: every budget is a fixed count, so the graphs hold TopK /
Gather / Scatter with static k and no data-dependent shapes (`check_static_onnx` checks the
files: no NonZero, If, Loop, Scan; TopK sorted). `mode="exact"` passes are refused.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import secrets
import shutil
import signal
import threading
import warnings
from typing import Any

import torch
from torch import fx

from graphprune.errors import GraphpruneError, InputError, PassConfigError, UnsupportedModelError
from graphprune.families.llava_next import LlavaNextFamily
from graphprune.families.qwen2_vl import Qwen2VLFamily

from .lint import check_static_onnx
from .manifest import EMBED_FILE, FORMAT, HOST_VISION_NOTE, MANIFEST, STAGE_FILES, Manifest


class ExportError(GraphpruneError):
    """torch.onnx could not convert a stage graph (the message names the stage and the cause)."""


# the custom translations below are written against ONNX opset 18; torch.onnx converts upwards
MIN_OPSET = 18


def max_opset() -> int:
    from torch.onnx._constants import ONNX_MAX_OPSET
    return ONNX_MAX_OPSET


def check_opset(opset) -> None:
    """Refuse an opset torch.onnx cannot export these graphs to (None: torch.onnx's default)."""
    if opset is None:
        return
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset():
        raise InputError(f"opset {opset!r}: supported ONNX opsets are {MIN_OPSET}..{max_opset()} "
                         "(or leave it unset for torch.onnx's default)")


# -- checks made before anything is written ----------------------------------------------------

def vision_bucket_family(pruned) -> bool:
    """Whether the vision stage exports per shape bucket: an anyres family (LLaVA-NeXT, OneVision)
    whose vision encoder runs eagerly, its crop count and packing depending on the image size."""
    return pruned.program.stages["vision"].gm is None and isinstance(pruned.family, LlavaNextFamily)


def host_vision(pruned) -> bool:
    """Whether the vision encoder and the M-RoPE positions stay on the host, in torch (Qwen2-VL,
    Qwen2.5-VL: a data-dependent patch grid per image, positions from the model's get_rope_index):
    only prefill.onnx and decode.onnx are written, and the runner needs the model."""
    return pruned.program.stages["vision"].gm is None and isinstance(pruned.family, Qwen2VLFamily)


def _check_exportable(pruned, out_dir: str, overwrite: bool) -> None:
    for p in pruned.pipeline:
        if getattr(getattr(p, "config", None), "mode", None) == "exact":
            raise PassConfigError(f"{p!r}: mode='exact' keeps a data-dependent number of tokens, which ONNX "
                                  "cannot export with static shapes; use mode='static' (a fixed capacity per image)")
    for r in pruned.results:
        infos = r.info.get("plans", [r.info])
        if any(i.get("keep") == "data-dependent" for i in infos):
            raise PassConfigError(f"{r.info.get('pass')}: keeps a data-dependent number of tokens; "
                                  "use mode='static' to export")
    if isinstance(pruned.family, Qwen2VLFamily) and pruned.family.deepstack_layers():
        raise UnsupportedModelError(pruned.family.model_class, "ONNX export of its DeepStack features",
                                    "(added at the first LM layers); Qwen2-VL and Qwen2.5-VL export")
    if pruned.family.attention_groups_input:
        raise UnsupportedModelError(pruned.family.model_class, "ONNX export",
                                    "its prefill takes bidirectional attention groups (token_type_ids: Gemma 3's "
                                    "image blocks, PaliGemma's prefix), which no exported graph carries yet (its "
                                    "sequence length specialises there); use graphprune.prune(model, ...) in torch")
    host = host_vision(pruned)
    if pruned.program.vision_passes:         # (LLaVA-NeXT / OneVision: vision.onnx is the model's own encoding)
        kept = "keeps on the host in torch" if host else "writes as the model's own encoding of one shape bucket"
        raise PassConfigError(f"{', '.join(map(repr, pruned.program.vision_passes))}: runs in "
                              f"{pruned.family.model_class}'s vision encoder (captured per shape bucket), which an ONNX "
                              f"export {kept}, unpruned; export an LLM-stage pipeline (e.g. fastv)")
    missing = [k for k in ("vision", "prefill", "decode") if pruned.program.stages.get(k) is None
               or (pruned.program.stages[k].gm is None and not (k == "vision" and (vision_bucket_family(pruned)
                                                                                   or host)))]
    if "decode" in missing:
        missing.remove("decode")
    if missing or getattr(pruned, "decode_gm", None) is None:
        why = "; ".join(pruned.program.stages[k].eager or "not captured" for k in missing
                        if pruned.program.stages.get(k) is not None) or "not captured"
        raise UnsupportedModelError(pruned.family.model_class, f"captured {', '.join(missing or ['decode'])} stage",
                                    f"ONNX export needs the vision, prefill and decode graphs ({why})")
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise InputError(f"{out_dir} exists and is not a directory")
        if os.listdir(out_dir) and not overwrite:
            raise InputError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")


# -- graph preparation --------------------------------------------------------------------------

def _copy_gm(gm: fx.GraphModule) -> fx.GraphModule:
    out = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    out.meta.update(copy.deepcopy(gm.meta))
    _plain_tensors(out)
    return out


def _plain_tensors(gm: fx.GraphModule) -> None:
    """Replace inference tensors (weights and constants of a model pruned under
    torch.inference_mode()) by normal copies: torch.export, which torch.onnx runs, cannot trace them."""
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()) + [
            (n.target, getattr(gm, n.target, None)) for n in gm.graph.find_nodes(op="get_attr")]:
        if isinstance(t, torch.Tensor) and t.is_inference():
            owner_path, _, leaf = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            plain = t.clone()
            if isinstance(t, torch.nn.Parameter):
                plain = torch.nn.Parameter(plain, requires_grad=False)
            if leaf in owner._parameters:
                owner._parameters[leaf] = plain
            elif leaf in owner._buffers:
                owner._buffers[leaf] = plain
            else:
                setattr(owner, leaf, plain)


def _prepare(gm: fx.GraphModule, inputs: dict, rename: dict | None = None):
    """A copy of `gm` with None-valued inputs specialised away and only tensor outputs, each name
    once (a later output of the same name wins, as in the runtime). Returns (gm, graph_inputs,
    onnx_inputs, args, graph_output_names, example outputs)."""
    gm = _copy_gm(gm)
    g = gm.graph
    names = [n.name for n in g.find_nodes(op="placeholder")]
    unknown = [n for n in names if n not in inputs]
    if unknown:
        raise ExportError(f"no example value for graph input(s) {unknown}")
    dropped = []
    for n in list(g.find_nodes(op="placeholder")):
        if inputs[n.name] is None:
            for u in list(n.users):
                u.args = fx.node.map_arg(u.args, lambda a, n=n: None if a is n else a)
                u.kwargs = fx.node.map_arg(u.kwargs, lambda a, n=n: None if a is n else a)
            g.erase_node(n)
            dropped.append(n.name)
    gm.recompile()
    kept = [n for n in names if n not in dropped]
    args = tuple(inputs[n] for n in kept)
    with torch.no_grad():
        outs = gm(*args)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    out_names = list(gm.meta["graphprune_outputs"])
    if len(out_names) != len(outs):
        raise ExportError(f"graph returns {len(outs)} values for {len(out_names)} output names")
    last = {name: i for i, name in enumerate(out_names)}
    chosen = [i for i, name in enumerate(out_names) if last[name] == i and isinstance(outs[i], torch.Tensor)]
    out_node = g.find_nodes(op="output")[0]
    values = out_node.args[0]
    values = values if isinstance(values, (tuple, list)) else (values,)
    out_node.args = (tuple(values[i] for i in chosen),)
    g.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
    gm.recompile()
    rename = rename or {}
    return (gm, kept, [rename.get(n, n) for n in kept], args, [out_names[i] for i in chosen],
            {out_names[i]: outs[i] for i in chosen}, dropped)


def _export(stage: str, gm, args, onnx_inputs, onnx_outputs, dynamic_shapes, path, opset, optimize=True):
    kw = {} if opset is None else {"opset_version": opset}
    try:
        # torch.onnx prints its progress and, on a failed strategy, whole tracebacks (to stdout,
        # stderr and its loggers); a failure is reported once, as an ExportError
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(gm, args, dynamo=True, input_names=onnx_inputs, output_names=onnx_outputs,
                                     dynamic_shapes=dynamic_shapes, custom_translation_table=_translations(),
                                     verbose=False, optimize=optimize, **kw)
    except Exception as e:  # noqa: BLE001 - torch.onnx raises many kinds; report the stage and the cause
        raise ExportError(f"{stage}: torch.onnx.export failed: {_summary(e)}") from e
    prog.save(path)
    return prog


@contextlib.contextmanager
def _quiet():
    sink = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _summary(e: Exception) -> str:
    text = str(e)
    for marker in ("Exception summary", "## Exception summary"):
        if marker in text:
            text = text.split(marker, 1)[1]
    lines = [l.strip() for l in text.strip().splitlines() if l.strip() and not l.strip().startswith(("⬆", "("))]
    return f"{type(e).__name__}: " + " ".join(lines[:4])[:800]


def _translations() -> dict:
    """ONNX translations torch.onnx lacks: the stable sort (argsort(stable=True)) the static
    selections use, as TopK over the whole axis (ONNX TopK breaks ties by the lower index, which is
    a stable order); small integer and bool inputs are widened, since ORT's TopK takes no int8.
    Reshapes of empty tensors become Expand (see `empty_like`); searchsorted (token positions after
    a selection) as a compare-and-count."""
    from onnxscript import ir
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops import common as common_ops
    small = {ir.DataType.BOOL, ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16}

    def sort_stable(self, *, stable=None, dim: int = -1, descending: bool = False):
        if len(self.shape) == 0:
            return op.Identity(self), op.Constant(value_int=0)
        x = op.Cast(self, to=ir.DataType.INT32) if self.dtype in small else self
        size = op.Reshape(op.Gather(op.Shape(x), dim, axis=0), op.Constant(value_ints=[1]))
        values, indices = op.TopK(x, size, axis=dim, largest=descending, sorted=True)
        if x is not self:
            values = op.Cast(values, to=self.dtype)
        return values, indices

    def empty(self):
        return self.shape is not None and any(isinstance(d, int) and d == 0 for d in self.shape)

    def empty_like(self, size):
        # torch infers -1 as 0 for an empty tensor; ONNX Reshape rejects -1 when the product is 0
        # (VTW withdraws every vision token: (B, n, 0) selections), and the onnxscript optimizer
        # turns a spelled-out [batch, 0] back into [-1, 0]: build the empty result by Expand
        size = [0 if isinstance(s, int) and s == -1 else s for s in size]
        zero = op.CastLike(op.Constant(value_int=0), self)
        return op.Expand(zero, common_ops.merge_dims(size))

    def reshape(self, shape):
        if empty(self):
            return empty_like(self, shape)
        zero = any(isinstance(s, int) and s == 0 for s in shape)
        return op.Reshape(self, common_ops.merge_dims(shape), allowzero=zero)

    def view(self, size):
        if empty(self):
            return empty_like(self, size)
        return op.Reshape(self, common_ops.merge_dims(size), allowzero=True)

    def searchsorted(sorted_sequence, self, *, out_int32: bool = False, right: bool = False, side=None,
                     sorter=None):
        # count of the row's entries below each value (<= for right/side="right"): a broadcast
        # compare and a sum, O(values x sequence), fine at prompt sizes
        if sorter is not None:
            raise NotImplementedError("searchsorted with a sorter")
        seq = op.Unsqueeze(sorted_sequence, op.Constant(value_ints=[-2]))
        val = op.Unsqueeze(self, op.Constant(value_ints=[-1]))
        below = op.LessOrEqual(seq, val) if (right or side == "right") else op.Less(seq, val)
        count = op.ReduceSum(op.Cast(below, to=ir.DataType.INT64), op.Constant(value_ints=[-1]), keepdims=0)
        return op.Cast(count, to=ir.DataType.INT32) if out_int32 else count

    return {torch.ops.aten.sort.stable: sort_stable, torch.ops.aten.searchsorted.Tensor: searchsorted,
            torch.ops.aten.reshape.default: reshape,
            torch.ops.aten.view.default: view, torch.ops.aten._unsafe_view.default: view}


# -- dynamic axes ---------------------------------------------------------------------------------

def _axes_prefill(name: str, value: torch.Tensor, batch: int) -> dict[int, str]:
    if name == "position_ids" and value.dim() == 3:          # M-RoPE: (3, batch, seq)
        return {1: "batch", 2: "seq"}
    if name in ("inputs_embeds", "position_ids", "attention_mask"):
        return {0: "batch", 1: "seq"}
    if name in ("text_index", "text_mask"):
        return {0: "batch", 1: "text"}
    return {0: "batch"} if value.dim() and value.shape[0] == batch else {}


def _axes_vision(name: str, value: torch.Tensor, images: int) -> dict[int, str]:
    if name in ("text_embeds", "text_mask"):
        return {0: "images", 1: "text"}
    return {0: "images"} if value.dim() and value.shape[0] == images else {}


def _dims(axes_by_input: dict[str, dict[int, str]], mins: dict[str, int]):
    from torch.export import Dim
    made: dict[str, Any] = {}
    out = {}
    for name, axes in axes_by_input.items():
        spec = {}
        for ax, dim in axes.items():
            base, _, plus = dim.partition("+")
            if base not in made:
                made[base] = Dim(base, min=mins.get(base, 1))
            spec[ax] = made[base] + int(plus) if plus else made[base]
        out[name] = spec
    return out


def _io(model, axes_by_input: dict[str, dict[int, str]]) -> tuple[list, list]:
    """Inputs and outputs of an ONNX model as [{name, dtype, shape}] with dynamic axes named after
    graphprune's (batch, seq, text, images, past_<l>); other symbolic sizes keep ONNX's expression."""
    import onnx
    rename = {}
    for vi in model.graph.input:
        for ax, d in enumerate(vi.type.tensor_type.shape.dim):
            name = axes_by_input.get(vi.name, {}).get(ax)
            if name is not None and d.dim_param:
                rename.setdefault(d.dim_param, name)

    def describe(vi, check: dict | None):
        shape = []
        for ax, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.dim_param:
                shape.append(rename.get(d.dim_param, d.dim_param))
            else:
                shape.append(int(d.dim_value))
                if check is not None and ax in check:
                    raise ExportError(f"input {vi.name}: axis {ax} ({check[ax]}) was exported as the constant "
                                      f"{d.dim_value}: the graph specialised a dynamic dimension")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name
        return {"name": vi.name, "dtype": dtype, "shape": shape}

    ins = [describe(vi, {a: n for a, n in axes_by_input.get(vi.name, {}).items() if "+" not in n})
           for vi in model.graph.input]
    for i in ins:
        i["dynamic_axes"] = {str(a): s for a, s in enumerate(i["shape"]) if isinstance(s, str)}
    outs = [describe(vi, None) for vi in model.graph.output]
    for o in outs:
        o["dynamic_axes"] = {str(a): s for a, s in enumerate(o["shape"]) if isinstance(s, str)}
    return ins, outs


# -- the export -----------------------------------------------------------------------------------

def _example_inputs(pruned, example):
    if example is None:
        from graphprune.tools import zoo
        if pruned.family.name != "llava":
            raise InputError(f"export_onnx: give example= (the processor's inputs) for {pruned.family.model_class}")
        example = zoo.llava_example(pruned.model, batch=2, pad=(0, 3))
    kw = example.as_kwargs() if hasattr(example, "as_kwargs") else dict(example)
    if kw["input_ids"].shape[0] < 2:
        raise InputError("export_onnx: the example needs batch >= 2 (a batch of 1 would fix the batch size "
                         "of the exported graphs)")
    if vision_bucket_family(pruned):
        videos = kw.get("pixel_values_videos") is not None
        if videos and kw.get("pixel_values") is not None:
            raise InputError(f"export_onnx: the example holds images and videos; a {pruned.family.model_class} "
                             "export holds one shape bucket, of images or of videos: give an example of one kind")
        if videos:
            return kw
        sizes = kw.get("image_sizes")
        if kw.get("pixel_values") is None or sizes is None:
            raise InputError(f"export_onnx: a {pruned.family.model_class} export is traced for the image size of "
                             "its example: give an example with pixel_values and image_sizes")
        packings = {pruned.family.image_packing(s) for s in torch.as_tensor(sizes).tolist()}
        if len(packings) != 1:
            raise InputError(f"export_onnx: the example's image_sizes {torch.as_tensor(sizes).tolist()} pack "
                             f"differently ({'; '.join(sorted(map(str, packings)))}); an export holds one shape bucket "
                             "(one crop grid and unpadded patch grid): give images of one size you serve")
    return kw


def _jsonable(x):
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    return repr(x)


def _budgets(pruned) -> list[dict]:
    keys = ("pass", "stage", "layer", "keep", "rule", "positions")
    return [{k: _jsonable(r.info.get(k)) for k in keys} for r in pruned.results]


def export_onnx(pruned, out_dir, *, overwrite: bool = False, opset: int | None = None, example=None,
                optimize: bool = True) -> Manifest:
    """Export a pruned model's vision, prefill and decode graphs to ONNX (see the module docstring).

    `example`: HF-style inputs (a dict or a graphprune.tools.zoo.Example, batch >= 2) used to trace the
    graphs; default: graphprune.tools.zoo.llava_example(model, batch=2, pad=(0, 3)). Dynamic axes:
    batch, seq (prompt length), text (instruction tokens), images, past_<l> (layer l's cache).
    Checks (exact-mode passes, a non-empty out_dir without overwrite, an anyres example of more
    than one image size) run before
    anything is written; the files are written into a temporary directory next to out_dir and
    renamed into place, so a failed (or SIGTERM-ed) export leaves nothing behind, and the temporary
    directories of killed processes are removed by the next export next to them. `opset`: 18 up
    to torch.onnx's newest (`check_opset`); torch.onnx's own output is kept quiet. `optimize`: run the onnxscript
    optimizer on each graph (torch.onnx's default; ONNX Runtime optimizes again when it loads).
    Within one process a stage graph already exported unchanged (the decode step, the vision stage
    of a prefill-only pipeline) is reused rather than traced again.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    check_opset(opset)
    _check_exportable(pruned, out_dir, overwrite)
    kw = _example_inputs(pruned, example)
    with _temporary_folder(out_dir) as tmp:
        manifest = _export_into(tmp, pruned, kw, out_dir, opset, optimize, example)
    return Manifest(manifest, out_dir)


def _export_into(tmp, pruned, kw, out_dir, opset, optimize, example) -> dict:
    import numpy as np
    import onnx

    from graphprune.version import __version__
    report = pruned.report              # the reference run below must not replace the caller's report
    with torch.no_grad():
        ref = pruned(**kw)
        prompt = pruned._prompt(**{k: v for k, v in kw.items() if k != "mm_token_type_ids"})
    pruned.report = report
    b = kw["input_ids"].shape[0]
    n, v = prompt.vision_pos.shape[1], prompt.vision_pos.shape[2]

    stages, bucket = {}, {}
    if vision_bucket_family(pruned):
        stages["vision"], kind, spec = _export_vision_bucket(pruned, kw, tmp, opset, optimize)
        bucket = {kind: spec}
    elif host_vision(pruned):          # no vision.onnx; the prefill's vision_pos fixes the tokens per unit
        grids = {k: sorted({tuple(g) for g in kw[k].tolist()}) for k in ("image_grid_thw", "video_grid_thw")
                 if kw.get(k) is not None}
        bucket = {"grid_bucket": {"units_per_sample": n, "tokens_per_unit": v, **grids}}
    else:
        # vision: pixel_values (+ text for text-guided passes) -> features and selection outputs
        vgm = pruned.program.stages["vision"].gm
        vnames = {p.name for p in vgm.graph.find_nodes(op="placeholder")}
        vin = {"pixel_values": kw["pixel_values"]}
        if "text_embeds" in vnames:
            from graphprune.lower.runtime import text_layout
            vp = pruned._layout(kw["input_ids"], pixel_values=kw["pixel_values"]).pos
            ti, tm = text_layout(vp, kw["input_ids"].shape[1])
            vin["text_embeds"] = pruned.family.embed(kw["input_ids"].gather(1, ti)).repeat_interleave(vp.shape[1], 0)
            vin["text_mask"] = tm.repeat_interleave(vp.shape[1], 0)
        images = kw["pixel_values"].shape[0]
        stages["vision"] = _export_stage(
            "vision", vgm, vin, lambda name, val: _axes_vision(name, val, images), {"images": 1, "text": 1},
            tmp, opset, None, optimize)

    # prefill: the rewritten graph, selection nodes inside
    pin = prompt.prefill_inputs()
    stages["prefill"] = _export_stage(
        "prefill", pruned.program.stages["prefill"].gm, pin, lambda name, val: _axes_prefill(name, val, b),
        {"seq": n * v + 1, "text": 1}, tmp, opset, None, optimize)

    # decode: per-layer caches of their own lengths (distinct example lengths so none is unified)
    dgm = pruned.decode_gm
    din, rename, axes = _decode_example(pruned, ref, b)
    stages["decode"] = _export_stage("decode", dgm, din, lambda name, val: axes.get(name, {}), {}, tmp, opset,
                                     rename, optimize)

    emb = pruned.family.language_model().get_input_embeddings().weight.detach()
    if emb.dtype not in (torch.float32, torch.float16, torch.float64):
        emb = emb.float()
    np.save(os.path.join(tmp, EMBED_FILE), emb.cpu().numpy())

    used_opset = next((o.version for o in onnx.load(os.path.join(tmp, STAGE_FILES["prefill"]),
                                                     load_external_data=False).opset_import
                       if o.domain in ("", "ai.onnx")), opset)
    gen = getattr(pruned.model, "generation_config", None)
    tc = pruned.family.text_config()
    manifest = {
        "format": FORMAT,
        "graphprune_version": __version__,
        "torch_version": torch.__version__, "onnx_version": onnx.__version__,
        "onnxscript_version": _version("onnxscript"),
        "opset": used_opset,
        "static": True,
        "model_class": pruned.family.model_class, "family": pruned.family.name,
        "image_token_id": int(pruned.family.image_token_id()),
        "video_token_id": _jsonable(pruned.family.video_token_id()),
        "num_layers": pruned.num_layers, "vocab_size": int(emb.shape[0]), "hidden_size": int(emb.shape[1]),
        "num_key_value_heads": getattr(tc, "num_key_value_heads", None),
        "eos_token_id": _jsonable(getattr(gen, "eos_token_id", None)),
        "pad_token_id": _jsonable(getattr(gen, "pad_token_id", None)),
        "pipeline": [repr(p) for p in pruned.pipeline],
        "pipeline_repr": " | ".join(repr(p) for p in pruned.pipeline),
        "budgets": _budgets(pruned),
        "vision_positions": pruned._vision_positions(),
        "video_unit": pruned.video_unit,
        "sliding_window": pruned.family.binding_window(),       # pruned runs must stay under it
        "embedding": {"file": EMBED_FILE, "shape": list(emb.shape), "dtype": str(emb.dtype).replace("torch.", ""),
                      "note": "the embedding lookup (row gather of input_ids) runs on the host"},
        "stages": stages,
        **bucket,
        **({"host_vision": HOST_VISION_NOTE} if host_vision(pruned) else {}),
        "reference_prompt": {
            "source": ("example" if example is not None
                       else "graphprune.tools.zoo.llava_example(model, batch=2, pad=(0, 3))"),
            "batch": b, "prompt_length": int(kw["input_ids"].shape[1]),
            "images_per_sample": n, "vision_tokens_per_image_in_llm": v,
            "llm_sequence_length": int(prompt.embeds.shape[1]),
            "kv_lengths": ref.cache.lengths(),
        },
    }
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    check_static_onnx(tmp)
    _commit(tmp, out_dir)
    return manifest


# -- the temporary folder the files are written into ------------------------------------------
# Named .<out>.tmp-<pid>-<random>: a folder whose process is gone (killed mid-export, SIGKILL
# included) is removed by the next export next to it. Made with os.mkdir, so it gets the umask's
# permissions (tempfile.mkdtemp's 0700 would keep a separate serving user out of the export).

@contextlib.contextmanager
def _temporary_folder(out_dir: str):
    """Yield a new temporary folder next to `out_dir`; remove it if the block fails or the process
    gets SIGTERM meanwhile. The handler, installed before the folder exists, removes the folder
    itself and then raises SystemExit in the main thread (so the removal below runs too): a
    SystemExit swallowed on its way up (raised inside a finalizer, or caught by library code) still
    leaves no folder behind, and the export then fails writing into it."""
    parent, base = os.path.dirname(out_dir), os.path.basename(out_dir)
    tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)

        def terminated(signum, frame):
            shutil.rmtree(tmp, ignore_errors=True)
            raise SystemExit(128 + signum)
        signal.signal(signal.SIGTERM, terminated)
    try:
        # the removal covers the mkdir itself: a SIGTERM handled the moment mkdir returns (the process
        # descheduled right after it, under load) raises there, before any later `try` is entered
        try:
            try:
                os.makedirs(parent, exist_ok=True)
                _remove_stale(parent, base)
                os.mkdir(tmp)
            except OSError as e:
                raise InputError(f"cannot write the export to {out_dir}: {e.strerror or e} "
                                 f"({e.filename or parent})") from None
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _remove_stale(parent: str, base: str) -> None:
    for name in os.listdir(parent):
        for kind in (".tmp-", ".old-"):
            prefix = f".{base}{kind}"
            pid = name[len(prefix):].split("-", 1)[0] if name.startswith(prefix) else ""
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:  # noqa: BLE001
        return None


# Exports of one process, reused when the same graph (same code, same weight tensors unchanged
# in place, same inputs and options) is exported again: the decode step, and the vision stage of
# prefill-only pipelines, are the same for every pipeline on a model. Small files only.
_STAGE_CACHE: dict = {}
_CACHE_MAX_BYTES = 64 << 20


def _cache_key(stage, gm, inputs, opset, optimize, rename):
    # inference tensors (a model pruned under torch.inference_mode()) have no version counter;
    # they cannot be changed in place outside inference mode, so their pointer is enough
    weights = tuple((n, t.data_ptr(), None if t.is_inference() else t._version, tuple(t.shape), str(t.dtype))
                    for n, t in list(gm.named_parameters()) + list(gm.named_buffers()))
    ins = tuple((k, None if v is None else (tuple(v.shape), str(v.dtype))) for k, v in sorted(inputs.items()))
    return (stage, gm.code, weights, ins, opset, optimize, tuple(sorted((rename or {}).items())), torch.__version__)


def _export_stage(stage, gm, inputs, axes_of, mins, tmp, opset, rename, optimize=True) -> dict:
    import onnx
    path = os.path.join(tmp, STAGE_FILES[stage])
    key = _cache_key(stage, gm, inputs, opset, optimize, rename)
    hit = _STAGE_CACHE.get(key)
    if hit is not None:
        with open(path, "wb") as f:
            f.write(hit[0])
        return copy.deepcopy(hit[1])
    pgm, graph_inputs, onnx_inputs, args, out_names, outs, dropped = _prepare(gm, inputs, rename)
    axes = {}
    for gname, oname in zip(graph_inputs, onnx_inputs):
        axes[oname] = axes_of(gname, inputs[gname])
    dyn = _dims({g: axes[o] for g, o in zip(graph_inputs, onnx_inputs)}, mins)
    _export(stage, pgm, args, onnx_inputs, out_names, dyn, path, opset, optimize)
    model = onnx.load(path, load_external_data=False)
    ins, outs_desc = _io(model, axes)
    spec = {"file": STAGE_FILES[stage], "inputs": ins, "outputs": outs_desc,
            "graph_inputs": dict(zip(graph_inputs, onnx_inputs)), "none_inputs": dropped,
            "graph_outputs": out_names}
    if os.path.getsize(path) <= _CACHE_MAX_BYTES and set(os.listdir(tmp)) <= set(STAGE_FILES.values()):
        with open(path, "rb") as f:
            _STAGE_CACHE[key] = (f.read(), copy.deepcopy(spec))
    return spec


def _export_vision_bucket(pruned, kw, tmp, opset, optimize) -> tuple[dict, str, dict]:
    """vision.onnx of an anyres family for the example's shape bucket, captured from the model's own
    get_image_features (the image size baked in) or get_video_features and checked against it: one
    image of the example's size (pixel_values (1, crops, C, H, W)), or one video of its shape
    (pixel_values_videos (1, frames, C, H, W)) -> its placeholder rows (rows, D), image_newline rows
    included. Returns the stage spec, the manifest key ("image_bucket" / "video_bucket") and the bucket."""
    from graphprune.capture.export import capture_vision_bucket
    from graphprune.verify.eager import check_against_eager
    family = pruned.family
    if kw.get("pixel_values_videos") is not None:
        pixels, size = kw["pixel_values_videos"][:1], None
    else:
        pixels, size = kw["pixel_values"][:1], torch.as_tensor(kw["image_sizes"])[0]
    stage = capture_vision_bucket(family, pixels, None if size is None else size.tolist())
    check_against_eager(stage, family.model_class)
    spec = _export_stage("vision", stage.gm, {"pixels": pixels}, lambda name, val: {}, {}, tmp, opset,
                         {"pixels": stage.inputs[0]}, optimize)
    rows = spec["outputs"][0]["shape"][0]
    if size is None:
        return spec, "video_bucket", {
            "pixel_values_videos": list(pixels.shape), "features_per_video": rows,
            "closing_newlines": family.video_newline,
            "note": "vision.onnx takes one video of this shape at a time; other frame counts need another export"}
    newline, packing, cfg = family.newline_slots(size), family.image_packing(size), family.config()
    return spec, "image_bucket", {
        "image_size": [int(x) for x in size], "pixel_values": list(pixels.shape), "features_per_image": rows,
        "newline_slots": newline.nonzero()[:, 0].tolist(),
        # what decides whether another image size shares this graph (AnyresPacking), and how to compute it
        "packing": {"crop_grid": list(packing.grid), "unpadded": list(packing.unpadded),
                    "grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints],
                    "crop_size": cfg.vision_config.image_size, "patch_size": cfg.vision_config.patch_size,
                    "modeling_module": type(family.body()).__module__},
        "note": "vision.onnx takes one image at a time, of any size packed like image_size (the same crop grid "
                "and unpadded patch grid); other packings need another export"}


def _decode_example(pruned, ref, b):
    """Decode-step inputs with a different cache length per layer, the ONNX names of the past
    inputs (past_k_<l>, past_v_<l>) and their dynamic axes."""
    gm = pruned.decode_gm
    names = [p.name for p in gm.graph.find_nodes(op="placeholder")]
    cache = ref.cache
    g = torch.Generator().manual_seed(0)
    inputs, rename, axes = {}, {}, {}
    base = max(cache.lengths()) + 1
    for name in names:
        if name == "inputs_embeds":
            d = pruned.family.text_config().hidden_size
            inputs[name] = torch.randn(b, 1, d, generator=g, dtype=cache[0].keys.dtype)
            axes[name] = {0: "batch"}
        elif name == "position_ids":            # M-RoPE: (3, batch, 1), every axis alike
            axes_first = pruned.family.position_axes != 1
            inputs[name] = torch.full((3, b, 1) if axes_first else (b, 1), base + 3, dtype=torch.long)
            axes[name] = {1: "batch"} if axes_first else {0: "batch"}
        elif name.startswith("past_"):
            j = int(name.split("_")[1])
            layer, kind = divmod(j, 2)
            c = cache[layer]
            length = 3 + 2 * layer          # distinct per layer, none 0 or 1
            shape = (b, c.keys.shape[1], length, c.keys.shape[3])
            inputs[name] = torch.randn(*shape, generator=g, dtype=c.keys.dtype)
            rename[name] = f"past_{'kv'[kind]}_{layer}"
            axes[name] = {0: "batch", 2: f"past_{layer}"}
        elif name == "layer_positions":     # compact positions: each layer's own decode position
            inputs[name] = torch.full((len(cache), b, 1), base + 3, dtype=torch.long)
            axes[name] = {1: "batch"}
        elif name.startswith("kv_mask_"):
            layer = int(name.rsplit("_", 1)[1])
            mask = torch.ones(b, 3 + 2 * layer + 1, dtype=cache[layer].mask.dtype)
            mask[0, 0] = 0
            inputs[name] = mask
            axes[name] = {0: "batch", 1: f"past_{layer}+1"}
        else:
            raise ExportError(f"decode: unexpected graph input {name!r}")
    return inputs, rename, axes


def _commit(tmp: str, out_dir: str) -> None:
    old = None
    if os.path.exists(out_dir):
        old = os.path.join(os.path.dirname(out_dir),
                           f".{os.path.basename(out_dir)}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
