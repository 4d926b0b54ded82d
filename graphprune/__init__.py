"""graphprune: training-free vision-token pruning as graph passes over captured VLM graphs."""
from .errors import (GraphpruneError, GraphVerificationError, InputError, PassConfigError,  # noqa: F401
                     PassNotApplicable, UnsupportedModelError)
from .pass_api import (AttentionRows, Hidden, Keys, Plan, PassResult, TokenPass, TopK,  # noqa: F401
                       WithdrawAll, get_pass, register_pass)
from .pipeline import Program, as_passes, parse_pipeline  # noqa: F401
from .runtime import PrunedModel, prune  # noqa: F401

__version__ = "0.1.0"
