"""Built-in token-pruning methods, one module per method (imported as graphprune.passes)."""
from . import cdpruner, cls_topk, dart, divprune, fastv, mustdrop, random, visiontrim, visionzip, vispruner, vtw  # noqa: F401
