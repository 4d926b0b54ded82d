"""DivPrune: "Diversity-based Visual Token Pruning for Large Multimodal Models" (Alvar et al., CVPR 2025).

Method: keep the most diverse subset of each image's vision tokens, as a max-min diversity problem
solved greedily (farthest-point) on the LLM input embeddings of the vision tokens (the projector's
output), with cosine distance d_ij = 1 - cos(x_i, x_j):
  first   the token farthest from its nearest other token (the second-smallest entry of its column
          of d; the smallest is its distance to itself);
  then    repeatedly, the token whose distance to the nearest already chosen token is largest.
`keep` tokens per image (int, or a fraction: round(keep x tokens), as the authors' ratio). The LLM
sees the chosen tokens in raster order, compactly numbered (positions="compact", as the authors'
LLaVA, which recomputes position ids), or with their own position ids (positions="keep").
Selection only: kept tokens are not modified. Departures from the authors' code: docs/methods.md.
"""
from dataclasses import dataclass

from graphprune.errors import PassConfigError
from graphprune.rewrite.blocks import cosine_matrix, farthest_point_select
from graphprune.rewrite.pass_api import Choose, Plan, Projected, TokenPass
from graphprune.rewrite.registry import register_pass
from graphprune.tokenops import true_positions


def diverse_tokens(*, k, protected, valid, vision_pos, feats):
    """The k tokens of each image (B, n, V, D) chosen greedily for max-min cosine distance."""
    dist = 1.0 - cosine_matrix(feats)                                               # (B, n, V, V)
    return true_positions(farthest_point_select(dist, k, protected, valid), k)


@register_pass
class DivPrune(TokenPass):
    name = "divprune"
    stage = "vision"

    @dataclass
    class Config:
        keep: int | float = 0.098        # the authors' LLaVA-1.5 ratio (56 of 576)
        positions: str = "compact"

    def validate(self):
        super().validate()
        if self.config.positions not in ("compact", "keep"):
            raise PassConfigError(f"divprune: positions must be 'compact' or 'keep', got {self.config.positions!r}")

    def plan(self) -> Plan:
        return Plan(after_projector=True, positions=self.config.positions, signals={"feats": Projected()},
                    select=Choose(self.config.keep, diverse_tokens))
