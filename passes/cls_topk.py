"""CLS top-k (FasterVLM-style): prune in the vision encoder, before the projector.

Method: the [CLS] token's attention in the vision layer that produces the LLaVA features (the
penultimate layer for vision_feature_layer=-2) is a good global importance score; keep the
`keep` patches with the highest head-averaged CLS attention and send only them through the
projector. The language model then sees `keep` tokens per image. Positions: "compact" (the
LLM simply sees a shorter prompt, as in FasterVLM) or "keep" (kept tokens keep the position
ids they had in the full prompt).

Vision encoders without CLS (Qwen2-VL, Qwen2.5-VL) cannot run this pass; vision_topk scores them by
the attention each token receives.
"""
from dataclasses import dataclass

from graphprune.errors import PassNotApplicable
from graphprune.rewrite.pass_api import AttentionRows, Plan, TokenPass, TopK
from graphprune.rewrite.registry import register_pass


@register_pass
class ClsTopK(TokenPass):
    name = "cls_topk"
    stage = "vision"

    @dataclass
    class Config:
        keep: int | float = 0.25
        positions: str = "compact"
        layer: int = -1            # vision layer of the CLS attention; -1: the feature layer

    def requires(self, anatomy):
        if not anatomy.has_cls:
            raise PassNotApplicable(f"cls_topk needs a [CLS] token in the vision encoder; "
                                    f"{anatomy.model_class} has none; vision_topk(score='attention') scores a "
                                    "tower without CLS by the attention each token receives")

    def plan(self) -> Plan:
        return Plan(select=TopK(self.config.keep), positions=self.config.positions,
                    signals={"cls": AttentionRows(layer=self.config.layer, query="cls")})

    def validate(self):
        super().validate()
        if self.config.positions not in ("compact", "keep"):
            from graphprune.errors import PassConfigError
            raise PassConfigError(f"cls_topk: positions must be 'compact' or 'keep', got {self.config.positions!r}")
