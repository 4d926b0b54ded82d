"""torch.compile backend: `torch.compile(model, backend="graphprune", options={"pipeline": ...})`.

Registered through the `torch_dynamo_backends` entry point, so no import of graphprune is needed.
Dynamo splits a Hugging Face VLM's forward into frames at its graph breaks (for LLaVA: embedding,
vision tower, projector, the `.item()` in the image-token check, then one frame holding the image
merge and every decoder layer, then the LM head). The backend reads each frame's graph:

* the frame that merges image features into the embeddings and runs the decoder layers is the
  prefill anchor: the model's family lays the prompt's images out from what that frame holds (the
  image-token mask and the merged features: Family.frame_layout), graphprune captures that language model with dynamic batch/sequence, applies the
  pipeline's passes (the same rewrite `graphprune.prune` runs) and compiles the result with
  Inductor (or runs it as is, `compiler="eager"`). The frame's outputs (per-layer keys/values for
  the cache, the final hidden state) come from the rewritten graph, so every layer's cache holds
  what it kept and the logits cover the kept tokens. A family with bidirectional attention groups
  (PaliGemma's prefix) gets them from the frame's token_type_ids, as graphprune.prune does;
* every other frame (vision tower, head, decode steps, text-only prompts) goes to the compiler as
  captured.

A pass that cannot apply never degrades silently: a model of a family the backend cannot prune
("unsupported family": unknown to graphprune, refused up front, or laid out in a way the merge frame
does not show), a video prompt, an image merge split from the decoder layers by
a graph break, decoder layers spread over several frames, or image features that reach the
decoder layers merged by an op other than masked_scatter (seen at run time: a compiled vision
frame ran and the next decoder frame was not the pruned prefill) raise `PassNotApplicable` (or
warn, with `if_not_applied="warn"`). `pruned_graphs(model)` returns the rewritten graphs the backend
built for a model, for inspection.
"""
from __future__ import annotations

import sys
import threading
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import fx

from graphprune.anatomy.read import layer_of, module_path
from graphprune.errors import InputError, PassConfigError, PassNotApplicable, UnsupportedModelError

OPTIONS = {"pipeline": "a method or pipeline string, a TOML path, or a list of passes (required)",
           "compiler": '"inductor" (default) or "eager" (the rewritten graphs run uncompiled)',
           "if_not_applied": '"raise" (default) or "warn"',
           "linear": '"aten" (default) or "packed" (float32 CPU models: the rewritten prefill\'s linear weights packed '
                     'once for oneDNN, as graphprune.prune(linear="packed"); Inductor runs them as opaque kernels)'}


@dataclass
class BackendOptions:
    passes: list
    compiler: str = "inductor"
    if_not_applied: str = "raise"
    linear: str = "aten"

    @classmethod
    def parse(cls, options) -> "BackendOptions":
        from graphprune.rewrite.pipeline import as_passes, load_builtin_methods
        accepted = "; ".join(f"{k}: {v}" for k, v in OPTIONS.items())
        if not isinstance(options, dict) or "pipeline" not in options:
            raise PassConfigError('the graphprune backend needs options={"pipeline": ...}, e.g. '
                                  'torch.compile(model, backend="graphprune", options={"pipeline": "fastv(layer=2, keep=64)"}); '
                                  f"accepted options: {accepted}")
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise PassConfigError(f"unknown graphprune backend option(s) {unknown}; accepted: {accepted}")
        compiler = options.get("compiler", "inductor")
        if compiler not in ("inductor", "eager"):
            raise PassConfigError(f'compiler must be "inductor" or "eager", got {compiler!r}')
        mode = options.get("if_not_applied", "raise")
        if mode not in ("raise", "warn"):
            raise PassConfigError(f'if_not_applied must be "raise" or "warn", got {mode!r}')
        linear = options.get("linear", "aten")
        if linear not in ("aten", "packed"):
            raise PassConfigError(f'linear must be "aten" or "packed", got {linear!r}')
        load_builtin_methods()
        passes = as_passes(options["pipeline"])
        if not passes:
            raise PassConfigError("the pipeline is empty: name at least one method")
        for p in passes:
            if p.stage != "prefill":
                raise PassConfigError(
                    f"{p!r} is a {p.stage}-stage pass; the torch.compile backend rewrites the language model's "
                    "prefill frame (fastv, vtw, dart, random, mustdrop_filter, visiontrim_llm, ...). "
                    "Use graphprune.prune(model, ...) for vision-stage methods")
            if getattr(p.config, "mode", "static") == "exact":
                raise PassConfigError(f"{p!r}: mode='exact' keeps a data-dependent number of tokens; "
                                      "compiled graphs need mode='static'")
        return cls(passes, compiler, mode, linear)


# -- what a frame holds ------------------------------------------------------------------------
def _lm_layers(gm: fx.GraphModule) -> set[int]:
    return {layer_of(n) for n in gm.graph.nodes
            if layer_of(n) is not None and "language_model" in module_path(n)}


def _image_merge(gm: fx.GraphModule) -> fx.Node | None:
    """The masked_scatter that writes image features into the prompt embeddings."""
    for n in gm.graph.nodes:
        if n.target in ("masked_scatter", torch.Tensor.masked_scatter) and len(n.args) == 3:
            return n
    return None


_VISION_PATHS = ("vision_tower", "vision_model", "visual")


def _encodes_image(gm: fx.GraphModule) -> bool:
    """The frame runs (part of) the vision encoder."""
    return any(n.op == "call_function" and any(w in module_path(n) for w in _VISION_PATHS) for n in gm.graph.nodes)


class _Pending(threading.local):
    """An image encoded by a compiled frame and not yet merged by a pruned prefill frame. A decoder
    frame that runs while one is pending is a prefill whose merge the backend did not recognise."""
    image = False


_PENDING = _Pending()


def _placeholder_index(gm: fx.GraphModule, node: fx.Node, what: str) -> int:
    """Position of the frame input `node` comes from (through views, expands and dtype casts)."""
    seen = node
    while seen.op != "placeholder":
        if seen.op not in ("call_method", "call_function") or not seen.args or not isinstance(seen.args[0], fx.Node):
            raise UnsupportedModelError("torch.compile frame", what, f"cannot trace {node.name} to a frame input")
        seen = seen.args[0]
    return list(gm.graph.find_nodes(op="placeholder")).index(seen)


def _sdpa_operands(gm: fx.GraphModule) -> dict[int, tuple[set, set]]:
    """Per LM layer, the nodes feeding its attention's keys and values (to name the cache outputs)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    out = {}
    for n in gm.graph.nodes:
        if n.target is sdpa and "language_model" in module_path(n):
            out[layer_of(n)] = (_ancestors(n.args[1]), _ancestors(n.args[2]))
    return out


def _ancestors(node: fx.Node) -> set:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen or n.op == "placeholder":
            continue
        seen.add(n)
        todo += n.all_input_nodes
    return seen


def _output_roles(gm: fx.GraphModule, layers: int, merge: fx.Node) -> list[str]:
    """Name every frame output by what the rewritten prefill graph returns: k_i, v_i or logits
    (the final hidden state: the captured body has an identity head), or the merged image features
    (Gemma 3 and PaliGemma return them as image_hidden_states)."""
    operands = _sdpa_operands(gm)
    roles = []
    for o in gm.graph.find_nodes(op="output")[0].args[0]:
        role = "image_features" if o is merge.args[2] else None
        if role is None and isinstance(o, fx.Node):
            i = layer_of(o)
            if i is not None and i in operands:
                role = f"k_{i}" if o in operands[i][0] else f"v_{i}" if o in operands[i][1] else None
            elif i is None and "language_model" in module_path(o):
                role = "logits"
        if role is None:
            raise UnsupportedModelError("torch.compile frame", "outputs of the decoder frame",
                                        f"cannot tell what output {getattr(o, 'name', o)!r} is "
                                        "(expected per-layer keys/values and the final hidden state)")
        roles.append(role)
    cache = sorted(r for r in roles if r not in ("logits", "image_features"))
    if cache != sorted(f"{kv}_{i}" for i in range(layers) for kv in "kv"):
        raise UnsupportedModelError("torch.compile frame", "KV-cache outputs", f"frame outputs {roles}")
    return roles


def _owner(what: str):
    """The module whose forward dynamo is tracing (the frame's `self`)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator
    tx = InstructionTranslator.current_tx()
    owner = tx.f_locals.get("self") if tx is not None else None
    if owner is None:
        raise UnsupportedModelError("torch.compile frame", what, "the frame has no `self` module")
    # what the backend returns runs this module's own (rewritten) graphs, but dynamo lifts module
    # parameters to frame inputs and by default does not guard on the module's identity: a second
    # model of the same class would reuse this frame and run this model's layers. Guard on it, so
    # another model recompiles and gets its own frame.
    from torch._dynamo.guards import GuardBuilder, install_guard
    from torch._dynamo.source import LocalSource
    install_guard(LocalSource("self").make_guard(GuardBuilder.ID_MATCH))
    return owner


# -- the pruned prefill frame ------------------------------------------------------------------


_PROGRAMS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # language model -> {pipeline: Rewritten}


@dataclass
class Rewritten:
    """One model's prefill rewritten by one pipeline, and the compiled callable running it."""
    program: object                 # graphprune Program (prefill stage rewritten)
    passes: list
    fn: object                      # the graph, or a StageCall running it compiled
    masked: bool                    # static-capacity slots: later attention must mask them

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.program.stages["prefill"].gm


def _rewritten(owner, opts: BackendOptions) -> Rewritten:
    # one capture and rewrite per model and pipeline: the graph has dynamic batch and sequence,
    # so a dynamo recompile for new shapes reuses it
    from graphprune.families import family_of
    from graphprune.lower.runtime import StageCall, check_linear
    from graphprune.rewrite.pipeline import Program, run_pipeline
    key = (repr(opts.passes), opts.compiler, opts.linear)
    per_model = _PROGRAMS.setdefault(family_of(owner).language_model(), {})
    if key not in per_model:
        program = run_pipeline(Program.capture(owner, stages=("prefill",)), opts.passes)
        gm = program.stages["prefill"].gm
        if opts.linear == "packed":
            from graphprune.targets.packed_linear import pack_linear_weights
            check_linear(owner, "packed")
            pack_linear_weights(gm, for_inductor=opts.compiler == "inductor")
        fn = gm if opts.compiler == "eager" else StageCall(gm, torch.compile(gm, backend="inductor", dynamic=True))
        masked = any(t.masked for t in program.anatomy["prefill"].tokens)
        per_model[key] = Rewritten(program, opts.passes, fn, masked)
    return per_model[key]


_PADDED = ("padded batch: its prefill is pruned exactly, but decoding it needs graphprune's per-layer "
           "key masks (Hugging Face's mask has one column per prompt token, the shrunk caches fewer); "
           "use graphprune.prune(model, ...).generate(...) for padded batches")


@dataclass
class PrunedFrame:
    """The callable dynamo runs for the prefill frame: the family's layout from the image mask and
    features, the merge, the rewritten prefill graph, the frame's outputs in dynamo's order."""
    owner: torch.nn.Module
    opts: BackendOptions
    roles: list[str]
    inputs: dict[str, int]          # embeds / image_mask / image_features / attention_mask / token_type_ids -> arg index
    modality: str = "image"         # what the merge writes: images, or (alone) videos

    def __call__(self, *args):
        from graphprune import tokenops
        from graphprune.lower.runtime import _call, _Prompt, check_budgets
        # captured and rewritten on first use, outside dynamo's trace (export must not run inside it)
        _PENDING.image = False
        rw = _rewritten(self.owner, self.opts)
        embeds, mask = args[self.inputs["embeds"]], args[self.inputs["image_mask"]]
        feats = args[self.inputs["image_features"]]
        i = self.inputs.get("attention_mask")
        attention_mask = args[i] if i is not None else None
        b, s = embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(b, s, dtype=torch.long, device=embeds.device)
        elif bool((attention_mask == 0).any()):
            warnings.warn(_PADDED, stacklevel=2)
        feats = feats.reshape(-1, embeds.shape[-1])
        layout = rw.program.family.frame_layout(mask.reshape(b, s, -1)[..., 0], feats, self.modality)
        if layout is None:
            raise InputError("the prefill frame merges image features but the prompt has no image tokens")
        check_budgets(rw.program.results, layout.pos.shape[-1])
        embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))      # the model's own merge
        family = rw.program.family
        positions = family.positions(None, attention_mask)
        index = torch.arange(s, device=embeds.device).expand(b, s)
        i = self.inputs.get("token_type_ids")
        groups = family.attention_groups(attention_mask, token_type_ids=args[i] if i is not None else None)
        prompt = _Prompt.assemble(embeds, tokenops.token_features(embeds, layout.pos), positions, attention_mask,
                                  layout.pos, index, rw.passes, unit_frames=layout.frames,
                                  lm_inputs={} if groups is None else {"attention_groups": groups},
                                  grid_free=family.grid_free(layout))
        named = _call(rw.fn, **prompt.prefill_inputs())
        named["image_features"] = args[self.inputs["image_features"]].to(embeds.dtype)
        return tuple(named[r] for r in self.roles)


def _prune_frame(gm: fx.GraphModule, merge: fx.Node, held: set[int], opts: BackendOptions) -> PrunedFrame | None:
    """`held`: the decoder layers the frame runs (`_lm_layers`); all of them, or nothing is pruned."""
    from graphprune.families import family_of
    owner = _owner("the module running the decoder layers")
    layers = family_of(owner).language_model().config.num_hidden_layers
    if held != set(range(layers)):
        _not_applied(opts, f"the frame merging image features holds decoder layers {sorted(held)} "
                           f"of 0..{layers - 1}: a graph break splits the language model")
        return None
    roles = _output_roles(gm, layers, merge)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    merged = placeholders[_placeholder_index(gm, merge.args[2], "merged features")].name
    videos = _video_inputs(gm)
    if videos and (videos != [merged] or not family_of(owner).frame_video_tokens()):
        _not_applied(opts, _VIDEO.format(videos))
        return None
    inputs = {"embeds": _placeholder_index(gm, merge.args[0], "prompt embeddings"),
              "image_mask": _placeholder_index(gm, merge.args[1], "image-token mask"),
              "image_features": _placeholder_index(gm, merge.args[2], "image features")}
    for name in ("attention_mask", "token_type_ids"):
        if _input_index(gm, name) is not None:
            inputs[name] = _input_index(gm, name)
    return PrunedFrame(owner, opts, roles, inputs, "video" if videos else "image")


def _family_supported(opts: BackendOptions) -> bool:
    """The frame merging image features belongs to a family graphprune reads and this backend can
    prune; else say so (unknown, refused and compile-refused families), before any diagnosis of the
    frame's graph."""
    from graphprune.families import family_of
    try:
        owner = _owner("the module merging image features")
    except (UnsupportedModelError, AttributeError):
        # no module behind the frame (the backend called on a bare graph, outside dynamo's trace,
        # where dynamo has no current translator): no family to read, the graph is diagnosed as is
        return True
    try:
        family = family_of(owner)
    except UnsupportedModelError as e:
        _not_applied(opts, f"unsupported family: {e}")
        return False
    if family.compile_refused:          # the real cause, before any graph break the frame shows
        _not_applied(opts, f"unsupported family for the torch.compile backend: {family.compile_refused}")
        return False
    return True


_VIDEO = ("the prompt has videos (frame inputs {}): the backend prunes videos only where one frame merges them "
          "alone and runs the decoder layers, in a family whose frame shows the video frames "
          "(Family.frame_video_tokens: LLaVA-OneVision and LLaVA-NeXT-Video video-only prompts)")


def _video_inputs(gm: fx.GraphModule) -> list[str]:
    return [p.name for p in gm.graph.find_nodes(op="placeholder") if "video" in p.name]


def _not_applied(opts: BackendOptions, why: str) -> None:
    _PENDING.image = False           # this image is reported: a later text-only prompt owes nothing
    msg = (f"graphprune could not apply {', '.join(map(repr, opts.passes))}: {why}. The model would run "
           "unpruned; use graphprune.prune(model, ...) instead")
    if opts.if_not_applied == "raise":
        raise PassNotApplicable(msg)
    warnings.warn(msg, stacklevel=3)


def _compile(gm: fx.GraphModule, example_inputs, compiler: str):
    if compiler == "eager":
        return gm.forward
    from torch._dynamo.backends.registry import lookup_backend
    return lookup_backend("inductor")(gm, example_inputs)


def graphprune_backend(gm: fx.GraphModule, example_inputs, options=None, **unused):
    """The `graphprune` torch.compile backend (see the module docstring)."""
    if unused:
        raise PassConfigError(f"the graphprune backend takes options={{...}}, not {sorted(unused)} "
                              "(mode= is Inductor's; pass compiler= in options)")
    opts = BackendOptions.parse(options)
    if not _WATCHING:
        raise PassNotApplicable(_UNWATCHED)
    merge, layers, vision = _image_merge(gm), _lm_layers(gm), _encodes_image(gm)
    if merge is None and layers and vision:
        _not_applied(opts, _UNSEEN_MERGE)
    if merge is not None:
        if not _family_supported(opts):
            return _compile(gm, example_inputs, opts.compiler)
        if not layers:
            _not_applied(opts, _VIDEO.format(_video_inputs(gm)) if _video_inputs(gm) else
                         "a graph break separates the image-feature merge from the decoder layers")
        else:
            frame = _prune_frame(gm, merge, layers, opts)
            if frame is not None:
                return frame
    compiled = _compile(gm, example_inputs, opts.compiler)
    if vision and not layers:
        return VisionFrame(compiled)
    if layers:            # a decode step (or a text-only prompt) over the caches prefill left
        # the frame's module is the whole model (no graph break without an image) or its body
        from graphprune.families import family_of
        lm = family_of(_owner("the module running the decoder layers")).language_model()
        return DecodeFrame(lm, compiled, _input_index(gm, "attention_mask"), opts)
    return compiled


# -- dynamo giving up on a frame ---------------------------------------------------------------
# When a code object reaches torch._dynamo.config.recompile_limit (or the accumulated limit), dynamo
# stops compiling it and runs it (and, by default, everything it calls) eagerly: the backend is never
# asked, so the model would run unpruned. Dynamo decides this in one function,
# convert_frame.exceeds_recompile_limit, called while it converts the frame, on the calling thread and
# before the eager run. graphprune wraps that function (not dynamo's warning about it, which logging
# settings such as torch._logging.set_logs(dynamo=logging.ERROR) suppress): when the limit is hit on
# a frame being compiled for the graphprune backend, it raises. Other backends' frames are untouched.
# It is installed when this module is imported, which torch.compile does when it looks the backend up.


def _graphprune_options(compiler_fn):
    """The options= of a torch.compile(..., backend="graphprune") wrapper (through dynamo's
    wrappers), or None for another backend."""
    seen = 0
    while compiler_fn is not None and seen < 8:
        if getattr(compiler_fn, "compiler_fn", None) is graphprune_backend:
            return getattr(compiler_fn, "kwargs", {}).get("options") or {}
        if compiler_fn is graphprune_backend:
            return {}
        compiler_fn = getattr(compiler_fn, "_torchdynamo_orig_backend", None) or getattr(compiler_fn, "compiler_fn",
                                                                                       None)
        seen += 1
    return None


def _compiling_for_graphprune() -> bool:
    """Whether the frame dynamo is converting on this thread is compiled for the graphprune backend
    (dynamo's _compile holds its compiler_fn)."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "_compile" and "compiler_fn" in frame.f_locals:
            return _graphprune_options(frame.f_locals["compiler_fn"]) is not None
        frame = frame.f_back
    return False


def _refuse_fallback(limit: str) -> None:
    msg = (f"torch.compile(backend=\"graphprune\"): dynamo hit torch._dynamo.config.{limit} "
           f"({getattr(torch._dynamo.config, limit, '?')}) and would run this call eagerly, unpruned "
           "(every failed or distinct compile of the same model class counts). Call torch._dynamo.reset() "
           f"or raise torch._dynamo.config.{limit}, or use graphprune.prune(model, ...)")
    # raised even with if_not_applied="warn": once dynamo has fallen back on a frame it no
    # longer reports it, and later calls through other compiles of the model silently run
    # whatever frames it cached for them (seen: a keep=6 compile running keep=8's prefill)
    raise PassNotApplicable(msg)


_UNWATCHED = ("this torch has no torch._dynamo.convert_frame.exceeds_recompile_limit, where the graphprune "
              "backend learns that dynamo falls back to eager (unpruned); use a torch in graphprune's "
              "supported range, or graphprune.prune(model, ...)")


def _watch_fallbacks() -> bool:
    """Wrap dynamo's recompile-limit decision (once); False when this torch has none to wrap."""
    from torch._dynamo import convert_frame
    decide = getattr(convert_frame, "exceeds_recompile_limit", None)
    if decide is None or getattr(decide, "graphprune_watch", False):
        return decide is not None

    def exceeds_recompile_limit(*args, **kwargs):
        exceeded, limit = decide(*args, **kwargs)
        if exceeded and _compiling_for_graphprune():
            _refuse_fallback(str(limit))
        return exceeded, limit

    exceeds_recompile_limit.graphprune_watch = True
    convert_frame.exceeds_recompile_limit = exceeds_recompile_limit
    return True


_UNSEEN_MERGE = ("the image features reach the decoder layers without the masked_scatter merge the "
                 "backend recognises (another merge op, or a graph break between merge and layers)")


@dataclass
class VisionFrame:
    """A vision-encoder frame, run as compiled; notes that an image now awaits its pruned merge."""
    fn: object

    def __call__(self, *args):
        _PENDING.image = True
        return self.fn(*args)


def _input_index(gm: fx.GraphModule, name: str) -> int | None:
    """Position of the frame input of the forward argument `name` (None: the frame has none)."""
    for i, p in enumerate(gm.graph.find_nodes(op="placeholder")):
        if p.name.startswith(f"l_{name}"):
            return i
    return None


@dataclass
class DecodeFrame:
    """A decoder frame without image merge, run as captured. Hugging Face's cache then holds each
    layer's kept tokens, and with no padding a one-token step attends to all of them, which is
    exactly graphprune's decode. What HF's cache cannot express is refused here, loudly: key masks
    of static-capacity passes, and padding (its mask has one column per prompt token)."""
    language_model: torch.nn.Module
    fn: object
    attention_mask: int | None
    opts: BackendOptions

    def __call__(self, *args):
        if _PENDING.image:               # an encoded image, and this prefill did not merge it pruned
            _not_applied(self.opts, _UNSEEN_MERGE)
        pruned = list(_PROGRAMS.get(self.language_model, {}).values())
        if any(rw.masked for rw in pruned):
            raise PassNotApplicable("decoding after a static-capacity pass (masked slots) needs graphprune's "
                                    "per-layer key masks, which Hugging Face's cache cannot carry; use "
                                    "graphprune.prune(model, ...).generate(...)")
        if any(rw.graph_module.meta.get("graphprune_decode_positions") for rw in pruned):
            raise PassNotApplicable("decoding after positions='compact' between LLM layers gives each layer its own "
                                    "positions (its cache length), which Hugging Face's decode cannot; use "
                                    "graphprune.prune(model, ...).generate(...)")
        if pruned and self.attention_mask is not None and bool((args[self.attention_mask] == 0).any()):
            raise InputError(_PADDED)
        return self.fn(*args)


def pruned_graphs(model: torch.nn.Module) -> list[fx.GraphModule]:
    """The rewritten prefill graphs the backend built for `model` (one per pipeline and compiler)."""
    return [rw.graph_module for m in model.modules() for rw in _PROGRAMS.get(m, {}).values()]


_WATCHING = _watch_fallbacks()
