"""torch.compile backend: `torch.compile(model, backend="graphprune", options={"pipeline": ...})`.

Registered through the `torch_dynamo_backends` entry point, so no import of graphprune is needed.
Dynamo splits a Hugging Face VLM's forward into frames at its graph breaks (for LLaVA: embedding,
vision tower, projector, the `.item()` in the image-token check, then one frame holding the image
merge and every decoder layer, then the LM head). The backend reads each frame's graph:

* the frame that merges image features into the embeddings and runs the decoder layers is the
  prefill anchor: the model's family lays the prompt's images out from what that frame holds (the
  image-token mask and the merged features: Family.frame_layout), graphprune captures that
  language model with dynamic batch/sequence, applies the pipeline's passes (the same rewrite
  `graphprune.prune` runs) and compiles the result with Inductor (or runs it as is,
  `compiler="eager"`). The frame's outputs (per-layer keys/values for the cache, the final hidden
  state) come from the rewritten graph, so every layer's cache holds what it kept and the logits
  cover the kept tokens. A family with bidirectional attention groups (PaliGemma's prefix) gets
  them from the frame's token_type_ids, as graphprune.prune does;
* a merge in a frame of its own (Qwen2-VL and Qwen2.5-VL merge images, then videos, in frames
  split from the decoder layers by get_rope_index's graph breaks; LLaVA-OneVision merges an image
  before its video tower runs) runs as compiled and records, per thread, its mask, its features and
  the very tensor it returns. The next frame whose prompt embeddings ARE that tensor (identity) is
  the prefill: the layout comes from every recorded merge (and its own), M-RoPE positions are the
  frame's own position_ids, and a Qwen video's frames are told by those positions (each frame
  repeats one height x width grid);
* a family whose language model dynamo runs one decoder layer per frame (`Family.layer_frames`:
  Qwen3-VL) is pruned through those frames: targets/dynamo_layers.py;
* a frame running a vision tower whose family knows which encoder layers the model's own code
  reads (Family.vision_tower_read: LLaVA's hidden_states[-2]) runs those; the later layers, which
  feed only what the tower hands back to the caller (last_hidden_state), run on first use of those
  outputs: targets/dynamo_vision.py;
* every other frame (vision tower, head, decode steps, text-only prompts) goes to the compiler as
  captured (with linear="packed", its linears on oneDNN-packed weights, as gp.prune lowers them).

The rewritten prefill is lowered as gp.prune lowers it too: compiled masked and mask-free, one
picked per call by the prompt's mask (CausalChoice).

A pass that cannot apply never degrades silently: a model of a family the backend cannot prune
("unsupported family": unknown to graphprune, refused up front, or laid out in a way the merge frame
does not show), videos the frames do not lay out, decoder layers spread over several frames, or
image features that reach the decoder layers merged by an op other than masked_scatter or altered
after a recorded merge (seen at run time: a compiled vision or merge frame ran and the next decoder
frame was not the pruned prefill) raise `PassNotApplicable` (or warn, with
`if_not_applied="warn"`). `pruned_graphs(model)` returns the rewritten graphs the backend built for
a model, for inspection.
"""
from __future__ import annotations

import operator
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import fx

from graphprune.anatomy.read import layer_of, module_path
from graphprune.errors import InputError, PassConfigError, PassNotApplicable, UnsupportedModelError
from graphprune.targets.dynamo_padding import PADDED, refuse_padded, watch_decodes

OPTIONS = {"pipeline": "a method or pipeline string, a TOML path, or a list of passes (required)",
           "compiler": '"inductor" (default) or "eager" (the rewritten graphs run uncompiled)',
           "if_not_applied": '"raise" (default) or "warn"',
           "linear": '"aten" (default) or "packed" (float32 CPU models: the rewritten prefill\'s linear weights packed '
                     'once for oneDNN, as graphprune.prune(linear="packed"); Inductor runs them as opaque kernels)',
           "video_unit": 'what a video\'s keep counts, as graphprune.prune\'s video_unit: "frame" (default) or '
                         '"video" (the default for a videos-only pass such as evs)'}


@dataclass
class BackendOptions:
    passes: list
    compiler: str = "inductor"
    if_not_applied: str = "raise"
    linear: str = "aten"
    video_unit: str = "frame"

    @classmethod
    def parse(cls, options) -> "BackendOptions":
        from graphprune.families.base import VIDEO_UNITS
        from graphprune.lower.runtime import resolve_video_unit
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
        video_unit = options.get("video_unit")
        if video_unit not in (None, *VIDEO_UNITS):
            raise PassConfigError(f'video_unit must be "frame" or "video", got {video_unit!r}')
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
        return cls(passes, compiler, mode, linear, resolve_video_unit(passes, video_unit))


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
    """Vision work of the prompt under way on this thread that no pruned prefill frame has taken yet:
    an image encoded by a compiled frame (`image`), and the merges run by frames of their own
    (`merges`: (modality, (B, S) mask, (N, D) features) each, in order; `merged`: the embeddings the
    last one returned). A decoder frame that runs while any is pending and does not take it is a
    prefill whose merge the backend did not recognise."""

    def __init__(self):
        self.clear()

    def record(self, model, modality: str, mask, features, onto, merged) -> None:
        if onto is not self.merged:              # merged into fresh embeddings: a new prompt's first merge
            self.merges = []
        self.merges.append((modality, mask, features))
        self.image, self.model, self.merged = True, model, merged

    def take(self, embeds, model) -> list | None:
        """The pending merges when `embeds` IS the tensor the last one returned (identity: the same
        prompt's embeddings, handed on unchanged); [] when none are pending, or only another model's
        (left by a run that failed on the way); None when this model's are and `embeds` is not theirs.
        Clears everything pending."""
        mine = self.merges if self.model is model else []     # `model`: the language model
        taken = [] if not mine else mine if embeds is self.merged else None
        self.clear()
        return taken

    def clear(self) -> None:
        self.image, self.merges, self.model, self.merged = False, [], None, None


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


def _ancestors(node: fx.Node, through: bool = False) -> set:
    """`node` and the nodes it is computed from, short of the frame's inputs (with them: `through`)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen or (n.op == "placeholder" and not through):
            continue
        seen.add(n)
        todo += n.all_input_nodes
    return seen


def _output_roles(gm: fx.GraphModule, layers: int, merge: fx.Node | None, embeds: int) -> list[str]:
    """Name every frame output by what the rewritten prefill graph returns: k_i, v_i or logits
    (the final hidden state: the captured body has an identity head), or the merged image features
    (Gemma 3 and PaliGemma return them as image_hidden_states). A sliding-window cache layer (Gemma 3)
    hands back a slice of its keys / values (the window's last tokens: prompts stay inside the window,
    so all of them) and its window size as a tensor: a constant_j, not computed from the prompt
    embeddings (frame input `embeds`)."""
    operands = _sdpa_operands(gm)
    prompt = list(gm.graph.find_nodes(op="placeholder"))[embeds]
    roles = []
    for o in gm.graph.find_nodes(op="output")[0].args[0]:
        role = "image_features" if merge is not None and o is merge.args[2] else None
        if role is None and isinstance(o, fx.Node):
            i = layer_of(o)
            kv = o.args[0] if o.target is operator.getitem and isinstance(o.args[0], fx.Node) else o
            if i is not None and i in operands:
                role = f"k_{i}" if kv in operands[i][0] else f"v_{i}" if kv in operands[i][1] else None
            elif i is None and "language_model" in module_path(o):
                role = "logits"
            if role is None and prompt not in _ancestors(o, through=True):
                role = f"constant_{sum(r.startswith('constant_') for r in roles)}"
        if role is None:
            raise UnsupportedModelError("torch.compile frame", "outputs of the decoder frame",
                                        f"cannot tell what output {getattr(o, 'name', o)!r} is "
                                        "(expected per-layer keys/values and the final hidden state)")
        roles.append(role)
    cache = sorted(r for r in roles if r not in ("logits", "image_features") and not r.startswith("constant_"))
    if cache != sorted(f"{kv}_{i}" for i in range(layers) for kv in "kv"):
        raise UnsupportedModelError("torch.compile frame", "KV-cache outputs", f"frame outputs {roles}")
    return roles


def _constants(gm: fx.GraphModule, roles: list[str]) -> fx.GraphModule | None:
    """A graph computing the frame's constant_j outputs (in order), run beside the pruned prefill."""
    outputs = gm.graph.find_nodes(op="output")[0].args[0]
    wanted = [o for o, r in zip(outputs, roles) if r.startswith("constant_")]
    if not wanted:
        return None
    graph, copied = fx.Graph(), {}
    graph.graph_copy(gm.graph, copied)
    graph.output(tuple(copied[o] for o in wanted))
    graph.eliminate_dead_code()
    return fx.GraphModule(gm, graph)


def _frame_outputs(named: dict, roles: list[str], constants: fx.GraphModule | None, args) -> tuple:
    if constants is not None:
        named.update((f"constant_{j}", value) for j, value in enumerate(constants(*args)))
    return tuple(named[r] for r in roles)


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
        fn = StageCall(gm, CausalChoice.of(gm, program.family.text_config(), opts.compiler))
        masked = any(t.masked for t in program.anatomy["prefill"].tokens)
        per_model[key] = Rewritten(program, opts.passes, fn, masked)
    return per_model[key]


@dataclass
class CausalChoice:
    """The rewritten prefill compiled twice, as graphprune.prune lowers it (graphprune.lower.causal):
    its attention over the captured causal mask reading that mask (`masked`), and mask-free with
    is_causal=True (`plain`: SDPA's faster kernels, the mask's construction gone). Which one runs
    depends on the mask's values, which no dynamo guard sees, so it is chosen per call on the host
    (`plain_causal`: no padding, no invalid slot, no bidirectional group, within any sliding window).
    Each compiles on its first call (a padded batch compiles the masked one)."""
    masked: object
    plain: object | None            # None: no attention reads the captured mask
    mask_at: int                    # the attention_mask input's index
    groups_at: int | None           # the attention_groups input's index (Gemma 3, PaliGemma)
    window: int | None

    @classmethod
    def of(cls, gm: fx.GraphModule, text_config, compiler: str) -> "CausalChoice":
        from graphprune.compat import sliding_window
        from graphprune.lower.causal import use_causal_kernel
        plain = fx.GraphModule(gm, gm.graph.__deepcopy__())
        plain.meta.update(gm.meta)
        names = [p.name for p in gm.graph.find_nodes(op="placeholder")]
        if not use_causal_kernel(plain, text_config, always=True):
            plain = None
        at = {n: i for i, n in enumerate(names)}
        return cls(_compiled_graph(gm, compiler), None if plain is None else _compiled_graph(plain, compiler),
                   at.get("attention_mask"), at.get("attention_groups"), sliding_window(text_config))

    def __call__(self, *args):
        from graphprune.lower.causal import plain_causal
        if self.plain is not None and plain_causal(args[self.mask_at], self.window,
                                                   None if self.groups_at is None else args[self.groups_at]):
            return self.plain(*args)
        return self.masked(*args)


def _compiled_graph(gm: fx.GraphModule, compiler: str):
    return gm if compiler == "eager" else torch.compile(gm, backend="inductor", dynamic=True)


def _prefill(owner, opts: BackendOptions, embeds, merges: list, attention_mask, positions=None,
             token_type_ids=None, lm_inputs=None) -> dict:
    """Run the rewritten prefill on merged prompt embeddings: the family lays the prompt's vision
    units out from the frames' merges (Family.frame_layout); positions are the frame's own where it
    takes them (M-RoPE), else the family's for the attention mask; `lm_inputs`: other prefill inputs
    by name (Qwen3-VL's deepstack_embeds). Outputs by name."""
    from graphprune import tokenops
    from graphprune.families.base import MODALITIES
    from graphprune.lower.runtime import _call, _Prompt, check_budgets
    # captured and rewritten on first use, outside dynamo's trace (export must not run inside it)
    rw = _rewritten(owner, opts)
    family = rw.program.family
    b, s = embeds.shape[:2]
    family.check_run_length(s)           # a sliding window (Gemma 3) must not bind: decode steps check on
    # Hugging Face's padded decode steps over the pruned caches are refused (targets/dynamo_padding.py)
    watch_decodes(family.language_model())
    if attention_mask is None:
        attention_mask = torch.ones(b, s, dtype=torch.long, device=embeds.device)
    elif bool((attention_mask == 0).any()):
        warnings.warn(PADDED, stacklevel=3)
    if positions is not None:
        positions = positions[-family.position_axes:]      # (4, B, S) leads with text positions
    videos_only = any(p.units == "videos" for p in opts.passes)       # the images stay whole, as in gp.prune
    layout = family.frame_layout(merges, positions, opts.video_unit, ("video",) if videos_only else MODALITIES)
    if layout is None:
        raise InputError("the prefill frame merges vision features but the prompt has no vision tokens")
    check_budgets(rw.program.results, layout.pos.shape[-1])
    if positions is None:
        positions = family.positions(None, attention_mask)
    index = torch.arange(s, device=embeds.device).expand(b, s)
    groups = family.attention_groups(attention_mask, token_type_ids=token_type_ids)
    lm_inputs = dict(lm_inputs or {}, **({} if groups is None else {"attention_groups": groups}))
    # M-RoPE families tell a unit's grid by image_grid_thw / video_grid_thw, which no frame shows
    grid_free = family.grid_free(layout) or ("" if family.position_axes == 1 else
                                             f"{family.model_class}'s units: the torch.compile frames show no "
                                             "image_grid_thw / video_grid_thw to tell their grids")
    # the instruction starts after the last slot any merge wrote (image_newline rows included), as in gp.prune
    placeholders = torch.stack([is_vision for _, is_vision, _ in merges]).any(0)
    prompt = _Prompt.assemble(embeds, tokenops.token_features(embeds, layout.pos), positions, attention_mask,
                              layout.pos, index, rw.passes, unit_frames=layout.frames,
                              lm_inputs=lm_inputs, grid_free=grid_free, placeholders=placeholders)
    return _call(rw.fn, **prompt.prefill_inputs())


def _taken(opts: BackendOptions, embeds, owner) -> list:
    """The merges earlier frames ran into `embeds`; a pending merge that did not reach it fails."""
    taken = _PENDING.take(embeds, _language_model(owner))
    if taken is None:
        raise PassNotApplicable(f"graphprune could not apply {', '.join(map(repr, opts.passes))}: {_UNSEEN_MERGE}")
    return taken


@dataclass
class PrunedFrame:
    """The callable dynamo runs for the frame that merges vision features and runs the decoder
    layers: the merge (after any earlier frames' merges into the same embeddings), the rewritten
    prefill graph, the frame's outputs in dynamo's order."""
    owner: torch.nn.Module
    opts: BackendOptions
    roles: list[str]
    inputs: dict[str, int]          # embeds / image_mask / image_features / attention_mask / token_type_ids /
    #                                 positions (M-RoPE position ids, where the frame takes them) -> arg index
    modality: str = "image"         # what the merge writes: images or videos
    constants: fx.GraphModule | None = None      # computes the frame's constant_j outputs

    def __call__(self, *args):
        embeds, mask = args[self.inputs["embeds"]], args[self.inputs["image_mask"]]
        feats = args[self.inputs["image_features"]].reshape(-1, embeds.shape[-1])
        b, s = embeds.shape[:2]
        merges = _taken(self.opts, embeds, self.owner) + [(self.modality, mask.reshape(b, s, -1)[..., 0], feats)]
        embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))      # the model's own merge
        named = _prefill(self.owner, self.opts, embeds, merges, _arg(args, self.inputs, "attention_mask"),
                         _arg(args, self.inputs, "positions"), _arg(args, self.inputs, "token_type_ids"))
        named["image_features"] = args[self.inputs["image_features"]].to(embeds.dtype)
        return _frame_outputs(named, self.roles, self.constants, args)


def _language_model(owner) -> torch.nn.Module:
    """What merge and decoder frames of one model share, whichever module (model or body) runs them."""
    from graphprune.families import family_of
    return family_of(owner).language_model()


def _arg(args, inputs: dict[str, int], name: str):
    return args[inputs[name]] if name in inputs else None


@dataclass
class MergeFrame:
    """A frame that merges vision features into the prompt embeddings and runs no decoder layer
    (Qwen2-VL's image and video merges, LLaVA-OneVision's image merge before its video tower): run
    as compiled, it records what it merged and the very tensor it returned, for the decoder frame
    those embeddings reach."""
    owner: torch.nn.Module
    fn: object
    inputs: dict[str, int]          # embeds / mask / features -> arg index
    merged: int | None              # which output is the merged embeddings (None: the only one)
    modality: str

    def __call__(self, *args):
        out = self.fn(*args)
        embeds = args[self.inputs["embeds"]]
        b, s = embeds.shape[:2]
        mask = args[self.inputs["mask"]].reshape(b, s, -1)[..., 0]
        feats = args[self.inputs["features"]].reshape(-1, embeds.shape[-1])
        _PENDING.record(_language_model(self.owner), self.modality, mask, feats, onto=embeds,
                        merged=out if self.merged is None else out[self.merged])
        return out


def _prune_frame(gm: fx.GraphModule, merge: fx.Node, held: set[int], opts: BackendOptions) -> PrunedFrame | None:
    """`held`: the decoder layers the frame runs (`_lm_layers`); all of them, or nothing is pruned."""
    from graphprune.families import family_of
    owner = _owner("the module running the decoder layers")
    layers = family_of(owner).language_model().config.num_hidden_layers
    if held != set(range(layers)):
        _not_applied(opts, f"the frame merging image features holds decoder layers {sorted(held)} "
                           f"of 0..{layers - 1}: a graph break splits the language model")
        return None
    roles = _output_roles(gm, layers, merge, _placeholder_index(gm, merge.args[0], "prompt embeddings"))
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    merged = placeholders[_placeholder_index(gm, merge.args[2], "merged features")].name
    videos, positions = _video_inputs(gm), _positions_input(gm)
    if videos and (videos != [merged] or (positions is None and not family_of(owner).frame_video_tokens())):
        _not_applied(opts, _VIDEO.format(videos))
        return None
    inputs = {"embeds": _placeholder_index(gm, merge.args[0], "prompt embeddings"),
              "image_mask": _placeholder_index(gm, merge.args[1], "image-token mask"),
              "image_features": _placeholder_index(gm, merge.args[2], "image features")}
    for name in ("attention_mask", "token_type_ids"):
        if _input_index(gm, name) is not None:
            inputs[name] = _input_index(gm, name)
    if positions is not None:
        inputs["positions"] = positions
    return PrunedFrame(owner, opts, roles, inputs, "video" if videos else "image", _constants(gm, roles))


def _merge_frame(gm: fx.GraphModule, merge: fx.Node, compiled, opts: BackendOptions):
    """A frame merging vision features with no decoder layer: a MergeFrame, when the frame's module
    is known (the model whose decoder frame may take the merge) and the merged embeddings leave it as
    they are (that decoder frame is then told by identity)."""
    try:
        owner = _owner("the module merging image features")
    except (UnsupportedModelError, AttributeError):
        # a resumed function (Idefics3's merge, transformers 5) or a bare graph: no model to hand the
        # merge to, and the decoder frame it reaches may not show itself as one
        _not_applied(opts, "a graph break separates the image-feature merge from the decoder layers, in a frame "
                           "with no module to tell which model's decoder frame takes it")
        return compiled
    result = gm.graph.find_nodes(op="output")[0].args[0]
    single = isinstance(result, fx.Node)          # a bare graph's single output (dynamo's frames return tuples)
    outputs = [result] if single else list(result)
    if merge not in outputs:
        _not_applied(opts, "a graph break separates the image-feature merge from the decoder layers, and the merged "
                           "embeddings leave the merge frame through another op")
        return compiled
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    features = _placeholder_index(gm, merge.args[2], "merged features")
    inputs = {"embeds": _placeholder_index(gm, merge.args[0], "prompt embeddings"),
              "mask": _placeholder_index(gm, merge.args[1], "vision-token mask"), "features": features}
    modality = "video" if "video" in placeholders[features].name else "image"
    return MergeFrame(owner, compiled, inputs, None if single else outputs.index(merge), modality)


def _family_supported(opts: BackendOptions, owner=None) -> bool:
    """The frame merging image features (or the decoder frame `owner` runs, taking merges of frames
    with no module behind them) belongs to a family graphprune reads and this backend can prune; else
    say so (unknown, refused and compile-refused families), before any diagnosis of the frame's graph."""
    from graphprune.families import family_of
    if owner is None:
        try:
            owner = _owner("the module merging image features")
        except (UnsupportedModelError, AttributeError):
            # no module behind the frame (a resumed function, or the backend called on a bare graph,
            # outside dynamo's trace): no family to read here; the decoder frame taking its merge checks
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


_VIDEO = ("the prompt has videos (frame inputs {}) reaching the frame that runs the decoder layers unmerged, "
          "or of a family whose merge frame does not show the video frames (Family.frame_video_tokens)")


def _video_inputs(gm: fx.GraphModule) -> list[str]:
    return [p.name for p in gm.graph.find_nodes(op="placeholder") if "video" in p.name]


def _not_applied(opts: BackendOptions, why: str) -> None:
    _PENDING.clear()                 # this image is reported: a later text-only prompt owes nothing
    msg = (f"graphprune could not apply {', '.join(map(repr, opts.passes))}: {why}. The model would run "
           "unpruned; use graphprune.prune(model, ...) instead")
    if opts.if_not_applied == "raise":
        raise PassNotApplicable(msg)
    warnings.warn(msg, stacklevel=3)


def _compile(gm: fx.GraphModule, example_inputs, opts: BackendOptions):
    """A frame as captured (no pass applies to it), lowered as graphprune.prune lowers its graphs:
    with linear="packed", its linears on oneDNN-packed weights (the vision tower's too)."""
    if opts.linear == "packed":
        from graphprune.targets.packed_linear import pack_frame_linears
        pack_frame_linears(gm, example_inputs)
    if opts.compiler == "eager":
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
    if opts.compiler != "eager":          # a model pruned through per-layer frames: eager only, say so at once
        from torch._dynamo.symbolic_convert import InstructionTranslator

        from graphprune.targets.dynamo_layers import check_compiler, layered_family
        tx = InstructionTranslator.current_tx()
        family = layered_family(tx.f_locals.get("self") if tx is not None else None)
        if family is not None:
            check_compiler(family, opts)
    merge, layers, vision = _image_merge(gm), _lm_layers(gm), _encodes_image(gm)
    if merge is None and layers and vision:
        _not_applied(opts, _UNSEEN_MERGE)
    if merge is not None:
        if not _family_supported(opts):
            return _compile(gm, example_inputs, opts)
        if not layers:
            return _merge_frame(gm, merge, _compile(gm, example_inputs, opts), opts)
        frame = _prune_frame(gm, merge, layers, opts)
        if frame is not None:
            return frame
    if not layers and merge is None:      # a vision tower's frame: its layers past the feature layer deferred
        from graphprune.targets.dynamo_vision import deferring_frame
        frame = deferring_frame(gm, lambda head: _compile(head, example_inputs, opts), _ancestors)
        if frame is not None:
            return VisionFrame(frame) if vision else frame
    compiled = _compile(gm, example_inputs, opts)
    if vision and not layers:
        return VisionFrame(compiled)
    if not layers and merge is None:      # a decoder layer or final norm run as a frame of its own?
        from graphprune.targets.dynamo_layers import layer_frame
        frame = layer_frame(gm, compiled, opts, _layers_backend())
        if frame is not None:
            return frame
    if layers:            # a decode step, a text-only prompt, or the prefill of merges made by earlier frames
        # the frame's module is the whole model (no graph break without an image) or its body
        owner = _owner("the module running the decoder layers")
        inputs = {"embeds": _input_index(gm, "inputs_embeds"), "attention_mask": _input_index(gm, "attention_mask"),
                  "positions": _positions_input(gm)}
        return DecodeFrame(owner, compiled, {k: v for k, v in inputs.items() if v is not None}, opts, gm, layers)
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
        compiling = _compiling_for_graphprune()
        exceeded, limit = _decide_raised(decide, compiling, *args, **kwargs)
        if exceeded and compiling:
            _refuse_fallback(str(limit))
        return exceeded, limit

    exceeds_recompile_limit.graphprune_watch = True
    convert_frame.exceeds_recompile_limit = exceeds_recompile_limit
    return True


def _layers_backend():
    """What targets/dynamo_layers.py's frames use of this module, handed in (it does not import it)."""
    from graphprune.targets.dynamo_layers import Backend
    return Backend(pending=_PENDING, prefill=_prefill, unseen_merge=lambda opts: _not_applied(opts, _UNSEEN_MERGE),
                   check_decode=check_decode, owner=_owner, ancestors=_ancestors)


def _decide_raised(decide, compiling: bool, *args, **kwargs):
    """dynamo's decision, with recompile_limit raised for this one frame where a model dynamo runs
    layer by layer calls it from its language model (each decoder layer's frame compiles for prefill
    and decode: targets/dynamo_layers.py)."""
    from graphprune.targets.dynamo_layers import recompile_limit
    raised = recompile_limit() if compiling else None
    config = torch._dynamo.config
    before = config.recompile_limit
    if raised is None or raised <= before:
        return decide(*args, **kwargs)
    config.recompile_limit = raised
    try:
        return decide(*args, **kwargs)
    finally:
        config.recompile_limit = before


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


def _positions_input(gm: fx.GraphModule) -> int | None:
    """Index of the frame input holding M-RoPE position ids ((axes, B, S) integers reaching the
    rotary embedding); None when the frame has none (it builds 1-D positions itself)."""
    for i, p in enumerate(gm.graph.find_nodes(op="placeholder")):
        value = p.meta.get("example_value")
        if not isinstance(value, torch.Tensor) or value.dim() != 3 or value.is_floating_point():
            continue
        seen, todo = set(), [p]
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            if "rotary_emb" in module_path(n):
                return i
            seen.add(n)
            todo += list(n.users)
    return None


@dataclass
class DecodeFrame:
    """A frame running the decoder layers without an image merge. When its inputs_embeds IS what
    earlier merge frames returned (Qwen2-VL: merge, get_rope_index's graph breaks, then this frame),
    it is their prompt's prefill and runs pruned. Otherwise, a decode step or a text-only prompt, it
    runs as captured: Hugging Face's cache then holds each layer's kept tokens, and with no padding a
    one-token step attends to all of them, which is exactly graphprune's decode. What HF's cache
    cannot express is refused here, loudly: key masks of static-capacity passes, and padding (its
    mask has one column per prompt token)."""
    owner: torch.nn.Module
    fn: object
    inputs: dict[str, int]          # embeds / attention_mask / positions -> arg index
    opts: BackendOptions
    gm: fx.GraphModule              # the frame's graph: its outputs are named when it is a prefill
    held: set[int]                  # the decoder layers it runs

    def __call__(self, *args):
        image = _PENDING.image
        merges = _PENDING.take(_arg(args, self.inputs, "embeds"), _language_model(self.owner))
        if merges:
            return self._prefill(merges, args)
        if image or merges is None:      # an encoded image, and this prefill did not merge it pruned
            _not_applied(self.opts, _UNSEEN_MERGE)
        check_decode(self.owner, _arg(args, self.inputs, "attention_mask"))
        return self.fn(*args)

    def _prefill(self, merges: list, args):
        from graphprune.families import family_of
        if not _family_supported(self.opts, self.owner):
            return self.fn(*args)
        layers = family_of(self.owner).language_model().config.num_hidden_layers
        if self.held != set(range(layers)):
            _not_applied(self.opts, f"the frame the merged embeddings reach holds decoder layers {sorted(self.held)} "
                                    f"of 0..{layers - 1}: a graph break splits the language model")
            return self.fn(*args)
        named = _prefill(self.owner, self.opts, args[self.inputs["embeds"]], merges,
                         _arg(args, self.inputs, "attention_mask"), _arg(args, self.inputs, "positions"))
        roles = _output_roles(self.gm, layers, None, self.inputs["embeds"])
        return _frame_outputs(named, roles, _constants(self.gm, roles), args)


def check_decode(owner, mask) -> None:
    """Refuse a decode step (or text-only prompt) of a model the backend pruned that Hugging Face's
    cache cannot run as graphprune would: `mask` (B, keys) its padding mask, where the frame has one."""
    from graphprune.families import family_of
    pruned = list(_PROGRAMS.get(family_of(owner).language_model(), {}).values())
    if any(rw.masked for rw in pruned):
        raise PassNotApplicable("decoding after a static-capacity pass (masked slots) needs graphprune's "
                                "per-layer key masks, which Hugging Face's cache cannot carry; use "
                                "graphprune.prune(model, ...).generate(...)")
    if any(rw.graph_module.meta.get("graphprune_decode_positions") for rw in pruned):
        raise PassNotApplicable("decoding after positions='compact' between LLM layers gives each layer its own "
                                "positions (its cache length), which Hugging Face's decode cannot; use "
                                "graphprune.prune(model, ...).generate(...)")
    if pruned and mask is not None:
        refuse_padded(mask)
        family_of(owner).check_run_length(mask.shape[-1])    # prompt + tokens so far, this one


def pruned_graphs(model: torch.nn.Module) -> list[fx.GraphModule]:
    """The rewritten prefill graphs the backend built for `model` (one per pipeline and compiler)."""
    return [rw.graph_module for m in model.modules() for rw in _PROGRAMS.get(m, {}).values()]


_WATCHING = _watch_fallbacks()
