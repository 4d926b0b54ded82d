"""DART: "Stop Looking for Important Tokens ... Duplication Matters More" (Wen et al., 2025).

Method (docs/methods.md): after layer K-1, choose a few pivot tokens (by default the 4 vision
and 4 instruction tokens whose post-RoPE keys have the largest L1 norm), then keep the vision
tokens that duplicate the pivots least: for each pivot in turn, the candidates with the lowest
cosine similarity to it (on layer K-1's output after the final norm) are kept and leave the
pool. Retained = vision pivots + picks, exactly `keep` per image; text pivots only guide.
Positions are kept.

Needs no attention map (k_norm, v_norm, random): the layers stay SDPA / flash. Pivot order:
order="authors" visits them as the authors' code does: it puts the pivots' sequence indices in a
Python set and iterates it, so the order is CPython's hash-table order of those ints (ascending
index only while they are below the table size, 32 for 8 pivots). The default, order="score",
visits vision pivots by score, then text pivots by score: the emulated hash table unrolls into
~58k ONNX nodes when a graph is exported (minutes to export), so the authors' order is opt-in. The budget is exactly `keep` (budget="exact"); budget="authors" keeps
what their code keeps: vision_pivots + P x (keep // P) (132 for 128).
"""
import math
from dataclasses import dataclass

import torch

from graphprune.errors import InputError, PassConfigError
from graphprune.rewrite.blocks import cosine_matrix
from graphprune.rewrite.pass_api import (
    AttentionRows,
    Choose,
    Hidden,
    Keys,
    Plan,
    SequenceIndex,
    TextMask,
    TokenPass,
    Values,
)
from graphprune.rewrite.registry import register_pass

CRITERIA = ("k_norm", "v_norm", "attn_max", "attn_min", "random")
ORDERS = ("authors", "score")
BUDGETS = ("exact", "authors")
LINEAR_PROBES, PERTURB_SHIFT, MIN_TABLE = 9, 5, 8      # CPython's set table (Objects/setobject.c)


def set_iteration_order(keys):
    """(..., P) distinct non-negative ints, in insertion order -> (..., P) their indices in the order
    iterating a CPython set built from them visits them: the slot order of its open-addressing
    table (slot = key & mask, then up to 9 linear probes, then perturbed probing), with the table
    resized (x4 the entries) once it is 3/5 full."""
    p = keys.shape[-1]
    flat = keys.reshape(-1, p).long()
    size, table = MIN_TABLE, torch.full((flat.shape[0], MIN_TABLE), -1, dtype=torch.long, device=keys.device)
    for j in range(p):
        table = _set_insert(table, flat, torch.full_like(flat[:, 0], j))
        if (j + 1) * 5 >= (size - 1) * 3:
            while size <= (j + 1) * 4:
                size *= 2
            old, table = table, torch.full((flat.shape[0], size), -1, dtype=torch.long, device=keys.device)
            for slot in range(old.shape[1]):                  # re-inserted in the old table's slot order
                table = _set_insert(table, flat, old[:, slot])
    members = table.gather(1, torch.argsort((table < 0).to(torch.int8), dim=1, stable=True)[:, :p])
    return members.reshape(keys.shape)


def _set_insert(table, keys, member):
    # put member (N,) (-1: nothing) into the first free slot of its key's probe sequence
    size = table.shape[1]
    mask = size - 1
    key = keys.gather(1, member.clamp(min=0)[:, None])[:, 0]
    i, perturb, placed = key & mask, key, member < 0
    offsets = torch.arange(LINEAR_PROBES + 1, device=table.device)
    for _ in range(size + 64 // PERTURB_SHIFT + 1):           # enough rounds to visit every slot
        slots = (i[:, None] + offsets).clamp(max=mask)
        probes = torch.where(i + LINEAR_PROBES <= mask, LINEAR_PROBES + 1, 1)
        free = (offsets < probes[:, None]) & (table.gather(1, slots) < 0)
        put = free.any(1) & ~placed
        slot = slots.gather(1, free.long().argmax(1, keepdim=True))
        table = table.scatter(1, slot, torch.where(put[:, None], member[:, None], table.gather(1, slot)))
        placed = placed | put
        if not torch.compiler.is_compiling() and bool(placed.all()):
            break
        perturb = perturb >> PERTURB_SHIFT
        i = (i * 5 + 1 + perturb) & mask
    return table


def dart_keep(*, k, protected, valid, vision_pos, vis_score, text_score, vis_feat, text_feat, text_mask,
              vision_pivots, text_pivots, lowest_first, seed, order="score", budget="exact", vis_index=None,
              text_index=None):
    b, n, v = vision_pos.shape
    if vis_score is None:                                     # random pivots
        gen = torch.Generator().manual_seed(seed)
        # drawn on the CPU generator whatever the device, so a seed picks the same pivots everywhere
        vis_score = torch.rand((b, n, v), generator=gen).to(vision_pos.device)
        text_score = torch.rand(tuple(text_mask.shape), generator=gen).to(vision_pos.device)
    sign = -1.0 if lowest_first else 1.0
    vs, ts = sign * vis_score.float(), (sign * text_score.float()).masked_fill(~text_mask, float("-inf"))
    vis_piv = vs.topk(vision_pivots, dim=-1).indices                               # (B, n, pv) best first
    txt_piv = ts.topk(text_pivots, dim=-1).indices                                 # (B, pt) best first
    chosen = torch.zeros(b, n, v, dtype=torch.bool, device=vs.device).scatter(-1, vis_piv, True)
    if protected is not None:
        chosen |= protected
    # pivots in visiting order, their features, and each one's share of the remaining budget
    d = vis_feat.shape[-1]
    piv_feat = torch.cat([vis_feat.gather(2, vis_piv[..., None].expand(b, n, vision_pivots, d)),
                          text_feat.gather(1, txt_piv[..., None].expand(b, text_pivots, d))[:, None].expand(
                              b, n, text_pivots, d)], 2)
    p = vision_pivots + text_pivots
    if order == "authors":          # the pivots' sequence indices in a Python set, iterated
        piv_index = torch.cat([vis_index.gather(2, vis_piv), text_index.gather(1, txt_piv)[:, None].expand(
            b, n, text_pivots)], 2)
        visit = set_iteration_order(piv_index)
        piv_feat = piv_feat.gather(2, visit[..., None].expand_as(piv_feat))
    if budget == "authors":         # each pivot picks k // P on top of the vision pivots
        k = min(vision_pivots + p * (k // p), v)
    rest = (k - chosen.sum(-1)).clamp(min=0)                                        # (B, n)
    share = rest[..., None] // p + (torch.arange(p, device=vs.device) < rest[..., None] % p)   # (B, n, P)
    sim = cosine_matrix(piv_feat, vis_feat)                                         # (B, n, P, V)
    most = min(math.ceil(k / p), v)
    for i in range(p):
        dup = sim[:, :, i].masked_fill(chosen, float("inf"))                     # pool: not yet retained
        least = (-dup).topk(most, dim=-1).indices                                  # least duplicated first
        take = torch.arange(most, device=vs.device) < share[:, :, i:i + 1]
        chosen |= torch.zeros_like(chosen).scatter(-1, least, take)
    # retained: protected tokens first, then vision pivots best first, then the picks; exactly k of
    # them (pivots beyond a small budget give way to the key set, which no pass may drop)
    priority = torch.full((b, n, v), p + 2, device=vs.device).masked_fill(chosen, p + 1)
    priority = priority.scatter(-1, vis_piv, torch.arange(1, vision_pivots + 1, device=vs.device).expand_as(vis_piv))
    if protected is not None:
        priority = priority.masked_fill(protected, 0)
    return torch.argsort(priority, dim=-1, stable=True)[..., :k].sort(-1).values


@register_pass
class Dart(TokenPass):
    name = "dart"

    @dataclass
    class Config:
        layer: int = 2
        keep: int | float = 128 / 576        # 128 of LLaVA-1.5's 576 tokens
        vision_pivots: int = 4
        text_pivots: int = 4
        criterion: str = "k_norm"            # k_norm | v_norm | attn_max | attn_min | random
        seed: int = 0                        # criterion="random"
        order: str = "score"                 # pivot visiting order: "score" | "authors" (Python-set order)
        budget: str = "exact"                # "exact": keep tokens; "authors": vision_pivots + P x (keep // P)

    def validate(self):
        super().validate()
        c = self.config
        if c.criterion not in CRITERIA:
            raise PassConfigError(f"dart: criterion must be one of {', '.join(CRITERIA)}, got {c.criterion!r}")
        for option, allowed in (("order", ORDERS), ("budget", BUDGETS)):
            if getattr(c, option) not in allowed:
                raise PassConfigError(f"dart: {option} must be one of {', '.join(allowed)}, "
                                      f"got {getattr(c, option)!r}")
        if c.vision_pivots < 0 or c.text_pivots < 0 or c.vision_pivots + c.text_pivots == 0:
            raise PassConfigError("dart: pivot counts must be >= 0 and at least one pivot is needed "
                                  f"(vision_pivots={c.vision_pivots}, text_pivots={c.text_pivots})")
        if isinstance(c.keep, int) and c.keep < c.vision_pivots:
            raise PassConfigError(f"dart: keep={c.keep} is smaller than vision_pivots={c.vision_pivots}")
        if c.layer < 1:
            raise PassConfigError(f"dart: layer={c.layer}: must be >= 1, DART reads layer K-1")

    def check_prompt(self, prompt):
        fewest = int(prompt.text_mask.sum(1).min())
        if fewest < self.config.text_pivots:
            raise InputError(f"dart: a prompt has {fewest} instruction tokens after the image, fewer than "
                             f"text_pivots={self.config.text_pivots}; lower text_pivots")

    def plan(self) -> Plan:
        c, src = self.config, self.config.layer - 1
        signals = {"vis_feat": Hidden(src, norm=True), "text_feat": Hidden(src, "text", norm=True),
                   "text_mask": TextMask()}
        if c.criterion in ("k_norm", "v_norm"):
            kind = Keys if c.criterion == "k_norm" else Values
            signals.update(vis_score=kind(src), text_score=kind(src, "text"))
        elif c.criterion in ("attn_max", "attn_min"):
            signals.update(vis_score=AttentionRows(src, "last"), text_score=AttentionRows(src, "last", keys="text"))
        if c.order == "authors":
            signals.update(vis_index=SequenceIndex(), text_index=SequenceIndex("text"))
        options = (("vision_pivots", c.vision_pivots), ("text_pivots", c.text_pivots),
                   ("lowest_first", c.criterion == "attn_min"), ("seed", c.seed), ("criterion", c.criterion),
                   ("order", c.order), ("budget", c.budget))
        if c.criterion == "random":
            options += (("vis_score", None), ("text_score", None))
        keep = c.keep
        if c.budget == "authors" and isinstance(keep, int):
            keep = c.vision_pivots + (c.vision_pivots + c.text_pivots) * (keep // (c.vision_pivots + c.text_pivots))
        return Plan(layer=c.layer, signals=signals, select=Choose(keep, dart_keep_scored, options))


def dart_keep_scored(*, criterion, vis_score, text_score, **kw):
    # per-token pivot scores: L1 norms of keys/values, or the last token's single attention row
    if criterion in ("k_norm", "v_norm"):
        vis_score, text_score = vis_score.abs().sum(-1), text_score.abs().sum(-1)
    elif criterion in ("attn_max", "attn_min"):
        vis_score, text_score = vis_score[:, 0], text_score[:, 0]
    return dart_keep(vis_score=vis_score, text_score=text_score, **kw)
