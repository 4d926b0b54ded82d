"""Independent reference for two token-dropping vision passes in a row (tiny LLaVA): the second method
runs on what the first kept, as if the first method's output were the image.

State of an image: ``slots`` (k,) the ascending patch indices still present, and ``pre`` (k, d) the
features entering the projector that sit at them (row j at slots[j]; after a merge these are the merged
values, written in the LLM's order). Each step is the method's rule restricted to those tokens, written
from its paper / authors' code as in tests/reference_new_methods.py; nothing here calls graphprune.
"""
from __future__ import annotations

import reference_new_methods as N
import torch
from torch import Tensor


def start(model, pixel_values: Tensor) -> dict:
    """Every patch of every image, with the feature layer's CLS attention (n, V) and keys (n, V, H*hd)."""
    parts = N.vision_parts(model, pixel_values)
    n, v, _ = parts["pre_features"].shape
    return {"slots": torch.arange(v).expand(n, v), "pre": parts["pre_features"], "cls": parts["cls_attn"],
            "keys": parts["keys"].reshape(n, v, -1)}


def _take(state: dict, local: Tensor) -> dict:
    local = local.sort(-1).values
    pre = state["pre"].gather(1, local[..., None].expand(-1, -1, state["pre"].shape[-1]))
    return {**state, "slots": state["slots"].gather(1, local), "pre": pre}


def _cls_of(state: dict) -> Tensor:
    return state["cls"].gather(1, state["slots"])


def cls_topk(state: dict, keep: int) -> dict:
    """The `keep` present patches with the highest head-averaged CLS attention (FasterVLM / cls_topk)."""
    return _take(state, torch.topk(_cls_of(state), keep, dim=-1).indices)


def random(state: dict, keep: int, seed: int = 0) -> dict:
    """u ~ U(0, 1) of shape (images, 1, present tokens) from a generator seeded with `seed`; top `keep`."""
    n, k = state["slots"].shape
    u = torch.rand((n, 1, k), generator=torch.Generator().manual_seed(seed))[:, 0]
    return _take(state, torch.topk(u, keep, dim=-1).indices)


def visionzip(state: dict, keep: int) -> dict:
    """VisionZip among the present patches: dominant = top (keep - c) by CLS attention (raster order),
    the rest (raster order) grouped around every (R // c)-th of them by cosine of their keys (heads
    concatenated); contextual token = target + mean of its members. The LLM reads [dominant, contextual]
    in that order at the ascending union of dominant and target slots."""
    c = round(keep * 5 / 32)
    slots, pres = [], []
    for i in range(state["slots"].shape[0]):
        k = state["slots"].shape[1]
        dom = torch.topk(_cls_of(state)[i], keep - c).indices.sort().values
        rest = torch.tensor([j for j in range(k) if j not in set(dom.tolist())])
        metric = state["keys"][i, state["slots"][i, rest]]
        metric = metric / metric.norm(dim=-1, keepdim=True)
        target = list(range(0, len(rest), max(1, len(rest) // c)))[:c]
        others = [j for j in range(len(rest)) if j not in target]
        best = (metric[others] @ metric[target].t()).argmax(1)
        pre = state["pre"][i]
        ctx = []
        for t in range(c):
            members = [others[m] for m in range(len(others)) if int(best[m]) == t]
            ctx.append(pre[rest[target[t]]] + (pre[rest[members]].mean(0) if members else 0))
        pres.append(torch.cat([pre[dom], torch.stack(ctx)]))
        slots.append(state["slots"][i, torch.cat([dom, rest[target]])].sort().values)
    return {**state, "slots": torch.stack(slots), "pre": torch.stack(pres)}


def divprune(model, state: dict, keep: int) -> dict:
    """DivPrune's greedy max-min cosine diversity on the projected present tokens."""
    feats = N.project(model, state["pre"])
    return _take(state, torch.stack([N.divprune_indices(f, keep) for f in feats]))


def vision_out(model, state: dict) -> dict:
    """What the LLM receives: projected features and their slots, for reference.llava_inputs_from_vision."""
    return {"features": N.project(model, state["pre"]), "patch_index": state["slots"]}
