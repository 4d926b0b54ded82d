"""The torch.compile backend for families whose language model dynamo runs layer by layer
(`Family.layer_frames`: Qwen3-VL, whose DeepStack write `hidden_states[visual_pos_masks, :] = ...`
stops dynamo from tracing the language model's forward). Dynamo then runs that forward eagerly and
hands the backend one frame per decoder layer and one for the final norm; the image / video merges
run in frames of their own before it (targets/dynamo.py's MergeFrame records them).

* Layer 0's frame, when its hidden states ARE the embeddings the recorded merges returned (identity,
  as targets/dynamo.py's DecodeFrame tells a prefill), runs graphprune's whole pruned prefill. What
  the rewritten graph needs beside the embeddings and the merges is not among that frame's inputs
  (it takes the rotary tables and the 4-D mask), so it is read from the language model's forward,
  the eager Python frame calling the layer: its M-RoPE `position_ids` and DeepStack's
  `visual_pos_masks` / `deepstack_visual_embeds`; the padding mask is the last row of the 4-D mask
  (every real key of a left-padded prompt is visible to its last token). The frame returns its
  input hidden states unchanged (what the later layer frames get is not used) and layer 0's kept
  keys / values, which dynamo writes into Hugging Face's cache.
* Layers 1.. return the prefill's kept keys / values the same way, each in turn, and the final norm's
  frame returns the pruned final hidden state, so the head computes the kept tokens' logits.
* Any other run of these frames (decode steps, text-only prompts) goes as compiled, after the checks
  targets/dynamo.py's DecodeFrame makes on a decode step.
"""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx, nn

from graphprune.errors import InputError, PassConfigError, UnsupportedModelError


@dataclass(frozen=True)
class Backend:
    """What the layer frames use of the backend's state and helpers. targets/dynamo.py hands it to
    `layer_frame`, so this module does not import it (it imports this one)."""
    pending: object                 # the recorded image / video merges (dynamo._PENDING)
    prefill: Callable               # runs the pruned prefill for recorded merges (dynamo._prefill)
    unseen_merge: Callable          # (opts): an encoded image this prefill did not merge, refused or warned
    check_decode: Callable          # (body, key mask): the checks every decode step gets
    owner: Callable                 # (what): the frame's module, guarded on its identity
    ancestors: Callable             # (node): the nodes it is computed from


@dataclass(frozen=True)
class LayeredModel:
    body: nn.Module                 # the module whose family reads the model (what the prefill is captured from)
    lm: nn.Module                   # its language model, whose forward runs eagerly
    layers: int


def layered_model(module: nn.Module) -> LayeredModel | None:
    """The model of a `layer_frames` family whose language model's eager forward is on the Python
    stack (dynamo compiles a layer's frame while that forward, and the model's forward above it, are
    being run) and holds `module` as a decoder layer or its final norm; None when there is none."""
    from graphprune.families import family_of
    frame, lm = sys._getframe(1), None
    while frame is not None:
        owner = frame.f_locals.get("self") if frame.f_code.co_name == "forward" or lm is not None else None
        if isinstance(owner, nn.Module) and owner is not module:
            if lm is None and _holds(owner, module):
                lm = owner
            elif lm is not None and owner is not lm:
                try:
                    family = family_of(owner)
                    if family.layer_frames and family.language_model() is lm:
                        return LayeredModel(family.body(), lm, len(lm.layers))
                except (UnsupportedModelError, AttributeError):
                    pass
        frame = frame.f_back
    return None


def _holds(lm: nn.Module, module: nn.Module) -> bool:
    """`lm` is a language model (decoder layers and a final norm) holding `module` as one of those."""
    layers = getattr(lm, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        return False
    return getattr(lm, "norm", None) is module or any(layer is module for layer in layers)


def layered_family(frame_self=None):
    """The family of a `layer_frames` model that is running: `frame_self` (the module of the frame
    dynamo compiles) or the module of a method on the Python stack (its forward, generate); None."""
    from graphprune.families import family_of
    frame, owner = sys._getframe(1), frame_self
    while True:
        if isinstance(owner, nn.Module) and getattr(owner, "config", None) is not None:
            try:
                family = family_of(owner)
                if family.layer_frames:
                    return family
            except (UnsupportedModelError, AttributeError):
                pass
        if frame is None:
            return None
        owner, frame = frame.f_locals.get("self"), frame.f_back


def recompile_limit() -> int | None:
    """The recompile limit a frame run under a layered model needs: each decoder layer's frame
    compiles for the prefill and again for decode steps, and the code Hugging Face's decorators share
    (deprecate_kwarg's wrapper) compiles once per decorated function and shape, so 2 x layers plus
    dynamo's usual margin."""
    family = layered_family()
    return None if family is None else 2 * len(family.language_model().layers) + 8


class _Prefilled(threading.local):
    """The pruned prefill of the prompt under way on this thread: its outputs by name, and the next
    layer frame (then the norm frame) that takes them."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.lm, self.named, self.next = None, None, 0


_PREFILLED = _Prefilled()


def _input(gm: fx.GraphModule, *names: str) -> int | None:
    for i, p in enumerate(gm.graph.find_nodes(op="placeholder")):
        if any(p.name.startswith(f"l_{name}") for name in names):
            return i
    return None


def _layer_roles(gm: fx.GraphModule, ancestors: Callable) -> list[str]:
    """Each output of a decoder layer's frame: "k" / "v" (the cache's keys / values, feeding its
    attention's keys / values; dynamo writes them back into Hugging Face's cache after the frame) or
    "hidden" (the layer's output)."""
    sdpa = [n for n in gm.graph.nodes if n.target is torch.nn.functional.scaled_dot_product_attention]
    outputs = gm.graph.find_nodes(op="output")[0].args[0]
    if len(sdpa) == 1:
        keys, values = ancestors(sdpa[0].args[1]), ancestors(sdpa[0].args[2])
        roles = ["k" if o in keys else "v" if o in values else "hidden" for o in outputs]
        if sorted(roles) == ["hidden", "k", "v"]:
            return roles
    raise UnsupportedModelError("torch.compile frame", "outputs of a decoder layer's frame",
                                f"expected one attention and its output, keys and values; got {len(sdpa)} "
                                f"attention calls, outputs {[getattr(o, 'name', o) for o in outputs]}")


def check_compiler(family, opts) -> None:
    """Only compiler="eager" runs these frames: with Inductor each decoder layer's frame would be compiled
    beside the prefill it never runs for a prompt (layer 0's frame runs the whole pruned prefill), and that
    combination is untested; refused at the model's first frame, before any work."""
    if opts.compiler != "eager":
        raise PassConfigError(f"{family.model_class}: dynamo runs its language model one decoder layer per frame "
                              "(DeepStack), which the graphprune backend prunes with compiler=\"eager\" only "
                              "(Inductor on those frames is not supported); pass options={..., \"compiler\": \"eager\"} "
                              "or use graphprune.prune(model, ...)")


def layer_frame(gm: fx.GraphModule, compiled, opts, backend: Backend):
    """The callable for a frame of a layered model's decoder layer or final norm; None when the
    frame is neither (or not of such a model)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator
    tx = InstructionTranslator.current_tx()
    module = tx.f_locals.get("self") if tx is not None else None
    found = layered_model(module) if isinstance(module, nn.Module) else None
    if found is None:
        return None
    backend.owner("the decoder layer")                  # guards the frame on this module: another model recompiles
    if module is found.lm.norm:
        return NormFrame(found, compiled)
    index = next(i for i, layer in enumerate(found.lm.layers) if layer is module)
    hidden = _input(gm, "args_0_", "hidden_states")
    if hidden is None:
        raise UnsupportedModelError(type(found.body).__name__, "decoder layer frame input",
                                    "no hidden-states input among " +
                                    str([p.name for p in gm.graph.find_nodes(op="placeholder")]))
    return LayerFrame(found, index, compiled, opts, backend, _layer_roles(gm, backend.ancestors), hidden,
                      _input(gm, "kwargs_attention_mask_", "attention_mask_"))


def _key_mask(mask: torch.Tensor | None, b: int, s: int, device) -> torch.Tensor:
    """(B, keys) 1 where a key is real, from a layer's 4-D attention mask (bool: True attends; float:
    0 attends): its last query row, which sees every real key; None: no padding."""
    if mask is None:
        return torch.ones(b, s, dtype=torch.long, device=device)
    if mask.dim() != 4:
        raise UnsupportedModelError("torch.compile frame", "decoder layer attention mask",
                                    f"expected a (B, 1, queries, keys) mask, got {tuple(mask.shape)}")
    row = mask[:, 0, -1]
    return (row if row.dtype == torch.bool else row == 0).long()


def _lm_locals(lm: nn.Module) -> dict:
    """The locals of the language model's eager forward calling this layer frame."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "forward" and frame.f_locals.get("self") is lm:
            return frame.f_locals
        frame = frame.f_back
    raise UnsupportedModelError(type(lm).__name__, "language model forward",
                                "its decoder layer frame was not called from it")


def _deepstack(local: dict, embeds: torch.Tensor, levels: int) -> torch.Tensor:
    """(levels, B, S, D) DeepStack features at the vision tokens, zero elsewhere, from the language
    model's visual_pos_masks and deepstack_visual_embeds."""
    dense = embeds.new_zeros(levels, *embeds.shape)
    at, feats = local.get("visual_pos_masks"), local.get("deepstack_visual_embeds")
    if feats is None:
        return dense
    if len(feats) != levels:
        raise InputError(f"{len(feats)} DeepStack feature levels for {levels} DeepStack layers")
    for level, rows in enumerate(feats):
        dense[level][at.to(embeds.device)] = rows.to(embeds.device, embeds.dtype)
    return dense


@dataclass
class LayerFrame:
    model: LayeredModel
    index: int                      # which decoder layer
    fn: object
    opts: object
    backend: Backend
    roles: list[str]                # "hidden" / "k" / "v" per output
    hidden: int                     # arg index of the layer's hidden states
    mask: int | None                # arg index of its 4-D attention mask (None: the frame takes none)

    def __call__(self, *args):
        if self.index == 0:
            return self._first(args)
        if _PREFILLED.lm is self.model.lm and _PREFILLED.next == self.index:
            _PREFILLED.next += 1
            return self._outputs(args)
        return self.fn(*args)

    def _outputs(self, args) -> tuple:
        kv = {"hidden": args[self.hidden], "k": _PREFILLED.named[f"k_{self.index}"],
              "v": _PREFILLED.named[f"v_{self.index}"]}
        return tuple(kv[role] for role in self.roles)

    def _first(self, args):
        from graphprune.families import family_of
        backend = self.backend
        _PREFILLED.clear()
        embeds = args[self.hidden]
        mask = None if self.mask is None else args[self.mask]
        image = backend.pending.image
        merges = backend.pending.take(embeds, self.model.lm)
        if merges:
            b, s = embeds.shape[:2]
            local = _lm_locals(self.model.lm)
            family = family_of(self.model.body)
            lm_inputs = {"deepstack_embeds": _deepstack(local, embeds, len(family.deepstack_layers()))}
            named = backend.prefill(self.model.body, self.opts, embeds, merges, _key_mask(mask, b, s, embeds.device),
                               local.get("position_ids"), lm_inputs=lm_inputs)
            _PREFILLED.lm, _PREFILLED.named, _PREFILLED.next = self.model.lm, named, 1
            return self._outputs(args)
        if image or merges is None:       # an encoded image, and this prefill did not merge it pruned
            backend.unseen_merge(self.opts)
        if mask is not None:
            backend.check_decode(self.model.body, _key_mask(mask, *embeds.shape[:2], embeds.device))
        return self.fn(*args)


@dataclass
class NormFrame:
    """The language model's final norm: after a pruned prefill, its output is the prefill's final
    (normed) hidden state over the kept tokens."""
    model: LayeredModel
    fn: object

    def __call__(self, *args):
        if _PREFILLED.lm is self.model.lm and _PREFILLED.next == self.model.layers:
            hidden = _PREFILLED.named["logits"]
            _PREFILLED.clear()
            return (hidden,)
        return self.fn(*args)
