"""VTW's choice of K (Lin et al., 2024): for K in [first, N), the mean over calibration samples
of KL(P_withdrawn || P_full) of the last-token output distribution; the first K at or below eta
(0.003 for LLaVA-1.5-7B) is chosen. A tool over pruned models, apart from the pass itself."""
from __future__ import annotations

import torch

from graphprune.lower.runtime import prune
from graphprune.passes.vtw import VTW


def kl_withdrawn_vs_full(full_logits: torch.Tensor, withdrawn_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_withdrawn || P_full) per sample, from last-token logits (B, V)."""
    logp_w = withdrawn_logits.float().log_softmax(-1)
    logp_f = full_logits.float().log_softmax(-1)
    return (logp_w.exp() * (logp_w - logp_f)).sum(-1)


def calibrate(model, samples, *, eta: float = 0.003, first: int = 5, program=None) -> dict:
    """Choose VTW's layer K on calibration samples (a list of model-input dicts).

    Returns {"layer": K or None, "kl": {K: mean KL}, "eta": eta}. K is None when no layer in
    [first, N) reaches eta: withdrawing there would change the answers too much.
    """
    base = prune(model, [], program=program)
    full = [base(**s).logits[:, -1] for s in samples]
    n = base.num_layers
    if not first < n:
        raise ValueError(f"vtw.calibrate: first={first} leaves no candidate layer in a {n}-layer model")
    kls = {}
    for k in range(first, n):
        pruned = prune(model, [VTW(layer=k)], program=base.base)
        kl = torch.stack([kl_withdrawn_vs_full(f, pruned(**s).logits[:, -1]).mean() for f, s in zip(full, samples)])
        kls[k] = float(kl.mean())
        if kls[k] <= eta:
            return {"layer": k, "kl": kls, "eta": eta}
    return {"layer": None, "kl": kls, "eta": eta}
