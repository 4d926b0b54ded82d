"""Random: keep a uniformly random subset of each image's vision tokens (seeded).

The baseline of DART's Fig. 2, which often matches attention-based methods at high reduction.
Scores u ~ U(0, 1) come from `torch.Generator().manual_seed(seed)`, one per (sample, image,
token); the top `keep` are kept (protected tokens first). Runs in the prefill at `layer`
(positions kept) or in the vision stage before the projector (`stage="vision"`).
"""
from dataclasses import dataclass

import torch

from graphprune import tokenops
from graphprune.errors import PassConfigError
from graphprune.rewrite.pass_api import Choose, Plan, TokenPass
from graphprune.rewrite.registry import register_pass


def random_keep(*, k, protected, valid, vision_pos, seed):
    u = torch.rand(tuple(vision_pos.shape), generator=torch.Generator().manual_seed(seed)).to(vision_pos.device)
    return tokenops.rank_scores(u, protected, valid).topk(k, dim=-1).indices.sort(-1).values


@register_pass
class Random(TokenPass):
    name = "random"

    @dataclass
    class Config:
        keep: int | float = 0.25
        layer: int | None = None     # prefill only: first layer on the reduced sequence (default 2)
        stage: str = "prefill"       # or "vision": before the projector
        seed: int = 0
        positions: str | None = None  # vision stage only: "keep" (default) or "compact"

    def validate(self):
        super().validate()
        c = self.config
        if c.stage not in ("prefill", "vision"):
            raise PassConfigError(f"random: stage must be 'prefill' or 'vision', got {c.stage!r}")
        if c.positions not in (None, "keep", "compact"):
            raise PassConfigError(f"random: positions must be 'keep' or 'compact', got {c.positions!r}")
        # an option the chosen stage does not use is refused, not silently ignored
        if c.stage == "vision" and c.layer is not None:
            raise PassConfigError(f"random: layer={c.layer} applies to stage='prefill' only; the vision stage acts "
                                  "on the features entering the projector")
        if c.stage == "prefill" and c.positions not in (None, "keep"):
            raise PassConfigError(f"random: positions={c.positions!r} applies to stage='vision' only; in the "
                                  "prefill kept tokens keep their positions")
        c.layer = 2 if c.stage == "prefill" and c.layer is None else c.layer
        c.positions = c.positions or "keep"
        self.stage = c.stage

    def plan(self) -> Plan:
        return Plan(layer=self.config.layer if self.stage == "prefill" else None,
                    select=Choose(self.config.keep, random_keep, (("seed", self.config.seed),)),
                    positions=self.config.positions if self.stage == "vision" else "keep")
