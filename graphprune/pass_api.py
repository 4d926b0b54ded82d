"""The pass-authoring API: what a token-pruning method declares.

A method is a `TokenPass` subclass with a typed `Config` dataclass and a `plan()` that says
  where        stage ("vision" | "prefill") and `layer`: the first layer that runs on the
               reduced sequence (prefill); vision passes act on the features entering the projector
  signals      what it looks at: AttentionRows, Keys, Hidden (extracted from the graph by graphprune)
  score        a plain torch function of the signals -> (B, images, tokens) scores; recorded
               into the graph as nodes
  select       the selection rule: TopK(keep) or WithdrawAll()
  positions    "keep" (kept tokens keep their position ids) or "compact" (renumbered)
The framework inserts the nodes, rewires every downstream use (hidden states, rotary cos/sin,
masks, sequence sizes, cache writes) and verifies the graph. Passes never see model classes.

Conventions, shared by every pass:
  * layers are 0-indexed; `layer=K` is the first decoder layer that runs on the reduced
    sequence, so layers 0..K-1 see every token and a signal "of layer K-1" is available;
  * `keep` counts retained vision tokens per image (int), or a fraction of them (float);
    text tokens are never counted or dropped.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, ClassVar

from .errors import PassConfigError

# -- signals: what a pass looks at --------------------------------------------------------------


@dataclass(frozen=True)
class AttentionRows:
    """Head-averaged attention that chosen queries pay the vision tokens in `layer`.

    query: "last" (last prompt token, FastV) or "cls" (vision encoder CLS token).
    Value: (B, n_queries, images, tokens). Recomputed from that layer's post-RoPE q and k for
    the chosen rows only; the layer's own attention stays fused SDPA.
    """
    layer: int
    query: str = "last"


@dataclass(frozen=True)
class Keys:
    """Post-RoPE keys of the vision tokens in `layer`, heads concatenated: (B, images, tokens, H*d)."""
    layer: int


@dataclass(frozen=True)
class Hidden:
    """Output hidden states of `layer` at the vision tokens: (B, images, tokens, D)."""
    layer: int


# -- selection rules -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TopK:
    """Keep the `keep` highest-scoring vision tokens of each image (int count or float fraction)."""
    keep: int | float


@dataclass(frozen=True)
class WithdrawAll:
    """Remove every vision token (VTW)."""


@dataclass
class Plan:
    select: TopK | WithdrawAll
    layer: int | None = None
    signals: dict = field(default_factory=dict)
    score: Callable | None = None
    positions: str = "keep"


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
    Config: ClassVar[type]

    def __init__(self, config=None, **options):
        if config is None:
            try:
                config = self.Config(**options)
            except TypeError as e:
                fields = ", ".join(f.name for f in dataclasses.fields(self.Config))
                raise PassConfigError(f"{self.name}: {e}. Options are: {fields}") from None
        self.config = config
        self.validate()

    def validate(self) -> None:
        """Check options that need no model (budgets, ranges). Raise PassConfigError."""
        keep = getattr(self.config, "keep", None)
        if keep is not None:
            check_budget(self.name, keep)
        layer = getattr(self.config, "layer", None)
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise PassConfigError(f"{self.name}: layer must be an int, got {layer!r}")

    def plan(self) -> Plan:
        raise NotImplementedError

    def requires(self, anatomy) -> None:
        """Check that the model has what the method needs; raise PassNotApplicable if not."""

    def __call__(self, stage, anatomy) -> PassResult:
        from .rewrite import apply_plan
        return apply_plan(self, stage, anatomy)

    def __repr__(self):
        args = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config))
        return f"{self.name}({args})"


def check_budget(name: str, keep) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise PassConfigError(f"{name}: keep must be an int (tokens per image) or a float fraction, got {keep!r}")
    if isinstance(keep, int) and keep < 1:
        raise PassConfigError(f"{name}: keep={keep} keeps no vision token; use vtw to withdraw all of them")
    if isinstance(keep, float) and not 0.0 < keep <= 1.0:
        raise PassConfigError(f"{name}: keep={keep} as a fraction must lie in (0, 1]")


# -- registry -----------------------------------------------------------------------------------

PASSES: dict[str, type[TokenPass]] = {}


def register_pass(cls: type[TokenPass]) -> type[TokenPass]:
    """Class decorator: make a pass available by name to prune(), pipelines strings and the CLI."""
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise PassConfigError(f"a pass named {cls.name!r} is already registered ({PASSES[cls.name].__module__})")
    PASSES[cls.name] = cls
    return cls


def get_pass(name: str) -> type[TokenPass]:
    from . import passes  # noqa: F401  (registers the built-in methods)
    if name not in PASSES:
        raise PassConfigError(f"unknown method {name!r}; known methods: {', '.join(sorted(PASSES))}")
    return PASSES[name]
