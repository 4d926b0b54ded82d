"""Vision top-k: keep each image's (or video frame's) `keep` highest-scoring vision tokens in the vision
stage, on towers with or without CLS.

score="attention": the attention each token receives in vision layer `layer` (default -1: the feature
layer), averaged over every query of the encoder and over heads, as VisionZip-style methods score
towers without CLS; where the LLM's tokens merge encoder patches (Qwen2-VL / Qwen2.5-VL's 2x2 merger)
a token's score is the mean over its 4 patches. On Qwen2.5-VL the layer must be full-attention for the
score to be global: its released checkpoints end with one (fullatt_block_indexes ends at depth - 1), so
the default reads the whole image; a windowed layer's attention stays within its window.
score="norm": the L2 norm of each projected token (the LLM-space feature), selected after the projector.
Kept tokens go through the projector alone and keep their prompt positions (positions="keep", M-RoPE's
(t, h, w) ids included, as vLLM's EVS does), or, on 1-D RoPE models, are renumbered ("compact").
cls_topk is the same selection scored by the CLS token's attention instead.
"""
from dataclasses import dataclass

from graphprune.errors import PassConfigError
from graphprune.rewrite.pass_api import AttentionRows, Plan, Projected, TokenPass, TopK
from graphprune.rewrite.registry import register_pass

SCORES = ("attention", "norm")


def projected_norm(projected):
    return projected.norm(dim=-1)               # (images, 1, tokens, D) -> scores (images, 1, tokens)


@register_pass
class VisionTopK(TokenPass):
    name = "vision_topk"
    stage = "vision"

    @dataclass
    class Config:
        keep: int | float = 0.25
        score: str = "attention"
        layer: int = -1             # score="attention": vision layer read (-1: the feature layer)
        positions: str = "keep"

    def validate(self):
        super().validate()
        c = self.config
        if c.score not in SCORES:
            raise PassConfigError(f"vision_topk: score must be one of {SCORES}, got {c.score!r}")
        if c.positions not in ("compact", "keep"):
            raise PassConfigError(f"vision_topk: positions must be 'compact' or 'keep', got {c.positions!r}")
        if c.score == "norm" and c.layer != -1:
            raise PassConfigError(f"vision_topk: layer={c.layer} applies to score='attention' only; score='norm' "
                                  "reads the projected tokens")

    def plan(self) -> Plan:
        c = self.config
        if c.score == "norm":
            return Plan(select=TopK(c.keep), positions=c.positions, after_projector=True,
                        signals={"projected": Projected()}, score=projected_norm)
        return Plan(select=TopK(c.keep), positions=c.positions,
                    signals={"received": AttentionRows(layer=c.layer, query="all")})
