"""graphprune: training-free vision-token pruning as graph passes over captured VLM graphs."""
from .errors import (GraphpruneError, GraphVerificationError, InputError, PassConfigError,  # noqa: F401
                     PassNotApplicable, UnsupportedModelError)
from .pass_api import (AttentionRows, Choose, Hidden, KeepCache, Keys, Plan, PassResult, Projected,  # noqa: F401
                       Protect, TextEmbeds, TextMask, TokenPass, TopK, Values, WithdrawAll, get_pass,
                       register_pass)
from .pipeline import Program, as_passes, parse_pipeline, register_pipeline  # noqa: F401
from .runtime import PrunedModel, prune  # noqa: F401
from .targets.onnx import export_onnx  # noqa: F401,E402  (imports onnx/onnxscript only when called)

__version__ = "0.1.0"
