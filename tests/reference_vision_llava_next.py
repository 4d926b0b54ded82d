"""Independent reference for vision-stage pruning on LLaVA-NeXT / LLaVA-OneVision anyres images. Nothing
here imports graphprune.

* Per image: its crops (pixel_values less the processor's padding crops: image_size_to_num_patches, the
  model's own count) run through the model's own vision tower; a forward hook on the feature layer
  (hidden_states[vision_feature_layer] is that layer's output) reads its input and output. Its attention
  by hand: layer_norm1, q / k / v from the projection weights, softmax(q k^T / sqrt(d)) per crop, heads
  averaged: the CLS row (CLS attention) and the column means over every query (attention received).
* Per crop patch (CLS dropped): score, key (heads concatenated), hidden (the layer's output) are laid in
  prompt order by the model's own pack_image_features with an image_newline of NaN, whose rows are then
  dropped: the image's feature tokens without the newline slots.
* Video (LLaVA-OneVision): each frame is one crop; its per-patch scores are pooled by the model's own
  apply_pooling (bilinear to half the side: for an even side each 2 x 2 block's mean), a unit being a frame's
  pooled tokens or the whole video's (video_unit), its closing newline slot left out.
* Selection per unit (image, frame or video): top-k scores (ties: lower index), or the top-k of torch.rand((images, 1, tokens),
  generator=manual_seed(seed)); VisionZip: dominant top keep - contextual, the rest (ascending) grouped
  around `contextual` targets taken every (rest // contextual)-th, each member joining the target whose
  key is most cosine-similar; a contextual token is its target's hidden plus its members' mean, through
  the model's projector.
* The pruned prompt: the full merged embeddings (reference_families.family_inputs: the model's own
  get_image_features at the placeholders, newline slots included) at the kept tokens (merged tokens:
  their projected values), positions kept or renumbered (compact), run by reference.lm_generate.
"""
from __future__ import annotations

import math
import sys

import reference as R
import torch
from reference_families import family_inputs
from reference_vision_qwen import keep_of_units, zip_unit
from torch import Tensor


def crops_of(model, image_size) -> int:
    cfg = model.config
    module = sys.modules[type(model.model).__module__]
    return module.image_size_to_num_patches(image_size=image_size, grid_pinpoints=cfg.image_grid_pinpoints,
                                            patch_size=cfg.vision_config.image_size)


@torch.no_grad()
def crop_signals(model, crops: Tensor) -> dict:
    """Per crop patch of the feature layer (crops, P): 'cls', 'received' scores, 'keys' (.., H*d), 'hidden'."""
    cfg = model.config
    tower = model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers     # transformers 4.x: under vision_model
    index = cfg.vision_feature_layer % (len(layers) + 1) - 1          # hidden_states[i] is layer i - 1's output
    layer, seen = layers[index], {}
    handles = [layer.register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0] if a else kw["hidden_states"]),
                                               with_kwargs=True),
               layer.register_forward_hook(lambda m, a, out: seen.update(out=out[0] if isinstance(out, tuple) else out))]
    try:
        tower(crops, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    attn = layer.self_attn
    x = layer.layer_norm1(seen["x"])
    c, s, _ = x.shape
    heads = attn.num_heads
    q = attn.q_proj(x).reshape(c, s, heads, -1).transpose(1, 2)
    k = attn.k_proj(x).reshape(c, s, heads, -1).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1).mean(1)       # (crops, S, S)
    cls = int(cfg.vision_feature_select_strategy == "default")
    return {"cls": probs[:, 0, cls:], "received": probs.mean(1)[:, cls:],
            "keys": k.transpose(1, 2).reshape(c, s, -1)[:, cls:], "hidden": seen["out"][:, cls:]}


def packed(model, per_patch: Tensor, image_size: Tensor) -> Tensor:
    """(crops, P, C) per crop patch -> (tokens, C) in the image's prompt order, newline rows left out."""
    cfg = model.config
    extra = {"vision_aspect_ratio": cfg.vision_aspect_ratio} if cfg.model_type == "llava_onevision" else \
        {"vision_feature_select_strategy": cfg.vision_feature_select_strategy}
    nan = torch.full((per_patch.shape[-1],), float("nan"))
    rows, _ = model.model.pack_image_features([per_patch.float()], image_size[None], image_newline=nan, **extra)
    rows = rows[0] if isinstance(rows, (list, tuple)) else rows       # a list per image, or their concatenation
    return rows[~rows.isnan().any(-1)]


def image_tokens(model, example) -> list[dict]:
    """Per image (samples in order): its tokens' 'cls', 'received', 'keys', 'hidden' in prompt order."""
    out = []
    for pixels, size in zip(example.pixel_values, example.image_sizes):
        sig = crop_signals(model, pixels[:crops_of(model, size)])
        out.append({name: packed(model, t[..., None], size)[:, 0] if t.dim() == 2 else packed(model, t, size)
                    for name, t in sig.items()})
    return out


def video_scores(model, example, video_unit: str) -> list[Tensor]:
    """Per unit (samples, videos, frames in order): the attention each of its tokens receives, each frame's
    per-patch scores pooled by the model's own apply_pooling (a 2 x 2 mean for an even side)."""
    out = []
    for video in example.pixel_values_videos:
        pooled = model.model.apply_pooling(crop_signals(model, video)["received"][..., None])[..., 0]
        out += list(pooled) if video_unit == "frame" else [pooled.reshape(-1)]
    return out


def units(model, example, video_unit: str = "frame") -> list[list[Tensor]]:
    """Per sample, each unit's prompt positions: an image's feature tokens (newline slots left out), a video's
    frame's or the whole video's (its closing newline left out)."""
    _, _, _, vm = family_inputs(model, example)
    videos = example.pixel_values_videos
    if videos is None:
        return [list(row.nonzero()[:, 0].chunk(example.image_sizes.shape[0] // vm.shape[0])) for row in vm]
    per, frames = videos.shape[0] // vm.shape[0], videos.shape[1]
    return [[u for video in row.nonzero()[:, 0].chunk(per) for u in (video.chunk(frames) if video_unit == "frame"
                                                                       else [video])] for row in vm]


def picks(model, example, keep: int, how: str, seed: int = 0, video_unit: str = "frame") -> list[list[Tensor]]:
    """Per sample, per unit: the kept token indices (ascending)."""
    blocks = units(model, example, video_unit)
    n, v = len(blocks[0]), blocks[0][0].numel()
    if how == "random":
        u = torch.rand((len(blocks) * n, 1, v), generator=torch.Generator().manual_seed(seed))
        chosen = [u[i, 0].topk(keep).indices for i in range(len(blocks) * n)]
    elif example.pixel_values_videos is not None:
        chosen = [score.topk(keep).indices for score in video_scores(model, example, video_unit)]
    else:
        chosen = [tok[how].topk(keep).indices for tok in image_tokens(model, example)]
    return [[chosen[i * n + j].sort().values for j in range(n)] for i in range(len(blocks))]


def keep_index(model, example, chosen: list[list[Tensor]], video_unit: str = "frame") -> Tensor:
    return keep_of_units(units(model, example, video_unit), example.input_ids.shape[1], chosen)


@torch.no_grad()
def visionzip(model, example, keep: int, contextual: int, dominant: str = "cls") -> tuple[list, list]:
    """Per sample, per image: kept token indices (ascending) and the projected values their slots take."""
    tokens = iter(image_tokens(model, example))
    chosen, values = [], []
    for row in units(model, example):
        c_row, v_row = [], []
        for _ in row:
            tok = next(tokens)
            dom, targets, hidden = zip_unit(tok[dominant], tok["keys"], tok["hidden"], keep, contextual)
            # the kept slots in raster order take the authors' sequence: dominant (raster order), then contextual
            c_row.append(torch.cat([dom, targets]).sort().values)
            v_row.append(model.model.multi_modal_projector(hidden[torch.cat([dom.sort().values, targets])]))
        chosen.append(c_row)
        values.append(v_row)
    return chosen, values


@torch.no_grad()
def generate(model, example, chosen, steps: int, positions: str = "keep", values=None, video_unit: str = "frame") -> dict:
    """reference.lm_generate on the pruned prompt: the kept tokens' embeddings (merged ones: `values`, in
    the order `dominant, contextual` when compact, as VisionZip's authors lay them out)."""
    emb, am, pos, vm = family_inputs(model, example)
    keep = keep_index(model, example, chosen, video_unit)
    emb = emb.clone()
    if values is not None:
        for i, row in enumerate(units(model, example, video_unit)):
            for blk, c, v in zip(row, chosen[i], values[i]):
                emb[i, blk[c]] = v.to(emb.dtype)
    emb, am = emb.gather(1, keep[..., None].expand(-1, -1, emb.shape[-1])), am.gather(1, keep)
    pos = pos.gather(1, keep) if positions == "keep" else (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
    ref = R.lm_generate(model, emb, am, pos, max_new_tokens=steps)
    ref["keep"] = keep
    return ref


@torch.no_grad()
def visiontrim(model, example, keep: int, dominant: int | None = None, window: int = 3) -> tuple[list, list]:
    """VisionTrim's vision stage per anyres image (reference_visiontrim's DVTS + TGVC): S_g the softmax over the
    image's tokens of each token's own crop's CLS attention; S_l LTAM with each crop its own patch grid, the
    neighbours of a token the tokens of its crop's window (patches unpadded away are no tokens, so no
    neighbours), sigma_f / sigma_p over all the image's neighbour pairs: the crops are laid one under the other
    on one grid, `window // 2` empty rows apart, so no window spans two. Top K of the image, then TGVC over the
    image's other tokens with the instruction's input embeddings. Per sample, per image: kept token indices
    (ascending) and the values their slots take (a centre: its merge)."""
    import reference_visiontrim as VT
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    k, r = VT.split_budget(keep, dominant)
    emb = family_inputs(model, example)[0].float()
    ids = example.input_ids
    text = R.text_after_image(ids == cfg.image_token_id, example.attention_mask)
    embed = model.get_input_embeddings().weight.float()
    sizes = iter(zip(example.pixel_values, example.image_sizes))
    chosen, values = [], []
    for s, row in enumerate(units(model, example)):
        c_row, v_row = [], []
        for blk in row:
            pixels, size = next(sizes)
            crops = crops_of(model, size)
            cls = packed(model, crop_signals(model, pixels[:crops])["cls"][..., None], size)[:, 0]
            patch = torch.arange(side * side)
            slot = torch.stack([(c * (side + window // 2) + patch // side) * side + patch % side for c in range(crops)])
            slots = packed(model, slot[..., None].float(), size)[:, 0].long()
            feats = emb[s, blk]
            score = VT.dvts_scores(cls[None], feats[None], side, window, patch_index=slots[None])[0]
            dom = score.topk(k).indices
            rest = torch.ones(blk.numel(), dtype=torch.bool)
            rest[dom] = False
            rest = rest.nonzero()[:, 0]
            centres, merged = VT.tgvc(feats[rest], embed[ids[s][text[s]]], None, r)
            picked = torch.cat([dom, rest[centres]])
            order = picked.argsort()
            c_row.append(picked[order])
            v_row.append(torch.cat([feats[dom], merged])[order])
        chosen.append(c_row)
        values.append(v_row)
    return chosen, values
