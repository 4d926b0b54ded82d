"""Pipelines: passes composed over stages, built from Python, a string or a TOML file.

    "cls_topk(keep=128) | fastv(layer=2, keep=64)"      (also ';' between passes)
    [[pass]]                                            (TOML: one table per pass)
    method = "fastv"
    layer = 2
    keep = 64

The pipeline runs passes stage by stage (vision, then prefill) in increasing layer order,
verifying the graph after each one, and can print each graph after each pass (`debug=True`).
Where a family's vision stage runs eagerly, vision passes on the projector's output run at LLM
layer 0, on the input embeddings (`_at_layer_zero`).
"""
from __future__ import annotations

import ast
import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field

from graphprune import tokenops
from graphprune.anatomy.read import Anatomy, read_anatomy
from graphprune.capture.export import Stage
from graphprune.errors import InputError, PassConfigError, PassNotApplicable, ShapeBucketWarning
from graphprune.rewrite.apply import apply_pass
from graphprune.rewrite.pass_api import (
    LAST_VISION_LAYER,
    Choose,
    PassResult,
    Plan,
    Projected,
    TextEmbeds,
    TextMask,
    TokenPass,
)
from graphprune.rewrite.registry import PASSES, PIPELINES
from graphprune.verify.eager import check_against_eager

STAGE_ORDER = ("vision", "prefill")


def _named(name: str, options: dict) -> list[TokenPass]:
    fn = PIPELINES[name]
    try:
        return fn(**options)
    except TypeError as e:
        raise PassConfigError(f"pipeline {name}: {e}") from None


def load_builtin_methods() -> None:
    """Import graphprune.passes, whose modules register the built-in methods and pipelines."""
    import graphprune.passes  # noqa: F401


def get_pass(name: str) -> type[TokenPass]:
    load_builtin_methods()
    if name not in PASSES:
        raise PassConfigError(f"unknown method {name!r}; known methods: {', '.join(sorted(PASSES))}; "
                              f"pipelines: {', '.join(sorted(PIPELINES))}")
    return PASSES[name]


def is_pipeline(name: str) -> bool:
    load_builtin_methods()
    return name in PIPELINES


MAX_SPEC_CHARS = 10_000       # a pipeline string longer than this is not a pipeline anyone wrote


def _excerpt(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def parse_pipeline(text: str) -> list[TokenPass]:
    """Parse "name(opt=value, ...) | name(...)" into pass instances (errors name the bad part)."""
    if len(text) > MAX_SPEC_CHARS:
        raise PassConfigError(f"pipeline string of {len(text)} characters ({_excerpt(text)}) is longer than "
                              f"{MAX_SPEC_CHARS}; put long pipelines in a TOML file")
    passes = []
    for part in text.replace(";", "|").split("|"):
        part = part.strip()
        if not part:
            raise PassConfigError(f"pipeline {_excerpt(text)} has an empty step; write passes as "
                                  "name(option=value, ...) separated by '|'")
        try:
            expr = ast.parse(part if "(" in part else part + "()", mode="eval").body
            if not isinstance(expr, ast.Call) or not isinstance(expr.func, ast.Name) or expr.args:
                raise PassConfigError(f"pipeline step {_excerpt(part)} must look like fastv(layer=2, keep=64)")
            options = {kw.arg: ast.literal_eval(kw.value) for kw in expr.keywords}
        except (SyntaxError, RecursionError, MemoryError):
            raise PassConfigError(f"cannot parse pipeline step {_excerpt(part)}; write it as "
                                  "name(option=value, ...)") from None
        except ValueError:
            raise PassConfigError(f"pipeline step {_excerpt(part)}: option values must be literals") from None
        if None in options:
            raise PassConfigError(f"pipeline step {_excerpt(part)}: options must be named (no **)")
        passes += _build(expr.func.id, options, f"pipeline step {_excerpt(part)}")
    return passes


def _build(method, options: dict, where: str) -> list[TokenPass]:
    if not isinstance(method, str):
        raise PassConfigError(f"{where}: method must be a name, got {method!r}")
    return _named(method, options) if is_pipeline(method) else [get_pass(method)(**options)]


def load_toml(path: str) -> list[TokenPass]:
    import tomllib
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise PassConfigError(f"pipeline file {path} is not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PassConfigError(f"cannot read pipeline file {path}: {e.strerror if isinstance(e, OSError) else e}") from None
    steps = doc.get("pass")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, dict) for s in steps):
        raise PassConfigError(f"{path}: expected one or more [[pass]] tables with a 'method' key")
    passes = []
    for i, step in enumerate(steps):
        step = dict(step)
        if "method" not in step:
            raise PassConfigError(f"{path}: [[pass]] table {i + 1} lacks 'method'")
        where = f"{path}: [[pass]] table {i + 1}"
        try:
            passes += _build(step.pop("method"), step, where)
        except PassConfigError as e:
            raise PassConfigError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
    return passes


def as_passes(spec, **options) -> list[TokenPass]:
    """Everything prune() accepts as a method: name (+ options), pipeline string, TOML path, passes."""
    if isinstance(spec, TokenPass):
        spec = [spec]
    if isinstance(spec, (list, tuple)):
        if options:
            raise PassConfigError(f"options {sorted(options)} apply to a single method name, not to a list of passes")
        for p in spec:
            if not isinstance(p, TokenPass):
                raise PassConfigError(f"pipeline items must be passes, got {p!r}")
        return list(spec)
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise PassConfigError(f"cannot build a pipeline from {spec!r}; give a method name, a pipeline string, "
                              "a TOML path or passes")
    if spec.endswith(".toml"):
        if options:
            raise PassConfigError(f"options {sorted(options)} do not apply to the pipeline file {spec}; "
                                  "set them in its [[pass]] tables")
        if not os.path.exists(spec):
            raise PassConfigError(f"pipeline file {spec} does not exist")
        return load_toml(spec)
    if "(" in spec or "|" in spec or ";" in spec:
        if options:
            raise PassConfigError(f"options {sorted(options)} do not apply to a pipeline string; give them inside "
                                  "it, e.g. fastv(layer=2, keep=64)")
        return parse_pipeline(spec)
    return _build(spec.strip(), options, "prune")


@dataclass
class Program:
    """The captured stages of one model and their anatomy: what passes rewrite."""
    stages: dict[str, Stage]
    anatomy: dict[str, Anatomy]
    family: object
    results: list[PassResult] = field(default_factory=list)
    through_last: Stage | None = None   # the vision stage captured through its last layer, once a pass read it
    # a family whose vision stage is captured per shape bucket (Family.vision_buckets): the vision passes,
    # and each bucket's vision stage captured, checked and rewritten by them (vision_stage())
    vision_passes: list[TokenPass] = field(default_factory=list)
    buckets: dict = field(default_factory=dict)

    @classmethod
    def capture(cls, model, stages=("vision", "prefill", "decode")) -> "Program":
        from graphprune.capture.export import capture
        from graphprune.families import family_of
        fam = family_of(model)
        stages = capture(model, stages)
        for stage in stages.values():       # before any pass: a wrong capture must never be rewritten
            check_against_eager(stage, fam.model_class)
        anat = {k: read_anatomy(s.gm, k, fam.model_class) for k, s in stages.items() if s.gm is not None}
        return cls(stages, anat, fam)

    def copy(self) -> "Program":
        stages = {k: s.copy() for k, s in self.stages.items()}
        anat = {k: read_anatomy(s.gm, k, self.family.model_class) for k, s in stages.items() if s.gm is not None}
        return Program(stages, anat, self.family, through_last=self.through_last)

    def vision_stage(self, bucket) -> Stage:
        """The vision stage of one shape bucket (a patch grid, an image size), rewritten by the vision passes: captured,
        checked against the model's own encoder and rewritten on first use (with a warning naming the
        bucket), then reused; a bucket past the family's limit is refused, naming the ones there are."""
        if bucket in self.buckets:
            return self.buckets[bucket][0]
        from graphprune.capture.export import capture_vision
        limit, model_class = self.family.vision_buckets, self.family.model_class
        if len(self.buckets) >= limit:
            raise InputError(f"{model_class}: vision units of {self.family.bucket_name(bucket)} would be shape bucket {limit + 1}, "
                             f"and a pruned model captures its vision encoder for at most {limit} "
                             f"(captured: {', '.join(map(str, self.buckets))}); resize the images to one of those "
                             "grids, or prune a new model for other sizes")
        warnings.warn(f"{model_class}: capturing the vision encoder for {self.family.bucket_name(bucket)} (shape bucket "
                      f"{len(self.buckets) + 1} of at most {limit}); later images of this grid reuse it",
                      ShapeBucketWarning, stacklevel=3)
        stage = capture_vision(self.family, bucket=bucket)
        check_against_eager(stage, model_class)
        anat = read_anatomy(stage.gm, "vision", model_class)
        results = [apply_pass(p, stage, anat) for p in self.vision_passes]
        self.buckets[bucket] = (stage, results)
        return stage

    def vision_through_last(self) -> Stage:
        """The vision stage with the encoder's layers past the feature layer kept (captured and checked
        against the eager module on first use, then reused)."""
        if self.through_last is None:
            from graphprune.capture.export import capture_vision
            stage = capture_vision(self.family, through_last=True)
            check_against_eager(stage, self.family.model_class)
            self.through_last = stage
        return self.through_last


def run_pipeline(program: Program, passes: list[TokenPass], *, debug: bool = False) -> Program:
    """Apply passes to a copy of the program; the captured original is never modified."""
    out = program.copy()
    vision = out.stages.get("vision")
    # a bucketed family captures its encoder when a vision pass needs more than the projected tokens
    # (those passes alone run at LLM layer 0, on the eager encoder's output: no capture needed)
    bucketed = bool(out.family.vision_buckets) and vision is not None and vision.gm is None and any(
        _stage_of(p) == "vision" and not _runs_at_layer_zero(p) for p in passes)
    eager = (vision is None or vision.gm is None) and not bucketed
    order = sorted(passes, key=lambda p: _position(p, eager_vision=eager))
    if bucketed:
        out.vision_passes = [p for p in order if _stage_of(p) == "vision"]
        order = [p for p in order if _stage_of(p) != "vision"]
        if out.vision_passes:
            _bucket_now(out)
    if vision is not None and vision.gm is not None and any(_reads_last_vision_layer(p) for p in order):
        out.stages["vision"] = program.vision_through_last().copy()
        out.anatomy["vision"] = read_anatomy(out.stages["vision"].gm, "vision", out.family.model_class)
    for p in order:
        stage = _stage_of(p)
        if p.units == "videos" and out.family.video_token_id() is None:
            raise PassNotApplicable(f"{p.name} prunes video tokens, and {out.family.model_class} takes no video")
        st, plans = out.stages[stage], None
        if st.gm is None and stage == "vision":
            p.requires(Anatomy(stage, out.family.model_class, [], {}, [], has_cls=out.family.vision_has_cls))
            plans = _at_layer_zero(p, st, out.family.model_class)
            stage, st = "prefill", out.stages["prefill"]
        if st.gm is None:
            raise PassNotApplicable(f"{p.name} acts on the {stage} stage, which graphprune could not capture for "
                                    f"{out.family.model_class}: {st.eager}")
        result = apply_pass(p, st, out.anatomy[stage], plans)
        out.results.append(result)
        if debug:
            print(f"# ---- {stage} graph after {p!r}\n{st.gm.code}")
    return out


PROBE_SIDE = 8      # tokens per side of the bucket vision passes are first applied to


def _bucket_now(program: Program) -> None:
    """Vision passes of a bucketed family, applied once at prune time to a small square bucket that
    holds their budgets, so that a pass that cannot apply stops before any prompt runs; its results
    stand for every bucket (they hold the same rules)."""
    from graphprune.rewrite.positions import check_one_axis
    for p in program.vision_passes:
        p.requires(Anatomy("vision", program.family.model_class, [], {}, [], has_cls=program.family.vision_has_cls))
    keeps = [s.keep for s in BudgetStep.of_passes(program.vision_passes) if isinstance(s.keep, int)]
    # side^2 tokens: more than any count budget, and room for a pass's windows (mustdrop_merge's 3 x 3)
    side = max(PROBE_SIDE, math.isqrt(max(keeps, default=1)) + 1)
    program.vision_stage(program.family.vision_bucket(side, side))
    program.results += program.buckets[next(iter(program.buckets))][1]
    for p in program.vision_passes:     # the runtime renumbers compact vision tokens along one axis only
        plans = p.plan()
        if any(plan.positions == "compact" for plan in (plans if isinstance(plans, list) else [plans])):
            check_one_axis(program.anatomy["prefill"], p)


LAYER_ZERO_SIGNALS = (Projected, TextEmbeds, TextMask)     # what a vision pass may read at LLM layer 0


def _runs_at_layer_zero(p: TokenPass) -> bool:
    """Whether a vision pass reads only what exists at LLM layer 0 and acts on the projected tokens."""
    plans = p.plan()
    plans = plans if isinstance(plans, list) else [plans]
    return all(plan.after_projector and all(isinstance(sig, LAYER_ZERO_SIGNALS) for sig in plan.signals.values())
               for plan in plans)


def _at_layer_zero(p: TokenPass, vision: Stage, model_class: str) -> list[Plan]:
    """Where graphprune runs the vision stage eagerly, a vision pass on the projector's output runs at
    LLM layer 0: the projected vision tokens are the LLM's input embeddings at the vision positions,
    and the instruction's embeddings are there too, so its plans select from those (one budget per
    vision unit: image, video frame or video). A pass reading the encoder is refused, naming what it reads."""
    plans = p.plan()
    plans = plans if isinstance(plans, list) else [plans]
    encoder = sorted(f"{name}={sig!r}" for plan in plans for name, sig in plan.signals.items()
                     if not isinstance(sig, LAYER_ZERO_SIGNALS))
    if _runs_at_layer_zero(p):
        return [dataclasses.replace(plan, layer=0, after_projector=False) for plan in plans]
    reads = f"reads {', '.join(encoder)} from the vision encoder" if encoder else \
        "selects among the vision encoder's features before the projector"
    raise PassNotApplicable(f"{p.name} {reads}, and graphprune runs the vision stage of {model_class} eagerly "
                            f"({vision.eager}), so no such signal exists; use a pass on the projected tokens "
                            "(divprune, cdpruner) or an LLM-stage method such as fastv, dart or pyramiddrop")


def _reads_last_vision_layer(p: TokenPass) -> bool:
    plans = p.plan()
    return any(getattr(sig, "layer", None) == LAST_VISION_LAYER
               for plan in (plans if isinstance(plans, list) else [plans]) for sig in plan.signals.values())


def _position(p: TokenPass, eager_vision: bool = False) -> tuple:
    """Where a pass acts, for ordering: stage, then layer (vision: encoder layers, then the features,
    then the projector output; a cache rule right after the selection at its layer). With an eager
    vision stage a vision pass acts at LLM layer 0 (_at_layer_zero), in the written order there."""
    from graphprune.rewrite.pass_api import KeepCache
    if eager_vision and _stage_of(p) == "vision":
        return STAGE_ORDER.index("prefill"), 0, 0
    plans = p.plan()
    first = plans[0] if isinstance(plans, list) else plans
    layer = float("inf") if first.layer is None else first.layer
    late = 1 if first.after_projector or isinstance(first.select, KeepCache) else 0
    return STAGE_ORDER.index(_stage_of(p)), layer, late


def _stage_of(p: TokenPass) -> str:
    if p.stage not in STAGE_ORDER:
        raise PassConfigError(f"{p.name}: stage must be one of {STAGE_ORDER}, got {p.stage!r}")
    return p.stage


@dataclass(frozen=True)
class BudgetStep:
    """One selection rule as budgets see it (from a pass before rewriting, or a PassResult's info)."""
    label: str                  # the pass, as repr() prints it
    rule: str                   # TopK | Choose | Protect | WithdrawAll | KeepCache
    keep: object                # int count, float fraction, None (data-dependent count)
    capacity: bool = False      # static capacity: keeps at most `keep` slots and may mask some of them

    @classmethod
    def of_passes(cls, passes: list[TokenPass]) -> list["BudgetStep"]:
        """The rules of passes in the order the pipeline runs them."""
        steps = []
        for p in sorted(passes, key=_position):
            plans = p.plan()
            for plan in plans if isinstance(plans, list) else [plans]:
                sel = plan.select
                steps.append(cls(repr(p), type(sel).__name__, getattr(sel, "keep", None),
                                 isinstance(sel, Choose) and sel.static_mask))
        return steps

    @classmethod
    def of_results(cls, results: list[PassResult]) -> list["BudgetStep"]:
        def count(keep):          # apply records a data-dependent count as a word
            return keep if isinstance(keep, (int, float)) and not isinstance(keep, bool) else None
        return [cls(r.info["pass"], r.info["rule"], count(r.info["keep"]), bool(r.info.get("capacity")))
                for r in results]


def follow_budgets(steps: list[BudgetStep], tokens: int | None, where: str) -> bool:
    """Follow the vision tokens per image through the rules; a count budget above what is left
    (`tokens` per image `where`, or what an earlier pass left) raises naming both. Returns whether
    any rule can remove (or mask) a token; with tokens=None only the kinds of rule decide."""
    left, by, drops = tokens, None, False
    for s in steps:
        if s.rule == "WithdrawAll":
            left, by, drops = 0, s.label, True
            continue
        if s.rule not in ("TopK", "Choose"):
            continue
        if left == 0:
            raise PassConfigError(f"{s.label} acts after {by} withdrew every vision token; drop one of them")
        if s.capacity or s.keep is None:          # masks slots, or keeps a data-dependent count
            drops, by = True, s.label
            if left is not None:
                left = None if s.keep is None else min(s.keep, left) if isinstance(s.keep, int) \
                    else tokenops.budget(s.keep, left)
            continue
        if left is None:                          # unknown token count: only a whole fraction surely keeps all
            drops = drops or isinstance(s.keep, int) or s.keep < 1.0
            continue
        if isinstance(s.keep, int) and s.keep > left:
            source = f"left after {by}" if by else where
            raise PassConfigError(f"{s.label}: keep={s.keep} exceeds the {left} vision tokens per image {source}")
        kept = tokenops.budget(s.keep, left)
        drops, left, by = drops or kept < left, kept, s.label
    return drops
