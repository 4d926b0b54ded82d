"""Built-in token-pruning methods, one module per method (imported as graphprune.passes)."""
from . import (  # noqa: F401
    cdpruner,
    cls_topk,
    dart,
    divprune,
    dycoke,
    evs,
    fastv,
    mustdrop,
    pyramiddrop,
    random,
    sparsevlm,
    tome,
    visiontrim,
    visionzip,
    vispruner,
    vtw,
)
