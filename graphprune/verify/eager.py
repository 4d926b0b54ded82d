"""A captured stage must compute what the eager model computes, before any pass rewrites it.

torch.export can return a graph that runs but is wrong (an in-place write dropped, a mask or a
rotary table specialised on the example, a data-dependent branch frozen). Each captured stage is
run once, beside the eager module it was captured from, on a seeded random example that differs
from the capture example (another sequence length, left padding, distinct M-RoPE axes), and any
difference beyond the dtype's tolerance stops prune() with the stage, output and difference.
"""
from __future__ import annotations

import torch

from graphprune.capture.export import Stage
from graphprune.errors import GraphVerificationError

# largest |graph - eager| allowed, relative to max(1, max |eager|): fp32 kernels may reorder sums
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def check_against_eager(stage: Stage, model_class: str = "?") -> float:
    """Run `stage.gm` and `stage.module` on `stage.check_inputs`; return the largest relative
    difference, raise GraphVerificationError past the tolerance. A stage without a graph, an eager
    module or check inputs (a model on the meta device) is not checked: returns 0.0."""
    if stage.gm is None or stage.module is None or stage.check_inputs is None:
        return 0.0
    with torch.no_grad():
        got = _as_tuple(stage.gm(*stage.check_inputs))
        want = _as_tuple(stage.module(*stage.check_inputs))
    names = stage.gm.meta.get("graphprune_outputs") or [f"output {i}" for i in range(len(want))]
    if len(got) != len(want):
        raise GraphVerificationError(f"{model_class}: the captured {stage.name} graph returns {len(got)} outputs, "
                                     f"the eager model {len(want)}")
    worst = 0.0
    for name, g, w in zip(names, got, want):
        if g.shape != w.shape:
            raise GraphVerificationError(f"{model_class}: the captured {stage.name} graph's {name} has shape "
                                         f"{tuple(g.shape)}, the eager model's {tuple(w.shape)}")
        scale = max(1.0, w.detach().abs().max().item()) if w.numel() else 1.0
        diff = (g.float() - w.float()).abs().max().item() / scale if w.numel() else 0.0
        tol = TOLERANCE.get(w.dtype, 0.0)
        if not diff <= tol:          # also catches NaN
            raise GraphVerificationError(
                f"{model_class}: the captured {stage.name} graph does not reproduce the eager model: {name} differs "
                f"by {diff:.3g} (relative to max(1, |eager|); {w.dtype} tolerance {tol:g}). graphprune cannot read "
                "this model correctly; please report it with the model's config")
        worst = max(worst, diff)
    return worst


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)
