"""VTW: Visual Tokens Withdrawal (Lin et al., 2024).

Method: vision tokens matter only in the shallow layers, where their information migrates into
the text tokens; from layer K on every vision token is withdrawn, so layers >= K (and their KV
cache) hold only system, instruction and generated tokens. Positions of the remaining tokens
are kept (the paper's Table 6 finds this better than rearranging them).

Choosing K: `graphprune.tools.vtw_calibration.calibrate()` runs the paper's procedure: for K in [5, N), the mean over
calibration samples of KL(P_withdrawn || P_full) of the last-token output distribution; the
first K at or below eta (0.003 for LLaVA-1.5-7B) is chosen.
"""
from __future__ import annotations

from dataclasses import dataclass

from graphprune.rewrite.pass_api import Plan, TokenPass, WithdrawAll
from graphprune.rewrite.registry import register_pass


@register_pass
class VTW(TokenPass):
    name = "vtw"
    stage = "prefill"

    @dataclass
    class Config:
        layer: int = 16             # K: first layer without vision tokens

    def plan(self) -> Plan:
        return Plan(layer=self.config.layer, select=WithdrawAll(), positions="keep")
