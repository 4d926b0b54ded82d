"""Built-in token-pruning methods, one module per method (imported as graphprune.passes)."""
from . import cls_topk, dart, fastv, mustdrop, random, visiontrim, visionzip, vtw  # noqa: F401
