"""FastV: "An Image is Worth 1/2 Tokens After Layer 2" (Chen et al., 2024).

Method: after layer K-1 of the language model, rank the vision tokens by the attention the
last prompt token pays them in layer K-1, averaged over heads; layers K.. run on the top
`keep` vision tokens of each image plus every text token. Kept tokens keep their original
position ids.

Unlike the authors' code this needs no eager attention: the score row is recomputed from
layer K-1's post-RoPE q and k for the single query, and the layer itself stays SDPA/flash.
"""
from dataclasses import dataclass

from graphprune.errors import PassConfigError
from graphprune.rewrite.pass_api import AttentionRows, Plan, TokenPass, TopK
from graphprune.rewrite.registry import register_pass


@register_pass
class FastV(TokenPass):
    name = "fastv"
    stage = "prefill"

    @dataclass
    class Config:
        layer: int = 2               # K: first layer on the reduced sequence
        keep: int | float = 0.5      # vision tokens kept per image (R = 50% in the paper)
        positions: str = "keep"      # "keep" (the authors') or "compact" (kept tokens renumbered 0..n-1)

    def plan(self) -> Plan:
        k = self.config.layer
        return Plan(
            layer=k,
            signals={"attn": AttentionRows(layer=k - 1, query="last")},
            select=TopK(self.config.keep),
            positions=self.config.positions,
        )

    def validate(self):
        super().validate()
        if self.config.layer < 1:
            raise PassConfigError(f"fastv: layer={self.config.layer}: must be >= 1, FastV scores come from layer K-1")
        if self.config.positions not in ("keep", "compact"):
            raise PassConfigError(f"fastv: positions must be 'keep' or 'compact', got {self.config.positions!r}")
