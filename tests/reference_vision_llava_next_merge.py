"""Independent reference for MustDrop's window merge on LLaVA-NeXT / LLaVA-OneVision anyres images, and for the
whole MustDrop pipeline (key set -> merge -> dual-attention filters -> output-aware cache) on LLaVA-NeXT.
Nothing here imports graphprune.

* Per image: its crops through the model's own tower (reference_vision_llava_next.crop_signals: the feature
  layer's output per crop patch, CLS dropped, and its CLS attention by hand), laid in prompt order by the
  model's own pack_image_features (reference_vision_llava_next.packed), newline rows left out. The same
  packing of each patch's code (crop x P + patch) tells each token's crop, row and column.
* Tiles: each crop's side x side grid cut into window x window tiles (the last row / column smaller); a
  tile's members are the tokens on it (a patch unpadded away is no token), in raster order; tiles crop
  after crop, raster order within a crop. Windows never cross crops.
* Merge (reference_mustdrop.tile_scores: mean cosine over ordered pairs, a one-token tile never merges):
  every tile scoring >= tau becomes the mean of its members' states at its representative (first member,
  order="raster"; last, "authors"). Static mode keeps every token's slot, merged-away ones invalid. Emitted
  order: raster, or the authors' (merged tokens by descending score, then the unmerged in prompt order, then
  the merged-away fillers). The image's kept slots (ascending) take the emitted tokens in that order, through
  the model's own projector.
* Key set (before the merge): the top ceil(ratio x T) tokens by the feature layer's CLS attention
  (reference_mustdrop.key_set); a merged tile's token is a key when any member was one, a merged-away token
  none.
* The pruned prompt: the model's own merged embeddings (reference_families.family_inputs) at the kept slots,
  invalid slots masked like padding, positions renumbered over the valid tokens (compact), run by
  reference.lm_generate, with reference_mustdrop.filter_select at the filter layers and the cache cut.
"""
from __future__ import annotations

import math

import reference as R
import reference_mustdrop as M
import reference_vision_llava_next as RN
import torch
from reference_families import family_inputs, instruction_mask
from reference_vision_qwen import keep_of_units
from torch import Tensor


def token_cells(model, size: Tensor) -> Tensor:
    """(tokens, 3): the crop, row and column of each feature token of an image of `size`, in prompt order."""
    vc = model.config.vision_config
    side = vc.image_size // vc.patch_size
    code = torch.arange(RN.crops_of(model, size) * side * side, dtype=torch.float32)
    patch = RN.packed(model, code.reshape(-1, side * side, 1), size)[:, 0].round().long()
    crop, cell = patch // (side * side), patch % (side * side)
    return torch.stack([crop, cell // side, cell % side], -1)


def crop_tiles(cells: Tensor, window: int) -> list[Tensor]:
    """Token indices of each non-empty window x window tile of each crop grid (members in raster order; tiles
    crop after crop, raster order within one)."""
    big = int(cells.max()) + 1
    tile = (cells[:, 0] * big + cells[:, 1] // window) * big + cells[:, 2] // window
    tiles = []
    for t in tile.unique().tolist():                  # ascending: crop, then tile row, then tile column
        idx = (tile == t).nonzero()[:, 0]
        tiles.append(idx[(cells[idx, 1] * big + cells[idx, 2]).argsort()])
    return tiles


def image_states(model, example) -> list[dict]:
    """Per image (samples in order): its tokens' feature-layer states 'hidden' (T, D), CLS attention 'cls'
    (T,), and cells (T, 3)."""
    out = []
    for pixels, size in zip(example.pixel_values, example.image_sizes):
        sig = RN.crop_signals(model, pixels[:RN.crops_of(model, size)])
        out.append({"hidden": RN.packed(model, sig["hidden"], size), "cls": RN.packed(model, sig["cls"][..., None], size)[:, 0],
                    "cells": token_cells(model, size)})
    return out


def all_tile_scores(model, example, window: int) -> Tensor:
    """Every multi-token tile's score over the example's images (to place tau between two of them)."""
    scores = [M.tile_scores(s["hidden"], crop_tiles(s["cells"], window)) for s in image_states(model, example)]
    scores = torch.cat(scores)
    return scores[~scores.isnan()]


def merge_image(hidden: Tensor, tiles: list[Tensor], tau: float, order: str, mode: str,
                protected: Tensor | None = None) -> dict:
    """One image's merge: 'slots' (ascending kept token indices), 'states' (their states in slot order),
    'valid' and 'protected' in slot order."""
    t = hidden.shape[0]
    score = M.tile_scores(hidden, tiles)
    ranked = sorted((j for j in range(len(tiles)) if not score[j].isnan()), key=lambda j: -float(score[j]))
    merged = [j for j in ranked if score[j] >= tau]
    states, survive = hidden.clone(), torch.ones(t, dtype=torch.bool)
    prot = torch.zeros(t, dtype=torch.bool) if protected is None else protected.clone()
    reps = []
    for j in merged:
        m = tiles[j]
        rep = int(m[0] if order == "raster" else m[-1])
        states[rep] = hidden[m].mean(0)
        prot[rep] = bool(prot[m].any())
        gone = m[m != rep]
        survive[gone], prot[gone] = False, False
        reps.append(rep)
    rest = [i for i in range(t) if survive[i] and (order == "raster" or i not in reps)]
    emitted = (reps if order == "authors" else []) + rest
    if mode == "static":
        emitted += [i for i in range(t) if not survive[i]]
    emitted = torch.tensor(sorted(emitted) if order == "raster" else emitted)
    return {"slots": emitted.sort().values, "emitted": emitted, "states": states[emitted],
            "valid": survive[emitted], "protected": prot[emitted]}


@torch.no_grad()
def mustdrop_run(model, example, *, window: int, tau: float, order: str = "raster", mode: str = "static",
                 keys: float | None = None, filters: dict | None = None, steps: int = 16,
                 encoder_layer: int | None = None, positions: str = "compact", encoder_image=None) -> dict:
    """The pruned run: window merge per crop grid at the features (key set first when `keys` is a ratio), or
    with `encoder_layer` L inside the encoder in place (encoder_merge_image; the key set after it, off the
    merged tokens' CLS attention, as in the paper; every token keeps its position), then the LLM with `filters`
    {layer: (gamma, alpha, capacity)} (graphprune's filter layers: a filter at L reads layer L's attention,
    L + 1 runs reduced; the caches of the first..last filter layers cut to the final set), numbering tokens
    after a filter by `positions`. Returns lm_generate's output plus 'vision_keep': per kept prompt slot, the
    prompt index of the token whose value it holds (the authors' order moves an image's tokens among its kept
    slots). encoder_image(crops, size) -> {'projected', 'valid'}: another in-place encoder merge (with
    encoder_layer given) instead of the window merge (tests/reference_vision_llava_next_tome.py)."""
    emb, am, pos, vm = family_inputs(model, example)
    emb, am = emb.clone(), am.clone()
    prot = torch.zeros_like(vm)
    source = torch.arange(example.input_ids.shape[1]).repeat(vm.shape[0], 1)    # the token each slot holds
    blocks = RN.units(model, example)
    states = iter(image_states(model, example)) if encoder_layer is None else None
    images = iter(zip(example.pixel_values, example.image_sizes))
    chosen = []
    for s, row in enumerate(blocks):
        picks = []
        for blk in row:
            if encoder_layer is None:
                image = next(states)
                key = None if keys is None else M.key_set(image["cls"][None], keys)[0]
                out = merge_image(image["hidden"], crop_tiles(image["cells"], window), tau, order, mode, key)
                projected = model.model.multi_modal_projector(out["states"])
            else:
                pixels, size = next(images)
                crops = pixels[:RN.crops_of(model, size)]
                out = encoder_merge_image(model, crops, size, encoder_layer, window, tau) if encoder_image is None \
                    else encoder_image(crops, size)
                out["slots"] = out["emitted"] = torch.arange(out["valid"].shape[0])
                out["protected"] = torch.zeros_like(out["valid"]) if keys is None else \
                    M.key_set(out["cls"][None], keys, out["valid"][None])[0]
                projected = out["projected"]
            at = blk[out["slots"]]
            emb[s, at] = projected.to(emb.dtype)
            am[s, at] = am[s, at] * out["valid"].to(am.dtype)
            prot[s, at] = out["protected"]
            source[s, at] = blk[out["emitted"]]
            picks.append(out["slots"])
        chosen.append(picks)
    keep = keep_of_units(blocks, example.input_ids.shape[1], chosen)
    text = instruction_mask(model, example)        # after the closing image_newline slot
    emb, am, pos, vm, prot, text = (x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]) if x.dim() == 3 else keep)
                                    for x in (emb, am, pos, vm, prot, text))
    if encoder_layer is None:                      # the authors' compact numbering after the merge
        pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
    selects, cut = {}, None
    if filters:
        per = len(blocks[0])
        selects = {layer + 1: M.filter_select(gamma, alpha, mode, capacity, images=per)
                   for layer, (gamma, alpha, capacity) in filters.items()}
        cut = (min(filters), max(filters) + 1) if len(filters) > 1 else None
    ref = R.lm_generate(model, emb, am, pos, selects=selects, protected=prot if keys is not None else None,
                        cut_to_final=cut, max_new_tokens=steps, vision_mask=vm, positions=positions,
                        text_mask=text)
    ref["vision_keep"] = source.gather(1, keep)
    return ref


# -- mustdrop_merge(layer=L, positions='keep') inside the encoder, crop by crop ---------------------------------
# Each crop's sequence runs the model's own encoder layers 0..L-1 (from the tower's layer-0 input, read by a
# hook); the image's tokens (the crops' patches laid out by pack_image_features, newline rows out) are tiled and
# merged as at the features (merge_image, raster order, static: every slot stays); each token's state goes back
# to its own crop patch row, merged-away tokens' patches are masked as keys (additive -inf, CLS and patches
# unpadded away stay visible) in layers L..feature layer, run as the model's own layers with that mask. The
# feature layer's rows (CLS dropped where the strategy drops it) are laid out again, projected by the model's
# projector; merged-away slots get attention mask 0, every token keeps its position.

def _encoder(model):
    tower = model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    return layers, model.config.vision_feature_layer % (len(layers) + 1) - 1


def token_patches(model, size: Tensor) -> Tensor:
    """(tokens,) the crop patch (crop x P + patch) of each feature token of an image of `size`, prompt order."""
    cells, side = token_cells(model, size), _side(model)
    return cells[:, 0] * side * side + cells[:, 1] * side + cells[:, 2]


def _side(model) -> int:
    vc = model.config.vision_config
    return vc.image_size // vc.patch_size


def _cls(model) -> int:
    return int(model.config.vision_feature_select_strategy == "default")


@torch.no_grad()
def states_before(model, crops: Tensor, layer: int) -> Tensor:
    """(crops, S, D): each crop's encoder states entering layer `layer` (the model's own layers from the
    tower's layer-0 input)."""
    layers, _ = _encoder(model)
    seen = {}
    handle = layers[0].register_forward_pre_hook(
        lambda m, a, kw: seen.update(x=a[0] if a else kw["hidden_states"]), with_kwargs=True)
    try:
        model.model.vision_tower(crops, output_hidden_states=True)
    finally:
        handle.remove()
    x = seen["x"]
    for blk in layers[:layer]:
        out = blk(x, None)
        x = out[0] if isinstance(out, tuple) else out
    return x


def encoder_tile_scores(model, example, layer: int, window: int) -> Tensor:
    """Every multi-token tile's score on the states entering encoder layer `layer` (to place tau)."""
    scores = []
    for pixels, size in zip(example.pixel_values, example.image_sizes):
        x = states_before(model, pixels[:RN.crops_of(model, size)], layer)
        hidden = RN.packed(model, x[:, _cls(model):], size)
        scores.append(M.tile_scores(hidden, crop_tiles(token_cells(model, size), window)))
    scores = torch.cat(scores)
    return scores[~scores.isnan()]


@torch.no_grad()
def encoder_merge_image(model, crops: Tensor, size: Tensor, layer: int, window: int, tau: float) -> dict:
    """One image merged after encoder layer `layer - 1`: its projected tokens 'projected' (T, D') and 'valid'."""
    layers, last = _encoder(model)
    cls, side = _cls(model), _side(model)
    x = states_before(model, crops, layer)
    c, s, d = x.shape
    out = merge_image(RN.packed(model, x[:, cls:], size), crop_tiles(token_cells(model, size), window), tau,
                      "raster", "static")
    patch = token_patches(model, size)
    rows = x[:, cls:].reshape(c * side * side, d).clone()
    rows[patch] = out["states"].to(x.dtype)
    x = torch.cat([x[:, :cls], rows.reshape(c, side * side, d)], 1)
    visible = torch.ones(c * side * side, dtype=torch.bool)
    visible[patch[~out["valid"]]] = False
    visible = torch.cat([torch.ones(c, cls, dtype=torch.bool), visible.reshape(c, side * side)], 1)
    mask = torch.zeros(c, 1, s, s, dtype=x.dtype).masked_fill(~visible[:, None, None, :], torch.finfo(x.dtype).min)
    for blk in layers[layer:last + 1]:
        feature_in = x
        y = blk(x, mask)
        x = y[0] if isinstance(y, tuple) else y
    feats = x[:, cls:] if model.config.vision_feature_select_strategy == "default" else x
    tokens = RN.packed(model, feats, size)
    found = {"projected": model.model.multi_modal_projector(tokens.to(x.dtype)), "valid": out["valid"]}
    if cls:         # the feature layer's CLS attention by hand (heads averaged), the masked keys left out
        attn, h = layers[last].self_attn, layers[last].layer_norm1(feature_in)
        q, k = (proj(h).reshape(c, s, attn.num_heads, -1).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj))
        logits = q[:, :, :1] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask
        found["cls"] = RN.packed(model, logits.softmax(-1).mean(1)[:, 0, cls:, None], size)[:, 0]
    return found


def encoder_merge_run(model, example, *, layer: int, window: int, tau: float, steps: int = 16) -> dict:
    """The pruned run of mustdrop_merge(layer=layer, positions='keep', order='raster') on anyres images:
    every image slot kept (merged-away ones masked), positions as in the unpruned prompt."""
    ref = mustdrop_run(model, example, window=window, tau=tau, steps=steps, encoder_layer=layer, positions="keep")
    ref["keep"] = ref["vision_keep"]
    return ref
