"""VisionZip: "Longer is Better but Not Necessary in Vision Language Models" (Yang et al., 2024).

Method, on the features entering the projector (the vision layer LLaVA reads):
  dominant    the patches the [CLS] token attends to most in that layer (head-averaged): cls_topk;
  contextual  the remaining patches, in raster order, are grouped around `contextual` targets taken
              evenly spaced among them (every (R // contextual)-th); each other patch joins the
              target whose key (that layer's keys, averaged over heads) is most cosine-similar;
              a contextual token is its target's features plus the mean of its members' features.
The LLM sees `keep` = dominant + contextual tokens per image, by default with the authors' split
(64 -> 54 + 10, 128 -> 108 + 20, 192 -> 162 + 30) and their sequence: the dominant tokens in
raster order, then the contextual ones in target order, compactly numbered (positions="compact").
positions="keep" puts every token at its own patch slot with that slot's position id instead.
Where graphprune departs from the authors' code (their CLS token, key heads): docs/methods.md.

dominant="attention" scores the dominant patches by the attention each receives in that layer (averaged
over queries and heads) instead, for towers without CLS: on Qwen2-VL / Qwen2.5-VL a token is a 2x2 merge
group, its score and key the means over its patches, its hidden state what enters the merger's MLP (the
normed, concatenated group), and positions="keep" (M-RoPE has no compact numbering). Not the authors'
rule: their released code reads CLIP's CLS.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from graphprune import tokenops
from graphprune.errors import InputError, PassConfigError, PassNotApplicable
from graphprune.rewrite.pass_api import AttentionRows, Choose, Hidden, Keys, Plan, TokenPass
from graphprune.rewrite.registry import register_pass


def contextual_count(keep: int, contextual: int | None) -> int:
    """Contextual tokens of a budget: the authors' 10 of 64 (5/32 of keep) unless given."""
    return round(keep * 5 / 32) if contextual is None else contextual


def zip_tokens(*, k, protected, valid, vision_pos, cls, keys, hidden, contextual, heads, authors_order):
    """Dominant + contextual tokens of each image: hidden (B, n, V, D), keys (B, n, V, H*d), cls (B, 1, n, V)
    the dominant score (CLS attention, or attention received)."""
    if valid is not None:
        raise InputError("visionzip: an earlier vision pass left masked slots; VisionZip needs every patch "
                         "(run it as the only vision pass)")
    b, n, v, d = hidden.shape
    c = contextual_count(k, contextual)
    dom = tokenops.rank_scores(cls[:, 0], protected, valid).topk(k - c, dim=-1).indices.sort(-1).values
    rest = tokenops.true_positions(torch.ones(b, n, v, dtype=torch.bool, device=hidden.device).scatter(-1, dom, False),
                                   v - (k - c))                                 # raster order
    if c == 0:
        return dom
    metric = keys.float()
    if heads is not None:                      # the authors' metric: keys averaged over heads
        metric = metric.reshape(*metric.shape[:-1], heads, -1).mean(-2)
    metric = F.normalize(metric.gather(2, rest[..., None].expand(b, n, v - (k - c), metric.shape[-1])), dim=-1)
    r = rest.shape[-1]
    targets = list(range(0, r, max(1, r // c)))[:c]                               # evenly spaced among the rest
    target = torch.tensor(targets, device=hidden.device)
    member = torch.tensor([i for i in range(r) if i not in set(targets)], dtype=torch.long, device=hidden.device)
    sim = metric[:, :, member] @ metric[:, :, target].transpose(-1, -2)           # (B, n, members, c)
    assign = F.one_hot(sim.argmax(-1), c).to(hidden.dtype)
    rest_hidden = hidden.gather(2, rest[..., None].expand(b, n, r, d))
    mean = assign.transpose(-1, -2) @ rest_hidden[:, :, member] / assign.sum(-2)[..., None].clamp(min=1)
    ctx = rest_hidden[:, :, target] + mean                                        # (B, n, c, D)
    ctx_slots = rest[:, :, target]
    picked = torch.cat([dom, ctx_slots], -1)
    values = torch.cat([hidden.gather(2, dom[..., None].expand(b, n, k - c, d)), ctx], 2)
    if authors_order:
        # the LLM reads the kept slots in raster order and compacts their positions, so writing the
        # values in the authors' order (dominant, then contextual) gives it their sequence
        return {"picked": picked.sort(-1).values, "values": values}
    order = picked.argsort(-1)
    return {"picked": picked.gather(-1, order), "values": values.gather(2, order[..., None].expand(b, n, k, d))}


@register_pass
class VisionZip(TokenPass):
    name = "visionzip"
    stage = "vision"

    @dataclass
    class Config:
        keep: int = 64
        contextual: int | None = None  # contextual tokens; default round(keep * 5 / 32), the authors' 10 of 64
        positions: str = "compact"     # compact: the authors' sequence; keep: each token at its own slot
        heads: int | None = None       # split the keys into this many heads and average them (the authors'
                                       # metric; the pass API gives keys with heads concatenated)
        dominant: str = "cls"          # dominant score: CLS attention, or "attention" each patch receives

    def validate(self):
        super().validate()
        c = self.config
        if isinstance(c.keep, bool) or not isinstance(c.keep, int):
            raise PassConfigError(f"visionzip: keep must be an int (tokens per image), got {c.keep!r}")
        ctx = contextual_count(c.keep, c.contextual)
        if isinstance(ctx, bool) or not isinstance(ctx, int) or not 0 <= ctx < c.keep:
            raise PassConfigError(f"visionzip: contextual={c.contextual!r} must be an int in 0..keep-1={c.keep - 1}")
        if c.positions not in ("compact", "keep"):
            raise PassConfigError(f"visionzip: positions must be 'compact' or 'keep', got {c.positions!r}")
        if c.heads is not None and (isinstance(c.heads, bool) or not isinstance(c.heads, int) or c.heads < 1):
            raise PassConfigError(f"visionzip: heads must be a positive int or None, got {c.heads!r}")
        if c.dominant not in ("cls", "attention"):
            raise PassConfigError(f"visionzip: dominant must be 'cls' or 'attention', got {c.dominant!r}")

    def requires(self, anatomy):
        if not anatomy.has_cls and self.config.dominant == "cls":
            raise PassNotApplicable(f"visionzip needs the CLS token of the vision encoder; {anatomy.model_class} "
                                    "has none: dominant='attention' scores its patches by the attention they "
                                    "receive (or use an LLM-stage method such as fastv)")
        if self.config.heads is not None and anatomy.layers:
            q = anatomy.layers[-1].attention.q.meta.get("val")
            if q is not None and q.shape[1] != self.config.heads:
                raise PassConfigError(f"visionzip: heads={self.config.heads}, but the vision encoder's attention has "
                                      f"{q.shape[1]} heads; set heads={q.shape[1]} or None")

    def plan(self) -> Plan:
        c = self.config
        options = (("contextual", c.contextual), ("heads", c.heads), ("authors_order", c.positions == "compact"))
        return Plan(positions=c.positions, select=Choose(c.keep, zip_tokens, options, merges=True),
                    signals={"cls": AttentionRows(-1, "cls" if c.dominant == "cls" else "all"), "keys": Keys(-1),
                             "hidden": Hidden(-1)})
