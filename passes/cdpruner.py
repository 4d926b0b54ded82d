"""CDPruner: "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in
MLLMs" (Zhang et al., 2025).

Method: keep the subset of each image's vision tokens that maximises a conditional DPP,
  L = diag(r) S diag(r),  S_ij = cos(f_i, f_j) on the projected vision tokens,
  r_i = min-max normalised relevance of token i to the instruction (the authors: minus the mean
  cosine between the token's and the instruction's CLIP embeddings, (r - min + 1e-6) / (max - min)),
found by fast greedy MAP inference (Chen et al. 2018): repeatedly the token with the largest
marginal gain d_j^2, updating an incremental Cholesky factor. LLaVA has no CLIP text tower, so the
relevance compares the projected vision tokens with the LLM's input embeddings of the instruction
(the space they share), as VisionTrim's text guidance does. Positions: "compact" (the authors'
LLaVA recomputes them) or "keep". Departures from the authors' code: docs/methods.md.
"""
from dataclasses import dataclass

import torch.nn.functional as F

from graphprune.errors import InputError, PassConfigError
from graphprune.rewrite.blocks import cosine_matrix, dpp_greedy_select
from graphprune.rewrite.pass_api import Choose, Plan, Projected, TextEmbeds, TextMask, TokenPass
from graphprune.rewrite.registry import register_pass
from graphprune.tokenops import true_positions


def instruction_relevance(feats, text, text_mask):
    """Min-max normalised negative mean cosine of each token (..., V, D) to the real text rows (..., T, D)."""
    cos = F.normalize(feats.float(), dim=-1) @ F.normalize(text.float(), dim=-1).transpose(-1, -2)
    m = text_mask.bool()[..., None, :]
    rel = -(cos * m).sum(-1) / m.sum(-1).clamp(min=1)
    lo, hi = rel.amin(-1, keepdim=True), rel.amax(-1, keepdim=True)
    return (rel - lo + 1e-6) / (hi - lo)


def conditional_dpp(*, k, protected, valid, vision_pos, feats, text, text_mask):
    """feats (images, 1, V, D) projected tokens; text (images, T, D) instruction embeddings."""
    if protected is not None:
        raise InputError("cdpruner: an earlier pass protected tokens; a DPP subset cannot honour a key set")
    r = instruction_relevance(feats, text[:, None], text_mask[:, None])
    kernel = r[..., :, None] * cosine_matrix(feats) * r[..., None, :]
    return true_positions(dpp_greedy_select(kernel, k, valid), k)


@register_pass
class CDPruner(TokenPass):
    name = "cdpruner"
    stage = "vision"

    @dataclass
    class Config:
        keep: int | float = 64
        positions: str = "compact"

    def validate(self):
        super().validate()
        if self.config.positions not in ("compact", "keep"):
            raise PassConfigError(f"cdpruner: positions must be 'compact' or 'keep', got {self.config.positions!r}")

    def check_prompt(self, prompt):
        if int(prompt.text_mask.sum(1).min()) < 1:
            raise InputError("cdpruner: a prompt has no instruction tokens after its image; the relevance needs text")

    def plan(self) -> Plan:
        return Plan(after_projector=True, positions=self.config.positions,
                    signals={"feats": Projected(), "text": TextEmbeds(), "text_mask": TextMask()},
                    select=Choose(self.config.keep, conditional_dpp))
