"""VisPruner: "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in
VLMs" (Zhang et al., ICCV 2025).

Method, on the features entering the projector (the vision layer LLaVA reads), `keep` tokens per image:
  important  the int(keep x important_ratio) patches the [CLS] token attends to most in that layer
             (head-averaged);
  diverse    the other patches, in descending CLS attention, lose duplicates until keep - important
             remain: split them alternately into A (even places) and B (odd places); the (at most 8)
             A tokens whose best cosine match in B is highest go; A's survivors (most distinct first)
             followed by B form the next round's order.
The LLM sees the kept patches in raster order, compactly numbered (positions="compact", as the
authors' LLaVA) or with their own position ids ("keep"). Departures from the authors' code:
docs/methods.md.

important="attention" ranks by the attention each token receives in the encoder's last block (averaged
over queries and heads) instead of CLS attention, the authors' answer for CLS-free towers (VisPruner
GitHub issue #1: Qwen2.5-VL's 2x2 merge applied to the attention, then VisPruner on the merged tokens):
a Qwen token's score is its 4 patches' mean (their sum / 4: the same order), its diversity features
what enters the merger's MLP, and positions="keep" (M-RoPE has no compact numbering).
"""
from dataclasses import dataclass

import torch

from graphprune import tokenops
from graphprune.errors import InputError, PassConfigError, PassNotApplicable
from graphprune.rewrite.blocks import cosine_matrix
from graphprune.rewrite.pass_api import AttentionRows, Choose, Hidden, Plan, TokenPass
from graphprune.rewrite.registry import register_pass

DROP_PER_ROUND = 8          # the authors' cap on tokens removed per matching round


def important_diverse(*, k, protected, valid, vision_pos, cls, hidden, important_ratio):
    """Important + diverse tokens of each image: hidden (B, n, V, D), cls (B, 1, n, V)."""
    if valid is not None:
        raise InputError("vispruner: an earlier vision pass left masked slots; VisPruner needs every patch "
                         "(run it as the only vision pass)")
    n_imp = int(k * important_ratio)
    order = tokenops.rank_scores(cls[:, 0], protected, valid).argsort(dim=-1, descending=True, stable=True)
    residual = order[..., n_imp:]
    n_div = k - n_imp
    while n_div > 0:
        r_len = residual.shape[-1]
        drop = min(DROP_PER_ROUND, r_len - n_div)
        if drop <= 0:
            break
        a, b = residual[..., ::2], residual[..., 1::2]
        d = hidden.shape[-1]
        fa = hidden.gather(2, a[..., None].expand(*a.shape, d))
        fb = hidden.gather(2, b[..., None].expand(*b.shape, d))
        best = cosine_matrix(fa, fb).amax(-1)                                     # A's best match in B
        distinct = best.argsort(dim=-1, descending=True, stable=True)[..., drop:]
        residual = torch.cat([a.gather(-1, distinct), b], -1)
    picked = order[..., :n_imp] if n_div == 0 else torch.cat([order[..., :n_imp], residual], -1)
    return picked.sort(-1).values


@register_pass
class VisPruner(TokenPass):
    name = "vispruner"
    stage = "vision"

    @dataclass
    class Config:
        keep: int = 64
        important_ratio: float = 0.5    # the authors' default split
        positions: str = "compact"
        important: str = "cls"          # importance: CLS attention (the authors'), or "attention" received

    def validate(self):
        super().validate()
        c = self.config
        if isinstance(c.keep, bool) or not isinstance(c.keep, int):
            raise PassConfigError(f"vispruner: keep must be an int (tokens per image), got {c.keep!r}")
        if isinstance(c.important_ratio, bool) or not isinstance(c.important_ratio, (int, float)) \
                or not 0.0 <= c.important_ratio <= 1.0:
            raise PassConfigError(f"vispruner: important_ratio must lie in [0, 1], got {c.important_ratio!r}")
        if c.positions not in ("compact", "keep"):
            raise PassConfigError(f"vispruner: positions must be 'compact' or 'keep', got {c.positions!r}")
        if c.important not in ("cls", "attention"):
            raise PassConfigError(f"vispruner: important must be 'cls' or 'attention', got {c.important!r}")

    def requires(self, anatomy):
        if not anatomy.has_cls and self.config.important == "cls":
            raise PassNotApplicable(f"vispruner needs the CLS token of the vision encoder; {anatomy.model_class} "
                                    "has none: important='attention' ranks its tokens by the attention they "
                                    "receive (the authors' answer for CLS-free towers)")

    def plan(self) -> Plan:
        return Plan(positions=self.config.positions,
                    signals={"cls": AttentionRows(-1, "cls" if self.config.important == "cls" else "all"), "hidden": Hidden(-1)},
                    select=Choose(self.config.keep, important_diverse,
                                  (("important_ratio", float(self.config.important_ratio)),)))
