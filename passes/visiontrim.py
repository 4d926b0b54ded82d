"""VisionTrim: "Unified Vision Token Compression for Training-Free MLLM Acceleration" (seed 003).

Two modules, usable in the vision stage (on the projector's output) and between LLM layers:
  DVTS  dominant vision token selection: a global score (CLS attention in the vision stage, the
        text-to-vision attention of the hidden states in the LLM, Eq. 13) and a local one (LTAM:
        how strongly a token's grid neighbours are drawn to it, by feature and position kernels),
        mixed by their variances (Eq. 6); the top K tokens are kept as they are.
  TGVC  text-guided vision complement: the remaining tokens most similar to the instruction become
        R cluster centres; every other remaining token joins the centre it is most text-aligned
        with, and each centre becomes itself plus the weighted mean of its members (Eq. 7-11).
Output: the K dominant and R complement tokens per image, each at its own slot (positions kept).
Budget: keep = K + R, K:R = 3:1 by default (Tables 9-10). LLaVA has no CLIP text encoder, so the
vision stage's text features are the LLM's input embeddings of the instruction tokens (the space
the projected vision tokens live in). Exact readings of the equations: docs/methods.md.

Anyres images (LLaVA-NeXT): an image is a base view and high-resolution crops, each its own square patch
grid of the CLIP tower, then unpadded. LTAM (the one grid-bound part) runs per crop: a token's neighbours are
the tokens of its window on its own crop (CropNeighbours), a patch unpadded away is no token, so never a
neighbour and never kept; sigma_f / sigma_p pool the image's neighbour pairs. The global score is each token's
own crop's CLS attention, softmaxed over the image. The K + R budget is the image's, as the paper's LLaVA-NeXT
budgets (280 + 40 of 2880) are: DVTS's top K and TGVC's R centres are taken over all the image's tokens, with
no per-crop quota, so a crop holding more dominant tokens keeps more.
"""
import math
from dataclasses import dataclass

import torch

from graphprune import tokenops
from graphprune.errors import InputError, PassConfigError, PassNotApplicable
from graphprune.rewrite.blocks import grid_side, ltam_scores, table_ltam_scores, tgvc, variance_weighting
from graphprune.rewrite.pass_api import (
    AttentionRows,
    Choose,
    CropNeighbours,
    Hidden,
    Plan,
    Projected,
    TextEmbeds,
    TextMask,
    TokenPass,
)
from graphprune.rewrite.registry import register_pass, register_pipeline


def split_budget(keep: int, dominant: int | None) -> tuple[int, int]:
    """(K dominant, R complement) tokens for a budget: K = keep - keep // 4 unless given."""
    k = keep - keep // 4 if dominant is None else dominant
    return k, keep - k


def trim(*, k, protected, valid, vision_pos, feats, global_score, text, text_mask, dominant, window, w1, w2, w3, iterations,
         neighbours=None):
    """DVTS + TGVC on each image's tokens feats (B, n, V, D); text (B, n, T, D). neighbours (B, n, V, M): an
    anyres image's LTAM neighbourhoods on its crops' grids (None: the tokens are one square grid)."""
    b, n, v, d = feats.shape
    k_dom, r = split_budget(k, dominant)
    if r > v - k_dom:
        raise InputError(f"visiontrim: {r} complement tokens but only {v - k_dom} tokens remain after the "
                         f"{k_dom} dominant ones")
    local = ltam_scores(feats, window, w1, w2, w3) if neighbours is None else \
        table_ltam_scores(feats, neighbours, window, w1, w2, w3)
    score = variance_weighting(global_score, local)
    dom = tokenops.rank_scores(score, protected, valid).topk(k_dom, dim=-1).indices
    rest_mask = torch.ones(b, n, v, dtype=torch.bool, device=feats.device).scatter(-1, dom, False)
    rest = tokenops.true_positions(rest_mask, v - k_dom)
    values = feats
    picked = dom
    if r:
        mask = text_mask[:, None].expand(b, n, -1) if text_mask.dim() == 2 else text_mask
        centres, comp = tgvc(feats.gather(2, rest[..., None].expand(b, n, v - k_dom, d)), text, mask, r, iterations)
        centres = rest.gather(-1, centres)
        values = feats.scatter(2, centres[..., None].expand(b, n, r, d), comp.to(feats.dtype))
        picked = torch.cat([dom, centres], -1)
    picked = picked.sort(-1).values
    return {"picked": picked, "values": values.gather(2, picked[..., None].expand(b, n, picked.shape[-1], d))}


def trim_vision(*, cls, feats, text, text_mask, **kw):
    # global score: softmax over the image's tokens of the head-averaged CLS attention
    return trim(feats=feats, global_score=cls[:, 0].float().softmax(-1), text=text[:, None],
                text_mask=text_mask.bool()[:, None], **kw)


def trim_llm(*, hidden, text_hidden, text_mask, **kw):
    # global score (Eq. 13): per instruction token a softmax over the image's vision tokens, averaged
    b, n, v, d = hidden.shape
    text = text_hidden.float()[:, None].expand(b, n, -1, -1)
    rows = (text @ hidden.float().transpose(-1, -2) / math.sqrt(d)).softmax(-1)      # (B, n, T, V)
    m = text_mask.bool()[:, None, :, None]
    alpha = (rows * m).sum(-2) / m.sum(-2).clamp(min=1)
    return trim(feats=hidden.float(), global_score=alpha, text=text, text_mask=text_mask.bool()[:, None].expand(b, n, -1),
                **kw)


@dataclass
class _Options:
    keep: int = 64
    dominant: int | None = None          # K; default keep - keep // 4 (DVTS:TGVC = 3:1)
    window: int = 3                      # LTAM neighbourhood (odd)
    w1: float = 1.0
    w2: float = 1.0
    w3: float = 1.0
    iterations: int = 1                  # TGVC refinement rounds


class _VisionTrimBase(TokenPass):
    def validate(self):
        super().validate()
        c = self.config
        if isinstance(c.keep, bool) or not isinstance(c.keep, int):
            raise PassConfigError(f"{self.name}: keep must be an int (tokens per image), got {c.keep!r}")
        k, r = split_budget(c.keep, c.dominant)
        if not 1 <= k <= c.keep or r < 0:
            raise PassConfigError(f"{self.name}: dominant={c.dominant} must lie in 1..keep={c.keep}")
        if c.window < 3 or c.window % 2 == 0:
            raise PassConfigError(f"{self.name}: window={c.window} must be odd and >= 3")
        if min(c.w1, c.w2) <= 0 or c.w3 < 0:
            raise PassConfigError(f"{self.name}: w1, w2 must be > 0 and w3 >= 0 (got {c.w1}, {c.w2}, {c.w3})")
        if c.iterations < 1:
            raise PassConfigError(f"{self.name}: iterations={c.iterations} must be >= 1")

    def check_prompt(self, prompt):
        if int(prompt.text_mask.sum(1).min()) < 1:
            raise InputError(f"{self.name}: a prompt has no instruction tokens after its image; TGVC needs text")
        v = prompt.vision_pos.shape[-1]
        k, r = split_budget(self.config.keep, self.config.dominant)
        if r > v - k:
            raise InputError(f"{self.name}: R={r} complement tokens exceed the {v - k} tokens left after "
                             f"{k} dominant ones of {v}")

    def _options(self):
        c = self.config
        return tuple((f, getattr(c, f)) for f in ("dominant", "window", "w1", "w2", "w3", "iterations"))


@register_pass
class VisionTrimVision(_VisionTrimBase):
    name = "visiontrim_vision"
    stage = "vision"

    @dataclass
    class Config(_Options):
        pass

    def requires(self, anatomy):
        if not anatomy.has_cls:
            raise PassNotApplicable(f"visiontrim_vision needs the CLS token of the vision encoder; "
                                    f"{anatomy.model_class} has none (use visiontrim_llm where each image is one "
                                    "patch grid; on anyres crops vision_topk or visionzip(dominant='attention'))")
        if anatomy.grid is not None:
            v = anatomy.grid[0] * anatomy.grid[1]
            k, r = split_budget(self.config.keep, self.config.dominant)
            if self.config.keep > v or r > v - k:
                raise PassConfigError(f"visiontrim_vision: keep={self.config.keep} (K={k}, R={r}) does not fit the {v} "
                                      "patches per image")

    def plan(self) -> Plan:
        return Plan(after_projector=True, positions="keep",
                    signals={"cls": AttentionRows(-1, "cls"), "feats": Projected(), "text": TextEmbeds(),
                             "text_mask": TextMask(), "neighbours": CropNeighbours(self.config.window)},
                    select=Choose(self.config.keep, trim_vision, self._options(), merges=True))


@register_pass
class VisionTrimLLM(_VisionTrimBase):
    name = "visiontrim_llm"

    @dataclass
    class Config(_Options):
        layer: int = 2

    def check_prompt(self, prompt):
        super().check_prompt(prompt)
        if prompt.patches_kept is not None:
            raise InputError("visiontrim_llm: LTAM needs each image's full patch grid, and a vision-stage pass "
                             "already reduced it; run VisionTrim in one stage, or prune the vision stage with "
                             "a grid-free method")
        if prompt.grid_free:
            raise InputError(f"visiontrim_llm: LTAM lays each vision unit's tokens on one square patch grid, but "
                             f"{prompt.grid_free}; prune this prompt with a grid-free method (fastv, dart, random, "
                             "mustdrop_filter)")
        grid_side(prompt.vision_pos.shape[-1])

    def plan(self) -> Plan:
        src = self.config.layer - 1
        return Plan(layer=self.config.layer,
                    signals={"hidden": Hidden(src), "text_hidden": Hidden(src, "text"), "text_mask": TextMask()},
                    select=Choose(self.config.keep, trim_llm, self._options(), merges=True))


@register_pipeline("visiontrim")
def visiontrim(keep: int = 64, *, stage: str = "vision", layer: int = 2, **options):
    """VisionTrim at one stage: "vision" (DVTS + TGVC on the projector output, the paper's main
    setting) or "llm" (between LLM layers, before `layer`)."""
    if stage == "vision":
        return [VisionTrimVision(keep=keep, **options)]
    if stage == "llm":
        return [VisionTrimLLM(keep=keep, layer=layer, **options)]
    raise PassConfigError(f"visiontrim: stage must be 'vision' or 'llm', got {stage!r}")
