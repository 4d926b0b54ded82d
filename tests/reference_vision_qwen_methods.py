"""Independent references for VisPruner and ToMe on Qwen2.5-VL's vision encoder. Nothing here imports graphprune.

The encoder's per-token tensors come from reference_vision_qwen (the model's own encoder run, scores recomputed
by hand per attention segment); the selection rules are written here from the authors' descriptions:

* VisPruner (important="attention", the authors' answer for CLS-free towers, VisPruner issue #1): per unit,
  the int(keep x important_ratio) tokens receiving the most last-block attention (its 4 patches' sum: the same
  order as their mean), then the rest, in descending attention, lose duplicates in rounds until keep - important
  remain: A = even places, B = odd places, each A token's best cosine match in B (the merger MLP's input
  features); the min(8, rest - needed) A tokens with the highest match go; A's survivors (in descending match)
  then B are the next round's order. The kept tokens keep their prompt slots and M-RoPE positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from reference_vision_qwen import keep_index, unit_tokens
from torch import Tensor


def vispruner_choice(score: Tensor, feats: Tensor, keep: int, important_ratio: float = 0.5) -> Tensor:
    """Local indices (ascending) VisPruner keeps of one unit's tokens: score (V,), feats (V, D)."""
    order = torch.argsort(score, descending=True, stable=True)
    n_imp = int(keep * important_ratio)
    important, rest = order[:n_imp].tolist(), order[n_imp:].tolist()
    needed = keep - n_imp
    while needed > 0 and len(rest) - needed > 0:
        drop = min(8, len(rest) - needed)
        a, b = rest[0::2], rest[1::2]
        sim = F.normalize(feats[a].float(), dim=-1) @ F.normalize(feats[b].float(), dim=-1).T
        ranked = torch.argsort(sim.max(-1).values, descending=True, stable=True).tolist()
        rest = [a[i] for i in ranked[drop:]] + b
    kept = important + (rest if needed > 0 else [])
    return torch.tensor(sorted(kept))


@torch.no_grad()
def vispruner(model, example, keep: int, important_ratio: float = 0.5) -> Tensor:
    """VisPruner with attention-received importance on each unit: the kept prompt indices (B, S')."""
    choices = [[vispruner_choice(unit["score"], unit["hidden"], keep, important_ratio) for unit in row]
               for row in unit_tokens(model, example, -1)]
    return keep_index(model, example, choices)
