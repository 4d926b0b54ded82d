"""The pass-authoring API: what a token-pruning method declares.

A method is a `TokenPass` subclass with a typed `Config` dataclass and a `plan()` that says
  where        stage ("vision" | "prefill") and `layer`: the first layer that runs on the
               reduced sequence (prefill; 0: the selection acts on the LLM's input embeddings, from
               signals that exist before layer 0); vision passes act on the features entering the projector
  signals      what it looks at: AttentionRows, Keys, Values, Hidden, InputEmbeds, Projected, TextMask,
               TextEmbeds, SequenceIndex, Frames, AttendTogether, CropNeighbours, CropTiles, CropOf
               (extracted from the graph by graphprune)
  score        a plain torch function of the signals -> (B, images, tokens) scores; recorded
               into the graph as nodes
  select       the selection rule: TopK(keep), Choose(keep, fn), Protect(keep), WithdrawAll()
               or KeepCache (a cache rule: shallow layers' KV cut to the final kept set)
  positions    "keep" (kept tokens keep their position ids) or "compact" (renumbered)
The framework inserts the nodes, rewires every downstream use (hidden states, rotary cos/sin,
masks, sequence sizes, cache writes) and verifies the graph. Passes never see model classes.

Conventions, shared by every pass:
  * layers are 0-indexed; `layer=K` is the first decoder layer that runs on the reduced
    sequence, so layers 0..K-1 see every token and a signal "of layer K-1" is available;
  * `keep` counts retained vision tokens per image (int), or a fraction of them (float);
    text tokens are never counted or dropped.
  * signals are per image: vision tokens (B, images, tokens, ...); text tokens are the
    instruction after the last image, (B, T, ...), padded: TextMask says which are real;
  * protected tokens (a key set marked by Protect) survive every later rule.
Semantics of every built-in method: docs/methods.md.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Callable, ClassVar

from graphprune.errors import PassConfigError

# -- signals: what a pass looks at --------------------------------------------------------------


LAST_VISION_LAYER = "last"   # a vision signal's layer: the encoder's last layer, even past the feature layer


@dataclass(frozen=True)
class AttentionRows:
    """Head-averaged attention that chosen queries pay the vision (or text) tokens in `layer`.

    query: "last" (last prompt token, FastV), "cls" (vision encoder CLS token), "text" (every
    instruction token; padded rows are zero) or, in the vision encoder, "all": the attention each
    token receives, averaged over every encoder query (CLS included) as well as over heads, one row;
    where a feature token merges several encoder patches (Qwen's 2x2 merge) it is the mean over its
    patches (VisionZip's score for towers without CLS). keys: "vision" -> (B, n_queries, images, tokens),
    "text" -> (B, n_queries, T). Recomputed from that layer's post-RoPE q and k for the chosen
    rows only; the layer's own attention stays fused SDPA. Vision passes on the features may give
    layer=LAST_VISION_LAYER: the encoder's last layer, which LLaVA (features from layer -2) never uses;
    the pipeline then captures the vision stage through it.
    """
    layer: int | str
    query: str = "last"
    keys: str = "vision"


@dataclass(frozen=True)
class Keys:
    """Post-RoPE keys in `layer`, heads concatenated: vision (B, images, tokens, H*d) or text (B, T, H*d)."""
    layer: int
    tokens: str = "vision"


@dataclass(frozen=True)
class AttendTogether:
    """Vision encoder: (B, images, tokens, tokens) bool, whether two vision tokens attend to each other in
    encoder layer `layer`: all True in a full-attention block, the same window in a windowed one
    (Qwen2.5-VL); where a token is a group of patches (Qwen's 2x2 merge), whether all their patches do.
    For rules that combine tokens (ToMe) and must not join tokens the encoder keeps apart. None on anyres
    images (several crops, each its own encoder sequence): two tokens attend together exactly when they are
    patches of one crop, which CropOf says in O(tokens)."""
    layer: int


@dataclass(frozen=True)
class Values:
    """Values (cache entries) in `layer`, heads concatenated, like Keys."""
    layer: int
    tokens: str = "vision"


@dataclass(frozen=True)
class Hidden:
    """Output hidden states of `layer`: vision (B, images, tokens, D) or text (B, T, D).

    norm=True applies the model's final norm (the one before the LM head) to them. Where a vision token
    is a group of encoder patches (Qwen's 2x2 merge): inside the encoder its patches' states concatenated
    (B, images, tokens, group x D); at the last layer what enters the merger's MLP.
    """
    layer: int
    tokens: str = "vision"
    norm: bool = False


@dataclass(frozen=True)
class InputEmbeds:
    """Prefill only: the language model's input embeddings (what enters layer 0) of the prompt's
    original tokens, whatever was selected since: every vision token (B, images, tokens, D) or the
    instruction (B, T, D). For rules fixed before the first layer (SparseVLM's text raters)."""
    tokens: str = "vision"


@dataclass(frozen=True)
class SequenceIndex:
    """Prefill: each token's index in its sample's current sequence, counted from the sample's first
    real token (left padding excluded), as a batch-1 implementation numbers it: vision (B, images,
    tokens) or text (B, T)."""
    tokens: str = "vision"


@dataclass(frozen=True)
class Frames:
    """Prefill: (B, units) how many frames each vision unit holds: T for a whole video (a unit per
    video, prune(video_unit="video")), 1 for an image or a single frame. A unit's tokens are its
    frames' equal token grids in order, so a token's patch in the previous frame sits tokens / T before it."""


@dataclass(frozen=True)
class CropNeighbours:
    """Vision stage: each current vision token's window x window neighbours on its own crop's patch grid,
    (images, 1, tokens, window^2 - 1) token indices in grid_neighbours' offset order, -1 where that patch is
    off the crop or no token (unpadded away, or pruned). None where a unit is one patch grid (no crops)."""
    window: int = 3


@dataclass(frozen=True)
class CropTiles:
    """Vision stage: each image's window x window tiles of its crops' patch grids, (images, 1, tiles, window^2)
    token indices, each tile's tokens in raster order first, then -1 (a patch unpadded away, or pruned, is no
    token); tiles crop after crop, raster order within a crop. Where a unit is one grid of tokens that are patch
    groups (Qwen's 2 x 2): that grid's tiles (it may be oblong), none crossing an attention window of the encoder
    layers from the selection on (each window tiled on its own). None where a unit is one patch grid of single
    patches (the pass tiles it itself)."""
    window: int = 3


@dataclass(frozen=True)
class CropOf:
    """Vision stage, anyres images (a unit of several crops, each its own encoder sequence): (images, 1, tokens,
    2) long, each vision token's crop (its encoder sequence, in the unit's crop order) and that sequence's leading
    tokens before its patches (1: CLS, 0: none). A crop's tokens come in its raster order (the packing lays each
    crop's unpadded rows out in order). None where a unit is one encoder sequence."""


@dataclass(frozen=True)
class Projected:
    """The projector's output at each image's tokens, (images, 1, tokens, D) (the LLM-space vision
    tokens). Plans reading it act after the projector (Plan.after_projector). Where the vision stage runs
    eagerly the pipeline runs such a plan at LLM layer 0, where this is the input embeddings of the
    current vision tokens, (B, units, tokens, D)."""


@dataclass(frozen=True)
class TextMask:
    """(B, T) bool: which text slots are real instruction tokens (the rest is padding)."""


@dataclass(frozen=True)
class TextEmbeds:
    """The LLM input embeddings of each image's instruction, (images, T, D); at LLM layer 0 (a vision
    plan run there, see Projected) the sample's instruction (B, T, D): index it [:, None] to broadcast."""


# -- selection rules -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TopK:
    """Keep the `keep` highest-scoring vision tokens of each image (int count or float fraction)."""
    keep: int | float


@dataclass(frozen=True)
class WithdrawAll:
    """Remove every vision token (VTW)."""


@dataclass(frozen=True)
class Choose:
    """The pass picks the tokens itself: `fn(k=..., protected=..., valid=..., vision_pos=..., **signals)`.

    fn returns `picked` (B, images, k) ascending local indices of the kept vision tokens (with
    ordered=True: in the order the kept tokens then take in the sequence), or a
    dict with `picked` and optionally `values` (B, images, k, D) that replace the kept tokens'
    hidden states (merging), `sizes` (B, images, k) (sized=True: size-weighted merging, ToMe) and
    `valid` (B, images, k) bool (static capacity: invalid slots are
    masked as keys from then on). `keep=None`: the count is data dependent (exact thresholds,
    eager only). fn is recorded as one node of the graph, named after it; it must be a
    module-level function so the graph prints and exports.
    """
    keep: int | float | None
    fn: Callable
    options: tuple = ()            # (name, value) pairs passed to fn as keywords: the method's config
    static_mask: bool = False      # fn may return `valid`: later attention must mask invalid slots
    ordered: bool = False          # vision stage, compact positions: the kept tokens take the order of `picked`
    merges: bool = False           # fn may return `values`: the kept slots then no longer hold their own tokens
    sized: bool = False            # fn also receives `sizes` (B, images, tokens) float, how many original tokens
                                   # each token stands for (None: all 1), and may return `sizes` of its picks
    proportional: bool = False     # sized, vision stage: later encoder attention adds log(size) of each key to
                                   # its logits (ToMe's proportional attention)
    masks_on_crops: bool = False   # vision stage, anyres images inside the encoder (positions='keep'): fn keeps
                                   # every slot where it is and returns `valid` (False: merged away), as a static
                                   # choice of keep=1.0 does; elsewhere its picks shrink the sequence as usual
    masked_per_crop: Callable | None = None   # masks_on_crops: how many of a crop's n valid tokens fn marks
                                   # invalid, a function of n alone (ToMe's merge count); the crops' encoder
                                   # sequences then drop the merged-away slots (rewrite.crop_rows)


@dataclass(frozen=True)
class Protect:
    """Mark each image's `keep` highest-scoring vision tokens as protected; drop nothing.

    keep: int count, or float fraction: ceil(fraction x the image's valid tokens)."""
    keep: int | float


@dataclass(frozen=True)
class KeepCache:
    """Cut the KV caches of layers first..last-1 to the tokens that survive to layer `last`."""
    first: int
    last: int


@dataclass
class Plan:
    select: TopK | Choose | Protect | WithdrawAll | KeepCache
    layer: int | None = None       # prefill: first reduced layer; vision: encoder layer (None: features)
    signals: dict = field(default_factory=dict)
    score: Callable | None = None
    positions: str = "keep"
    after_projector: bool = False  # vision passes: act on the projector output instead of its input


@dataclass
class PassResult:
    """What a pass did: the rewritten graph and a record for reports and debugging."""
    graph_module: object
    modified: bool
    info: dict = field(default_factory=dict)


class TokenPass:
    """Base class of token passes. Subclasses set name, stage, Config and implement plan()."""
    name: ClassVar[str]
    stage: ClassVar[str] = "prefill"
    # vision passes selecting inside an encoder whose patches merge in groups after its last layer (Qwen's
    # 2x2): True when the pass keeps or merges whole groups (its tokens there are the groups; values it
    # returns hold a group's patches concatenated), so that every patch of a group stays with it
    whole_groups: ClassVar[bool] = False
    Config: ClassVar[type]
    # what a unit (one `keep` budget) is: "any" (images, and video frames or whole videos as
    # prune(video_unit=...) says) or "videos" (whole videos only: the prompt's images are not units,
    # so the pass leaves them whole, and prune() counts video per video)
    units: ClassVar[str] = "any"

    def __init__(self, config=None, **options):
        if config is None:
            try:
                config = self.Config(**options)
            except TypeError as e:
                fields = ", ".join(f.name for f in dataclasses.fields(self.Config))
                raise PassConfigError(f"{self.name}: {e}. Options are: {fields}") from None
        elif options or not isinstance(config, self.Config):
            raise PassConfigError(f"{self.name}: give either config={self.name}.Config(...) or options, got "
                                  f"config={config!r} and options {sorted(options)}")
        self.config = config
        check_option_types(self.name, config)
        try:
            self.validate()
        except TypeError as e:          # a value of a type validate() did not foresee
            raise PassConfigError(f"{self.name}: invalid options {config!r}: {e}") from None

    def validate(self) -> None:
        """Check options that need no model (budgets, ranges). Raise PassConfigError."""
        keep = getattr(self.config, "keep", None)
        if keep is not None:
            check_budget(self.name, keep)
        elif any(f.name == "keep" and f.default is not None for f in dataclasses.fields(self.config)):
            raise PassConfigError(f"{self.name}: keep=None: give the vision tokens to keep per image (int) "
                                  "or a fraction of them (float)")
        layer = getattr(self.config, "layer", None)
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise PassConfigError(f"{self.name}: layer must be an int, got {layer!r}")

    def plan(self) -> Plan | list[Plan]:
        """One Plan, or several (one per layer) applied in order."""
        raise NotImplementedError

    def requires(self, anatomy) -> None:
        """Check that the model has what the method needs; raise PassNotApplicable if not."""

    def check_prompt(self, prompt) -> None:
        """Check a prompt's layout (vision_pos, text_mask, ...) before it runs; raise InputError if
        the method cannot handle it (e.g. too few instruction tokens for its pivots)."""

    def __repr__(self):
        args = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config))
        return f"{self.name}({args})"


def _accepts(hint, value) -> bool:
    """Whether an option value fits its Config annotation (bool is not a number; a float option
    takes ints; a tuple option takes a list or a single int, which validate() turns into a tuple)."""
    if hint is typing.Any:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    if hint in (tuple, list) or typing.get_origin(hint) in (tuple, list):
        return isinstance(value, (tuple, list, int))
    return isinstance(value, hint) if isinstance(hint, type) else True


def check_option_types(name: str, config) -> None:
    """Every option of a pass config against the type its Config declares (finite numbers only)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _accepts(hints.get(f.name, typing.Any), value):
            want = getattr(hints.get(f.name), "__name__", None) or str(hints.get(f.name)).replace("typing.", "")
            raise PassConfigError(f"{name}: {f.name}={value!r} must be of type {want}")
        if isinstance(value, float) and not math.isfinite(value):
            raise PassConfigError(f"{name}: {f.name}={value!r} must be a finite number")


def layer_tuple(name: str, layers, lowest: int = 0, what: str = "layer indices") -> tuple:
    """A layers option (an int or a sequence) as a tuple of increasing ints >= lowest, else PassConfigError."""
    layers = (layers,) if isinstance(layers, int) else tuple(layers)
    if not layers or any(isinstance(l, bool) or not isinstance(l, int) for l in layers) \
            or list(layers) != sorted(set(layers)) or layers[0] < lowest:
        raise PassConfigError(f"{name}: layers must be increasing {what} >= {lowest}, got {layers!r}")
    return layers


def fill_preset(name: str, config, presets: dict, options: tuple[str, str]) -> None:
    """Options left None take the authors' values for the budget `config.keep` (presets: keep -> values)."""
    if all(getattr(config, o) is not None for o in options):
        return
    if config.keep not in presets:
        raise PassConfigError(f"{name}: give {' and '.join(options)}, or keep in {sorted(presets)} for the authors' "
                              f"values (got keep={config.keep!r})")
    for o, value in zip(options, presets[config.keep]):
        if getattr(config, o) is None:
            setattr(config, o, value)


def check_budget(name: str, keep) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise PassConfigError(f"{name}: keep must be an int (tokens per image) or a float fraction, got {keep!r}")
    if isinstance(keep, int) and keep < 1:
        raise PassConfigError(f"{name}: keep={keep} keeps no vision token; use vtw to withdraw all of them")
    if isinstance(keep, float) and not 0.0 < keep <= 1.0:
        raise PassConfigError(f"{name}: keep={keep} as a fraction must lie in (0, 1]")
