"""Anyres crops merged in place inside the encoder (ToMe positions='keep' on LLaVA-NeXT / OneVision): the
merged-away slots dropped from the crops' encoder sequences, so that later encoder layers run shorter ones.

A bucket (image size) fixes the unpadding, so each crop's tokens are static, and so is a rule's merge count on
a crop (Choose.masked_per_crop: ToMe's r, or its share of keep, from the crop's surviving tokens). The crops of a
unit are one batch of sequences of one length: after a merge every crop drops the count all of them reach (each
its first merged-away rows, ascending), and what a crop merged beyond that stays a row masked as a key, as
without dropping. CLS and patches unpadded away stay (they take part in attention). CLIP / SigLIP add their
position embeddings before the first layer, so a row needs no position later, only its slot (`rows`); the last
feature layer's output goes back to the full crop slots before the packing gather, a dropped slot zero there
(merged away: padding in the LLM)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from graphprune import tokenops
from graphprune.anatomy.read import Anatomy, layer_of, sdpa_mask

SHAPE_OPS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten.expand.default)


@dataclass
class CropRows:
    """What the crops of an anyres vision stage run, from the first merge inside the encoder on."""
    full: int                                  # a crop's encoder sequence as captured (leading tokens + patches)
    alive: list[int] | None                    # each crop's valid tokens (None: not static, nothing drops)
    masked: list[int]                          # each crop's merged-away tokens still running as masked rows
    steps: list = field(default_factory=list)  # (first layer, rows (units x crops, S') node, S') per drop
    back: fx.Node | None = None                # the last feature layer's output at the full crop slots
    own_masks: bool = False                    # the encoder's attention has masks of its own (as captured)


def rows_at(anat: Anatomy, layer: int) -> tuple[fx.Node | None, int | None]:
    """The slots encoder layer `layer` runs on each crop (None: all) and their count."""
    steps = [s for s in (anat.crop_rows.steps if anat.crop_rows else []) if s[0] <= layer]
    return (steps[-1][1], steps[-1][2]) if steps else (None, None)


def full_rows(g: fx.Graph, anat: Anatomy, x: fx.Node, layer: int, dim: int = 1) -> fx.Node:
    """A value of encoder layer `layer` (its crops' rows along `dim`) at the full crop slots, for signals."""
    rows, _ = rows_at(anat, layer)
    return x if rows is None else g.call_function(tokenops.full_crop_rows, (x, rows, anat.crop_rows.full, dim))


def drop_count(gm: fx.GraphModule, anat: Anatomy, rule, layer: int, static: bool, masks: bool) -> tuple[int, str]:
    """(slots every crop drops before encoder layer `layer`, what happened, for the pass's info), static per
    bucket; the merge of `rule` there is counted. static: every crop's tokens are all valid before it (no earlier
    data-dependent mask); masks: the rule returned which tokens are valid."""
    if anat.crop_rows is None:
        full = int(anat.layer(0).attention.q.meta["val"].shape[2])
        patch = getattr(gm, anat.token_patches.target)[:, 0] // (full - int(bool(anat.has_cls)))
        alive = torch.bincount(patch, minlength=anat.crops).tolist() if static else None
        # read before the first merge masks any layer: what the captured layers' attention masks
        own = any(sdpa_mask(l.attention.node) is not None for l in anat.layers)
        anat.crop_rows = CropRows(full, alive, [0] * anat.crops, own_masks=own)
    rec = anat.crop_rows
    count = getattr(rule, "masked_per_crop", None) if masks else None
    if rec.alive is None or count is None:
        rec.alive = None
        return 0, "masked, not dropped: the rule gives no static merge count per crop"
    merged = [count(a) for a in rec.alive]
    rec.alive = [a - m for a, m in zip(rec.alive, merged)]
    rec.masked = [k + m for k, m in zip(rec.masked, merged)]
    drop = min(rec.masked)
    if not any(rec.masked):
        return 0, "nothing merged away on these crops"
    if not drop:
        return 0, f"masked, not dropped: crops merge different counts ({', '.join(map(str, merged))})"
    why = _cannot_shorten(gm, anat, layer)
    if why:
        return 0, f"masked, not dropped: {why}"
    rec.masked = [k - drop for k in rec.masked]
    note = f"{drop} slot{'s' * (drop != 1)} per crop dropped from the encoder after layer {layer - 1}"
    if any(rec.masked):
        note += f" ({max(rec.masked)} more masked at most: crops merge different counts)"
    return drop, note


def _cannot_shorten(gm: fx.GraphModule, anat: Anatomy, layer: int) -> str:
    """Why the encoder layers from `layer` on cannot run shorter crop sequences ('' where they can): the
    sequence length is baked into their shape ops, one place per op, and their attention has no mask of its own."""
    _, length = rows_at(anat, layer)
    length = length or anat.crop_rows.full
    if anat.crop_rows.own_masks:
        return "the encoder's attention has masks of its own"
    for n in _shape_ops(gm, anat, layer):
        if sum(d == length for d in n.args[1] if isinstance(d, int)) > 1:
            return f"the crops' sequence length {length} is also another size in {n.name}"
    return ""


def _shape_ops(gm, anat: Anatomy, layer: int) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target in SHAPE_OPS and layer_of(n) is not None
            and layer <= layer_of(n) < anat.num_layers]


def shorten(gm: fx.GraphModule, anat: Anatomy, layer: int, rows: fx.Node, length: int) -> None:
    """From encoder layer `layer` on the crops run the `length` slots rows: their shape ops take that length, and
    the last feature layer's output goes back to the full crop slots (the packing gather's rows)."""
    rec, g = anat.crop_rows, gm.graph
    before = rows_at(anat, layer)[1] or rec.full
    for n in _shape_ops(gm, anat, layer):
        n.args = (n.args[0], [length if d == before else d for d in n.args[1]], *n.args[2:])
    rec.steps.append((layer, rows, length))
    if rec.back is None:
        last = anat.layers[-1].output
        with g.inserting_after(last):
            rec.back = g.call_function(tokenops.full_crop_rows, (last, rows, rec.full))
        for u in list(last.users):
            if u is not rec.back:
                u.replace_input_with(last, rec.back)
    else:
        rec.back.args = (rec.back.args[0], rows, rec.full)
