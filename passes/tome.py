"""ToMe: "Token Merging: Your ViT But Faster" (Bolya et al., ICLR 2023), inside the vision encoder.

Method, at each merging layer l of the encoder, on the sequence [CLS, patches] in its current order:
  split      alternate: A = the tokens at even places (CLS first), B = those at odd places;
  match      each A token's most similar B token, by cosine of layer l's keys averaged over heads
             (`heads`); CLS never matches;
  merge      the r A tokens with the best matches join their B token: size-weighted averages
             x = sum(size x x) / sum(size), sizes added (a token's size = the patches it stands for);
  order      [CLS, unmerged A tokens in their order, every B token in its order].
r per layer, at most half the patches (ToMe's min(r, (t - 1) // 2)); or `keep`: the merges that leave
`keep` patches, spread over the layers (each takes ceil(rest / layers left)). Default: keep=64 over
layers 0..22 (the CLIP ViT-L/14 blocks whose output LLaVA-1.5 reads). The LLM sees the merged tokens
in that order, compactly numbered.

Proportional attention (the authors' default, proportional_attention=True): every later encoder
layer adds log(size) of each key to its attention logits (Choose(proportional=True); the bias of a
later merge replaces the earlier one). proportional_attention=False merges without it.
What the pass API cannot express: ToMe merges between a block's attention and its MLP; a plan acts
between blocks, so the MLP of block l still runs on the unmerged tokens (merge after the block, with
the same keys and pairs).

positions="keep" merges in place: the kept tokens stay at their own slots in raster order (a merged
token at its B token's slot), so each keeps its own position ids in the encoder (rotary tables) and in
the LLM. On one sequence it is for encoders without CLS (Qwen2-VL / Qwen2.5-VL), which take it only: the
split alternates from the first token (A = even places), a token is a 2x2 merge group (its 4 patches
merged with those of the group it joins, patch by patch; its key the mean of theirs), and two tokens may
merge only where they attend together in the layer whose keys match them (AttendTogether: the same window
in a windowed block).
On anyres images (LLaVA-NeXT with CLS, LLaVA-OneVision without) positions="keep" merges each crop (one ViT
sequence) in place: an image's tokens exist only after the gather that follows the encoder, so every slot
stays, merged-away patches masked as keys in the later layers of their crop and as padding in the LLM. A
crop's surviving tokens (valid, raster order; patches unpadded away are none) split as ToMe splits [CLS,
survivors] (CropOf), its r best matches merge, never across crops. keep and r count PER CROP there (the
pass's info['at'] says "per crop grid (its counts per crop)"). A crop's merge count is static per image size
(masked_per_crop), so after each merge the crops drop from their encoder sequences the merged-away slots every
crop reaches (rewrite/crop_rows.py: later layers run shorter sequences; the rest stays masked; info['encoder_rows']). Videos pooled after the encoder (OneVision,
NeXT-Video) are refused.
Departures and their effect: docs/methods.md.
"""
import math
from dataclasses import dataclass
from functools import partial

import torch

from graphprune.errors import InputError, PassConfigError, PassNotApplicable
from graphprune.rewrite.blocks import require_one_grid
from graphprune.rewrite.pass_api import AttendTogether, Choose, CropOf, Hidden, Keys, Plan, TokenPass, layer_tuple
from graphprune.rewrite.registry import register_pass

FEATURE_LAYERS = tuple(range(23))      # CLIP ViT-L/14 blocks 0..22 feed LLaVA-1.5's features (layer -2)


def merge_count(v: int, r: int | None, keep: int | None, layers_left: int) -> int:
    """Merges at this layer for v patches: r, or the even share of what `keep` still needs; at most v // 2."""
    want = r if r is not None else math.ceil(max(v - keep, 0) / layers_left)
    return min(want, v // 2)


def bipartite_merge(*, k, protected, valid, vision_pos, keys, hidden, sizes, r, keep, layers_left, heads,
                    together=None, cls=True, in_place=False, crops=None):
    """One ToMe step on each image's tokens (B, n, V, ...): picked (the new order; in_place: ascending),
    values, sizes. cls: the sequence starts with a CLS token (A then holds the odd patches); together
    (B, n, V, V): which tokens may merge (attend together; None: any two). crops (B, n, V, 2) (CropOf: an
    anyres image's crops): one step per crop, in place, every slot kept (merge_in_crops)."""
    metric = keys.float()
    if heads is not None:
        metric = metric.reshape(*metric.shape[:-1], heads, -1).mean(-2)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    if crops is not None:
        return merge_in_crops(metric, hidden, sizes, valid, crops, r, keep, layers_left)
    if valid is not None:
        raise InputError("tome: an earlier vision pass left masked slots; ToMe needs every patch (run it as the "
                         "only vision pass)")
    b, n, v, d = hidden.shape
    count = merge_count(v, r, keep, layers_left)
    slots = torch.arange(v, device=hidden.device).expand(b, n, v)
    if count == 0:
        return {"picked": slots}
    # [CLS, patches]: patch i sits at place i + 1, so A (even places) holds the odd patches; without CLS the even
    a_idx = torch.arange(int(cls), v, 2, device=hidden.device)
    b_idx = torch.arange(1 - int(cls), v, 2, device=hidden.device)
    scores = metric[:, :, a_idx] @ metric[:, :, b_idx].transpose(-1, -2)          # (B, n, |A|, |B|)
    if together is not None:
        scores = scores.masked_fill(~together[:, :, a_idx][:, :, :, b_idx], float("-inf"))
    best, match = scores.max(-1)
    if together is not None and bool((torch.isinf(best).sum(-1) > a_idx.numel() - count).any()):
        raise InputError(f"tome: {count} merges at this layer, but fewer tokens of A have a token of B in their "
                         "attention window; merge less (a smaller r or a larger keep)")
    ranked = best.argsort(dim=-1, descending=True, stable=True)
    src, unmerged = ranked[..., :count], ranked[..., count:].sort(-1).values      # places in A
    size = torch.ones(b, n, v, 1, dtype=hidden.dtype, device=hidden.device) if sizes is None else sizes[..., None]
    weighted = hidden * size
    dst = match.gather(-1, src)                                                   # places in B
    b_x = weighted[:, :, b_idx].scatter_add(2, dst[..., None].expand(b, n, count, d),
                                            weighted[:, :, a_idx].gather(2, src[..., None].expand(b, n, count, d)))
    b_size = size[:, :, b_idx].scatter_add(2, dst[..., None], size[:, :, a_idx].gather(2, src[..., None]))
    a_keep = a_idx[unmerged]
    a_x = weighted.gather(2, a_keep[..., None].expand(b, n, a_keep.shape[-1], d))
    a_size = size.gather(2, a_keep[..., None])
    new_size = torch.cat([a_size, b_size], 2)
    picked, values = torch.cat([a_keep, b_idx.expand(b, n, -1)], -1), torch.cat([a_x, b_x], 2) / new_size
    if in_place:
        order = picked.argsort(-1)
        picked, values = picked.gather(-1, order), values.gather(2, order[..., None].expand(-1, -1, -1, d))
        new_size = new_size.gather(2, order[..., None])
    return {"picked": picked, "values": values, "sizes": new_size[..., 0]}


def merge_in_crops(metric, hidden, sizes, valid, crops, r, keep, layers_left):
    """ToMe on each crop of an anyres image (metric (B, n, V, d) unit-norm keys; crops (B, n, V, 2): each token's
    crop and its sequence's leading tokens), in place: every slot kept, merged-away ones marked invalid.
    A crop's survivors (valid tokens, in its raster order) split as ToMe splits the sequence [leading tokens,
    survivors]: A the even places, B the odd; its r (or keep's share of) best A -> B matches merge,
    size-weighted, into their B token's slot; nothing matches across crops. An A token merged away keeps its
    own state (masked from now on); a token nothing merged into keeps its own exactly."""
    b, n, v, d = hidden.shape
    crop, leading = crops[..., 0], crops[..., 1]
    live = torch.ones_like(crop, dtype=torch.bool) if valid is None else valid
    slot = torch.arange(v, device=hidden.device)
    # places within a crop from stable sorts (O(V log V)); only the match scores are (B, n, V, V)
    rank = _place_in_crop(crop, _sorted(crop, ~live))                           # place among the crop's survivors
    in_a = live & ((leading + rank) % 2 == 0)
    in_b = live & ((leading + rank) % 2 == 1)
    alive = torch.zeros_like(crop).scatter_add(-1, crop, live.long()).gather(-1, crop)   # the crop's survivors
    want = torch.full_like(alive, r) if r is not None else (alive - keep).clamp(min=0).add(layers_left - 1) \
        .div(layers_left, rounding_mode="floor")                                 # ceil(max(alive - keep, 0) / left)
    count = torch.minimum(want, alive // 2)                                      # the token's crop's merges
    pairs = (crop[..., :, None] == crop[..., None, :]) & in_a[..., :, None] & in_b[..., None, :]
    best, match = (metric @ metric.transpose(-1, -2)).masked_fill(~pairs, float("-inf")).max(-1)
    # an A token's place among its crop's A tokens by best match (ties: the earlier token first)
    a_rank = _place_in_crop(crop, _sorted(crop, ~in_a, best.argsort(dim=-1, descending=True, stable=True)))
    merged = in_a & (a_rank < count)
    size = torch.ones(b, n, v, dtype=hidden.dtype, device=hidden.device) if sizes is None else sizes
    into = torch.where(merged, match, slot)   # a token not merged adds 0 to itself
    got_x = torch.zeros_like(hidden).scatter_add(2, into[..., None].expand(b, n, v, d),
                                                 hidden * (size * merged)[..., None])
    got_size = torch.zeros_like(size).scatter_add(2, into, size * merged)
    joined = got_size > 0
    new_size = torch.where(joined, size + got_size, size)
    values = torch.where(joined[..., None], (hidden * size[..., None] + got_x) / new_size[..., None], hidden)
    return {"picked": slot.expand(b, n, v), "values": values, "sizes": new_size,
            "valid": live & ~merged}


def _sorted(crop, later, order=None):
    """The tokens (B, n, V) sorted by crop, then those where `later` is False first, then in `order` (None: slot
    order), each sort stable."""
    order = torch.arange(crop.shape[-1], device=crop.device).expand_as(crop) if order is None else order
    order = order.gather(-1, later.gather(-1, order).to(torch.uint8).argsort(dim=-1, stable=True))
    return order.gather(-1, crop.gather(-1, order).argsort(dim=-1, stable=True))


def _place_in_crop(crop, order):
    """Each token's place among its crop's tokens in `order` (a permutation of the tokens, (B, n, V), each crop's
    tokens together)."""
    c = crop.gather(-1, order)
    pos = torch.arange(c.shape[-1], device=c.device).expand_as(c)
    start = torch.ones_like(c, dtype=torch.bool)
    start[..., 1:] = c[..., 1:] != c[..., :-1]
    first = torch.where(start, pos, 0).cummax(-1).values
    return torch.empty_like(order).scatter(-1, order, pos - first)


@register_pass
class ToMe(TokenPass):
    name = "tome"
    stage = "vision"

    @dataclass
    class Config:
        keep: int | None = None          # patches left after the last merge (default 64 when r is not given);
        #                                  per image, or per crop on anyres images
        r: int | None = None             # merges per layer (the authors' parameter), instead of keep (anyres: per crop)
        layers: tuple = FEATURE_LAYERS   # encoder layers after which tokens merge
        heads: int | None = None         # attention heads the keys are averaged over (the authors' metric);
        #                                  None: cosine of the keys with heads concatenated
        proportional_attention: bool = True   # the authors' prop_attn: later layers add log(size) to key logits
        positions: str = "compact"       # compact: ToMe's order, renumbered; keep: merged in place (no CLS, anyres:
        #                                  only)

    whole_groups = True                  # on Qwen a token is a 2x2 merge group, merged whole

    def validate(self):
        c = self.config
        if c.r is not None and c.keep is not None:
            raise PassConfigError(f"tome: give r (merges per layer) or keep (patches left), not both "
                                  f"(r={c.r!r}, keep={c.keep!r})")
        if c.r is None and c.keep is None:
            c.keep = 64
        super().validate()
        if isinstance(c.keep, float):
            raise PassConfigError(f"tome: keep must be an int (patches per image), got {c.keep!r}")
        if c.r is not None and c.r < 1:
            raise PassConfigError(f"tome: r={c.r} must be >= 1 (merges per layer)")
        c.layers = layer_tuple(self.name, c.layers, what="encoder layer indices")
        if c.heads is not None and c.heads < 1:
            raise PassConfigError(f"tome: heads must be a positive int or None, got {c.heads!r}")
        if c.positions not in ("compact", "keep"):
            raise PassConfigError(f"tome: positions must be 'compact' or 'keep', got {c.positions!r}")

    def requires(self, anatomy):
        c = self.config
        if anatomy.pooled_tokens:
            raise _pooled_after_the_encoder(c, anatomy)
        if anatomy.token_patches is not None:
            _require_crops(c, anatomy)
        else:
            require_one_grid(self.name, anatomy)
        if not anatomy.has_cls and c.positions != "keep":
            raise PassNotApplicable(f"tome: {anatomy.model_class} has no CLS token of the vision encoder, whose "
                                    "tokens ToMe then merges in place: give positions='keep'")
        # in place on one sequence the split would start at CLS's place (anyres crops split their survivors as
        # [CLS, survivors]); a model-level check (no encoder read yet) cannot tell the two apart
        if anatomy.has_cls and c.positions == "keep" and anatomy.num_layers and anatomy.token_patches is None:
            raise PassNotApplicable(f"tome: positions='keep' merges in place on encoders without CLS and on anyres "
                                    f"images; {anatomy.model_class}'s encoder has one and runs each image as one "
                                    "sequence: use positions='compact' (ToMe's order)")
        n = anatomy.num_layers
        if n and anatomy.patches_per_token > 1 and c.layers[-1] >= n - 1:
            raise PassConfigError(f"tome: layers={c.layers!r}: {anatomy.model_class}'s last encoder layer ({n - 1}) "
                                  "feeds the merger's norm, where patches are no longer merged as states; use layers "
                                  f"in 0..{n - 2}, e.g. layers={tuple(range(n - 1))}")
        if n and c.layers[-1] >= n:
            raise PassConfigError(f"tome: layers={c.layers!r} do not fit the {n} encoder layers feeding the features; "
                                  f"use layers in 0..{n - 1}, e.g. layers={tuple(range(n))}")
        if anatomy.token_patches is None and anatomy.grid is not None and c.keep is not None \
                and c.keep > anatomy.grid[0] * anatomy.grid[1]:
            raise PassConfigError(f"tome: keep={c.keep} exceeds the {anatomy.grid[0] * anatomy.grid[1]} patches")
        if c.heads is not None and anatomy.layers:
            q = anatomy.layers[-1].attention.q.meta.get("val")
            if q is not None and q.shape[1] != c.heads:
                raise PassConfigError(f"tome: heads={c.heads}, but the vision encoder's attention has {q.shape[1]} "
                                      f"heads; set heads={q.shape[1]} or None")

    def plan(self) -> list[Plan]:
        c = self.config
        in_place = c.positions == "keep"
        return [Plan(layer=l + 1, positions=c.positions,
                     signals={"keys": Keys(l), "hidden": Hidden(l), "together": AttendTogether(l), "crops": CropOf()},
                     select=Choose(None, bipartite_merge, (("r", c.r), ("keep", c.keep),
                                                          ("layers_left", len(c.layers) - i), ("heads", c.heads),
                                                          ("cls", not in_place), ("in_place", in_place)),
                                   merges=True, ordered=not in_place, sized=True,
                                   proportional=c.proportional_attention, masks_on_crops=in_place,
                                   masked_per_crop=partial(merge_count, r=c.r, keep=c.keep,
                                                           layers_left=len(c.layers) - i)))
                for i, l in enumerate(c.layers)]


def _require_crops(c, anatomy):
    """tome where a vision unit is several encoder sequences (anyres images, video frames): in place on an anyres
    image's crops (positions='keep'); refused on Qwen's whole videos, whose tokens are gathered after the encoder
    (pooled tokens are refused before: _pooled_after_the_encoder)."""
    crops = (f"where a vision unit of {anatomy.model_class} is {anatomy.crops} crop{'s' * (anatomy.crops != 1)}, each "
             "run as its own encoder sequence")
    if anatomy.patches_per_token > 1:       # Qwen's whole videos: merged 2 x 2 groups, gathered frame after frame
        raise PassNotApplicable(
            f"tome: merges between vision encoder layers (layers={c.layers!r}), {crops} (a whole video's frames: on "
            "video use video_unit='frame'), and the unit's tokens exist only after the gather that follows the "
            "encoder: ToMe's merges remove tokens there, which graphprune cannot place")
    if c.positions != "keep":
        raise PassNotApplicable(
            f"tome: merges between vision encoder layers (layers={c.layers!r}), {crops}, and an image's tokens exist "
            "only after the packing gather that follows the encoder, so ToMe's compact order cannot place them: "
            "give positions='keep' (each crop merged in place, merged-away patches masked as keys in the later "
            "layers of their crop and as padding in the LLM; keep / r count per crop)")
    patches = int(anatomy.layers[0].attention.q.meta["val"].shape[2]) - int(bool(anatomy.has_cls))
    if c.keep is not None and c.keep > patches:
        raise PassConfigError(f"tome: keep={c.keep} exceeds the {patches} patches of a crop ({anatomy.model_class}'s "
                              "anyres images merge crop by crop: keep counts per crop)")


def _pooled_after_the_encoder(c, anatomy) -> PassNotApplicable:
    """Tokens pooled from patch blocks after the encoder (Gemma 3's projector, video frames): no ToMe inside it."""
    alternatives = ("vision_topk, random(stage='vision'), visionzip or vispruner (at the features)"
                    if anatomy.pooled_hidden else "vision_topk, random(stage='vision') or an LLM-stage pass")
    return PassNotApplicable(
        f"tome: merges between vision encoder layers (layers={c.layers!r}), but {anatomy.model_class}'s tokens here "
        f"are each pooled from {anatomy.patches_per_token} encoder patches after the encoder (the mean of a patch "
        "block), so a patch ToMe merged away inside the encoder would have no value of its own for the pool; prune "
        f"these tokens with {alternatives} (anyres images take tome(positions='keep'))")
