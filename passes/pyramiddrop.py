"""PyramidDrop: "Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy
Reduction" (Xing et al., 2024).

Method: the language model runs in stages; at each stage boundary (the authors' layers 8, 16, 24
of 32) the vision tokens are ranked by the attention the last instruction token pays them,
recomputed for that single query (head-averaged softmax row), and only the top ones go on, so that
stage i keeps int(V x ratio_i) of each image's V tokens (ratios 0.5, 0.25, 0.125): a pyramid.
Text tokens are never dropped.

For models with fewer layers set `layers` (e.g. (1, 2, 3) for a 4-layer model). Counts: each stage
keeps floor(current x ratio_i / ratio_(i-1)) tokens, the authors' int(V x ratio_i) whenever
V x ratio_(i-1) is whole (576 tokens: 288, 144, 72). Departures from the authors' code (which
layer's attention ranks, positions): docs/methods.md.
"""
import math
from dataclasses import dataclass

from graphprune import tokenops
from graphprune.errors import PassConfigError
from graphprune.rewrite.pass_api import AttentionRows, Choose, Plan, TokenPass, layer_tuple
from graphprune.rewrite.registry import register_pass


def pyramid_stage(*, k, protected, valid, vision_pos, attn, share):
    """Keep floor(current tokens x share) of each image's vision tokens, by the last token's attention."""
    count = max(1, math.floor(vision_pos.shape[-1] * share + 1e-9))
    return tokenops.rank_scores(attn[:, 0], protected, valid).topk(count, dim=-1).indices.sort(-1).values


@register_pass
class PyramidDrop(TokenPass):
    name = "pyramiddrop"

    @dataclass
    class Config:
        layers: tuple = (8, 16, 24)            # first layer of each reduced stage
        ratios: tuple = (0.5, 0.25, 0.125)     # share of the original vision tokens each stage keeps
        positions: str = "keep"

    def validate(self):
        c = self.config
        if isinstance(c.ratios, (int, float)):
            c.ratios = (c.ratios,)
        c.layers, c.ratios = layer_tuple(self.name, c.layers, lowest=1), tuple(c.ratios)
        if len(c.ratios) != len(c.layers):
            raise PassConfigError(f"pyramiddrop: ratios={c.ratios!r} needs one ratio per layer in layers={c.layers!r}")
        if any(isinstance(r, bool) or not isinstance(r, (int, float)) for r in c.ratios) \
                or not all(0 < r <= 1 for r in c.ratios) or list(c.ratios) != sorted(c.ratios, reverse=True):
            raise PassConfigError(f"pyramiddrop: ratios must be non-increasing fractions in (0, 1], got {c.ratios!r}")
        if c.positions != "keep":
            raise PassConfigError(f"pyramiddrop: positions={c.positions!r}: only 'keep' is supported between LLM "
                                  "layers for now (the authors compact them)")

    def requires(self, anatomy):
        n = len(anatomy.layers)
        if n and self.config.layers[-1] >= n:
            raise PassConfigError(f"pyramiddrop: layers={self.config.layers!r} do not fit a {n}-layer language model; "
                                  f"use layers in 1..{n - 1}, e.g. layers={tuple(range(1, min(n, 4)))}")

    def plan(self) -> list[Plan]:
        c = self.config
        shares = [r / prev for r, prev in zip(c.ratios, (1.0,) + c.ratios[:-1])]
        return [Plan(layer=l, positions="keep", signals={"attn": AttentionRows(l - 1, query="last")},
                     select=Choose(share, pyramid_stage, (("share", share),)))
                for l, share in zip(c.layers, shares)]
