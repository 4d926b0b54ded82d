"""Pipelines: passes composed over stages, built from Python, a string or a TOML file.

    "cls_topk(keep=128) | fastv(layer=2, keep=64)"      (also ';' between passes)
    [[pass]]                                            (TOML: one table per pass)
    method = "fastv"
    layer = 2
    keep = 64

The pipeline runs passes stage by stage (vision, then prefill) in increasing layer order,
verifying the graph after each one, and can print each graph after each pass (`debug=True`).
"""
from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field

from graphprune.anatomy.read import Anatomy, read_anatomy
from graphprune.capture.export import Stage
from graphprune.errors import PassConfigError
from graphprune.rewrite.apply import apply_pass
from graphprune.rewrite.pass_api import PassResult, TokenPass
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


def parse_pipeline(text: str) -> list[TokenPass]:
    """Parse "name(opt=value, ...) | name(...)" into pass instances (errors name the bad part)."""
    passes = []
    for part in text.replace(";", "|").split("|"):
        part = part.strip()
        if not part:
            continue
        try:
            expr = ast.parse(part if "(" in part else part + "()", mode="eval").body
        except SyntaxError:
            raise PassConfigError(f"cannot parse pipeline step {part!r}; write it as name(option=value, ...)") from None
        if not isinstance(expr, ast.Call) or not isinstance(expr.func, ast.Name) or expr.args:
            raise PassConfigError(f"pipeline step {part!r} must look like fastv(layer=2, keep=64)")
        try:
            options = {kw.arg: ast.literal_eval(kw.value) for kw in expr.keywords}
        except ValueError:
            raise PassConfigError(f"pipeline step {part!r}: option values must be literals") from None
        passes += _named(expr.func.id, options) if is_pipeline(expr.func.id) else [get_pass(expr.func.id)(**options)]
    return passes


def load_toml(path: str) -> list[TokenPass]:
    import tomllib
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    steps = doc.get("pass")
    if not isinstance(steps, list) or not steps:
        raise PassConfigError(f"{path}: expected one or more [[pass]] tables with a 'method' key")
    passes = []
    for step in steps:
        step = dict(step)
        if "method" not in step:
            raise PassConfigError(f"{path}: a [[pass]] table lacks 'method'")
        method = step.pop("method")
        passes += _named(method, step) if is_pipeline(method) else [get_pass(method)(**step)]
    return passes


def as_passes(spec, **options) -> list[TokenPass]:
    """Everything prune() accepts as a method: name (+ options), pipeline string, TOML path, passes."""
    if isinstance(spec, TokenPass):
        spec = [spec]
    if isinstance(spec, (list, tuple)):
        if options:
            raise PassConfigError("options apply to a single method name, not to a list of passes")
        for p in spec:
            if not isinstance(p, TokenPass):
                raise PassConfigError(f"pipeline items must be passes, got {p!r}")
        return list(spec)
    if not isinstance(spec, str):
        raise PassConfigError(f"cannot build a pipeline from {spec!r}")
    if spec.endswith(".toml"):
        if not os.path.exists(spec):
            raise PassConfigError(f"pipeline file {spec} does not exist")
        return load_toml(spec)
    if "(" in spec or "|" in spec or ";" in spec:
        if options:
            raise PassConfigError("give options inside the pipeline string, e.g. fastv(layer=2, keep=64)")
        return parse_pipeline(spec)
    if is_pipeline(spec.strip()):
        return _named(spec.strip(), options)
    return [get_pass(spec.strip())(**options)]


@dataclass
class Program:
    """The captured stages of one model and their anatomy: what passes rewrite."""
    stages: dict[str, Stage]
    anatomy: dict[str, Anatomy]
    family: object
    results: list[PassResult] = field(default_factory=list)

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
        return Program(stages, anat, self.family)


def run_pipeline(program: Program, passes: list[TokenPass], *, debug: bool = False) -> Program:
    """Apply passes to a copy of the program; the captured original is never modified."""
    out = program.copy()
    order = sorted(passes, key=_position)
    for p in order:
        stage = _stage_of(p)
        st = out.stages[stage]
        if st.gm is None:
            from graphprune.errors import PassNotApplicable
            p.requires(Anatomy(stage, out.family.model_class, [], {}, [], has_cls=out.family.vision_has_cls))
            raise PassNotApplicable(f"{p.name} acts on the {stage} stage, which graphprune could not capture for "
                                    f"{out.family.model_class}: {st.eager}")
        result = apply_pass(p, st, out.anatomy[stage])
        out.results.append(result)
        if debug:
            print(f"# ---- {stage} graph after {p!r}\n{st.gm.code}")
    return out


def _position(p: TokenPass) -> tuple:
    """Where a pass acts, for ordering: stage, then layer (vision: encoder layers, then the features,
    then the projector output; a cache rule right after the selection at its layer)."""
    from graphprune.rewrite.pass_api import KeepCache
    plans = p.plan()
    first = plans[0] if isinstance(plans, list) else plans
    layer = float("inf") if first.layer is None else first.layer
    late = 1 if first.after_projector or isinstance(first.select, KeepCache) else 0
    return STAGE_ORDER.index(_stage_of(p)), layer, late


def _stage_of(p: TokenPass) -> str:
    if p.stage not in STAGE_ORDER:
        raise PassConfigError(f"{p.name}: stage must be one of {STAGE_ORDER}, got {p.stage!r}")
    return p.stage
