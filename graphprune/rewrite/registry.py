"""The registries that make methods and named pipelines available by name (to prune(), pipeline
strings, TOML files and the CLI). Method modules import only this and the pass API; looking a
name up (which first loads the built-in methods) is graphprune.rewrite.pipeline's."""
from __future__ import annotations

from graphprune.errors import PassConfigError
from graphprune.rewrite.pass_api import TokenPass

PASSES: dict[str, type[TokenPass]] = {}
PIPELINES: dict = {}


def register_pipeline(name: str):
    """Decorator: a named pipeline, a function of its options returning passes (e.g. "mustdrop")."""
    def deco(fn):
        PIPELINES[name] = fn
        return fn
    return deco


def register_pass(cls: type[TokenPass]) -> type[TokenPass]:
    """Class decorator: make a pass available by name to prune(), pipelines strings and the CLI."""
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise PassConfigError(f"a pass named {cls.name!r} is already registered ({PASSES[cls.name].__module__})")
    PASSES[cls.name] = cls
    return cls
