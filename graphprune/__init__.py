"""graphprune: training-free vision-token pruning as graph passes over captured VLM graphs.

capture -> anatomy -> rewrite (the methods in graphprune.passes) -> verify -> lower / targets.
"""
from graphprune.errors import (
    GraphpruneError,
    GraphVerificationError,
    InputError,
    PassConfigError,
    PassNotApplicable,
    UnsupportedModelError,
)
from graphprune.lower.runtime import PrunedModel, from_pretrained, prune
from graphprune.rewrite.pass_api import (
    AttendTogether,
    AttentionRows,
    Choose,
    Frames,
    Hidden,
    InputEmbeds,
    KeepCache,
    Keys,
    PassResult,
    Plan,
    Projected,
    Protect,
    TextEmbeds,
    TextMask,
    TokenPass,
    TopK,
    Values,
    WithdrawAll,
)
from graphprune.rewrite.pipeline import Program, as_passes, get_pass, parse_pipeline
from graphprune.rewrite.registry import register_pass, register_pipeline
from graphprune.targets.onnx import export_onnx  # imports onnx / onnxscript only when called
from graphprune.version import __version__

__all__ = ["AttendTogether", "AttentionRows", "Choose", "Frames", "GraphVerificationError", "GraphpruneError",
           "Hidden", "InputEmbeds", "InputError", "KeepCache", "Keys", "PassConfigError", "PassNotApplicable",
           "PassResult", "Plan", "Program", "Projected", "Protect", "PrunedModel", "TextEmbeds", "TextMask",
           "TokenPass", "TopK", "UnsupportedModelError", "Values", "WithdrawAll", "__version__", "as_passes",
           "export_onnx", "from_pretrained", "get_pass", "parse_pipeline", "prune", "register_pass",
           "register_pipeline"]
