"""Independent reference for ToMe (Bolya et al., 2023) on LLaVA-NeXT (CLIP, with CLS) / LLaVA-OneVision (SigLIP, no
CLS) anyres images, in place inside the encoder. Nothing here imports graphprune.

* One merge step on one crop (crop_merge), from the paper: the crop's sequence is [CLS (where the tower has one),
  its surviving patches in raster order]; A = its even places, B = its odd places; each A patch's best B patch by
  the cosine of its key (heads averaged when `heads`, else concatenated); the A patches ranked by that score
  (descending; ties to the earlier patch) and the first r merge into their B patch, size-weighted
  (x = sum(size x) / sum(size), sizes added). CLS never merges; nothing merges across crops. r per crop: the
  given r, or ceil(max(survivors - keep, 0) / merge layers left), at most survivors // 2.
* The run (tome_run): each crop of each image through the model's own encoder layers (states entering layer 0
  read by a hook on the tower), merging after each ToMe layer l on layer l's keys (k_proj of its layer_norm1
  input) and output; a merged-away patch stays in its row (it still runs as a query) but is masked as a key in
  every later layer of its crop (additive -inf); proportional attention adds log(size) of each key to every
  later layer's logits. Patches that unpadding removes (no feature token) never merge and are never merged into
  (they still run, as the model runs them). The feature layer's rows (CLS dropped where the strategy drops it)
  are laid out by the model's own pack_image_features (reference_vision_llava_next.packed), newline rows out,
  and projected by the model's projector; a merged-away token's slot gets attention mask 0 in the LLM, every
  token keeps its position (reference_vision_llava_next_merge's prompt route, reference.lm_generate).
"""
from __future__ import annotations

import math

import reference_vision_llava_next as RN
import reference_vision_llava_next_merge as RM
import torch
from torch import Tensor


def crop_merge(keys: Tensor, hidden: Tensor, sizes: Tensor, cls: bool, count: int, heads: int | None = None) -> dict:
    """One ToMe step on one crop's surviving patches (rows in raster order): keys (t, H*d), hidden (t, D), sizes
    (t,). Returns 'into' {merged-away row: the row it joined}, 'hidden' and 'sizes' after the merge (a merged-away
    row keeps its own)."""
    t = keys.shape[0]
    metric = keys.float() if heads is None else keys.float().reshape(t, heads, -1).mean(1)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    places = [i + int(cls) for i in range(t)]                 # place in [CLS, survivors]
    a = [i for i in range(t) if places[i] % 2 == 0]
    b = [i for i in range(t) if places[i] % 2 == 1]
    out_x, out_s = hidden.clone(), sizes.clone()
    if not a or not b or count == 0:
        return {"into": {}, "hidden": out_x, "sizes": out_s}
    scores = metric[a] @ metric[b].t()
    best, match = scores.max(-1)
    ranked = sorted(range(len(a)), key=lambda j: (-float(best[j]), j))
    into = {a[j]: b[int(match[j])] for j in ranked[:count]}
    for dst in sorted(set(into.values())):
        members = [dst] + [src for src, d in into.items() if d == dst]
        w = sizes[members]
        out_x[dst] = (hidden[members] * w[:, None]).sum(0) / w.sum()
        out_s[dst] = w.sum()
    return {"into": into, "hidden": out_x, "sizes": out_s}


def merges_now(survivors: int, r: int | None, keep: int | None, layers_left: int) -> int:
    want = r if r is not None else math.ceil(max(survivors - keep, 0) / layers_left)
    return min(want, survivors // 2)


# -- the run on a model -------------------------------------------------------------------------------------


def _crop_keys(layer, x: Tensor) -> Tensor:
    """(crops, S, H*d): the keys of an encoder layer (its k_proj on its layer_norm1 input)."""
    return layer.self_attn.k_proj(layer.layer_norm1(x))


@torch.no_grad()
def tome_image(model, crops: Tensor, size: Tensor, layers, r: int | None, keep: int | None,
               proportional: bool = True, heads: int | None = None) -> dict:
    """One anyres image: its projected tokens 'projected' (T, D'), 'valid' (T,) and, per merge layer, the merges
    'into' ({token: token it joined}, token indices in prompt order)."""
    enc, last = RM._encoder(model)
    cls, side = RM._cls(model), RM._side(model)
    x = RM.states_before(model, crops, 0)
    c, s, d = x.shape
    patch = RM.token_patches(model, size)                    # each token's crop patch, prompt order
    crop_of, cell = patch // (side * side), patch % (side * side)
    valid = torch.ones(patch.shape[0], dtype=torch.bool)
    sizes = torch.ones(c, s, dtype=x.dtype)                  # per crop row: CLS and patches no token keep size 1
    mask = torch.zeros(c, 1, s, s, dtype=x.dtype)
    merges = []
    for i, l in enumerate(range(last + 1)):
        layer_in = x
        y = enc[l](x, mask)
        x = y[0] if isinstance(y, tuple) else y
        if l not in layers:
            continue
        keys = _crop_keys(enc[l], layer_in)
        left = len([m for m in layers if m >= l])
        into_all = {}
        for k in range(c):
            tokens = [int(t) for t in (crop_of == k).nonzero()[:, 0] if valid[t]]
            tokens.sort(key=lambda t: int(cell[t]))            # the crop's survivors in raster order
            rows = [cls + int(cell[t]) for t in tokens]
            out = crop_merge(keys[k, rows], x[k, rows], sizes[k, rows], bool(cls),
                             merges_now(len(tokens), r, keep, left), heads)
            x[k, rows], sizes[k, rows] = out["hidden"].to(x.dtype), out["sizes"]
            for src, dst in out["into"].items():
                into_all[tokens[src]] = tokens[dst]
                valid[tokens[src]] = False
        merges.append(into_all)
        hidden_keys = torch.ones(c * side * side, dtype=torch.bool)
        hidden_keys[patch[~valid]] = False
        visible = torch.cat([torch.ones(c, cls, dtype=torch.bool), hidden_keys.reshape(c, side * side)], 1)
        bias = sizes.log() if proportional else torch.zeros_like(sizes)
        mask = bias[:, None, None, :].expand(c, 1, s, s).masked_fill(~visible[:, None, None, :], float("-inf"))
    feats = x[:, cls:] if model.config.vision_feature_select_strategy == "default" else x
    tokens = RN.packed(model, feats, size)
    return {"projected": model.model.multi_modal_projector(tokens.to(x.dtype)), "valid": valid, "merges": merges}


def tome_run(model, example, *, layers, r: int | None = None, keep: int | None = None, proportional: bool = True,
             heads: int | None = None, steps: int = 16) -> dict:
    """The pruned run of tome(positions='keep') on anyres images: every image slot kept (merged-away ones
    masked), positions as in the unpruned prompt. 'keep': the kept prompt indices; 'merges': per image (samples
    in order), per merge layer, {token: token it joined} (prompt-order token indices of the image)."""
    merges = []

    def image(crops, size):
        out = tome_image(model, crops, size, tuple(layers), r, keep, proportional, heads)
        merges.append(out["merges"])
        return out

    ref = RM.mustdrop_run(model, example, window=0, tau=0.0, steps=steps, encoder_layer=min(layers) + 1,
                          positions="keep", encoder_image=image)
    ref["keep"], ref["merges"] = ref["vision_keep"], merges
    return ref
