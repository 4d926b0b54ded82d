"""Independent reference for vision-stage pruning of Gemma 3 images. Nothing here imports graphprune.

* Per image: the model's own SigLIP tower (no CLS); forward hooks on its last encoder layer read that layer's input.
  Its attention by hand: layer_norm1, q / k from the projection weights, softmax(q k^T / sqrt(d)) per image, heads
  averaged; a patch's score is the attention it receives (the column's mean over every query), its key the layer's
  keys with heads concatenated.
* An image token is the model's own projector pooling (multi_modal_projector.avg_pool: kernel = stride = k on the
  patch grid) of its patch block. Its score and key are that pooling of its patches' scores and keys (the means
  over its block); its hidden state the pooling of the tower's last_hidden_state (post_layernorm), what enters the
  projector's mm_soft_emb_norm.
* `features` runs the tower and the model's own multi_modal_projector on its last_hidden_state by hand: what the
  placeholders take. A merged token's value is its merged hidden state through mm_soft_emb_norm and
  mm_input_projection_weight (the projector's steps after its pooling, written out here).
* Selection per image: the top-k scores; the top-k of torch.rand((samples, images, tokens), manual_seed(seed));
  the largest projected-token norms; VisionZip (reference_vision_qwen.zip_unit) and VisPruner
  (reference_vision_qwen_methods.vispruner_choice) on the pooled tokens.
* The pruned prompt: the full merged embeddings (reference_families.family_inputs: the model's own
  get_image_features at the placeholders, text embeddings scaled) at the kept tokens (merged ones: their values),
  Gemma 3's attention groups (each image's run of token_type_ids == 1, reference_families.attention_groups) at the
  kept tokens (so the kept tokens of an image still attend to one another), positions kept or renumbered
  (compact), run by reference.lm_generate.
"""
from __future__ import annotations

import math

import reference as R
import torch
from reference_families import attention_groups, family_inputs
from reference_vision_qwen import keep_of_units, zip_unit
from reference_vision_qwen_methods import vispruner_choice
from torch import Tensor


def _pool(model, per_patch: Tensor) -> Tensor:
    """(images, P, C) per patch -> (images, tokens, C): the projector's own avg_pool on the patch grid."""
    side = model.model.multi_modal_projector.patches_per_image
    n, _, c = per_patch.shape
    grid = per_patch.float().transpose(1, 2).reshape(n, c, side, side)
    return model.model.multi_modal_projector.avg_pool(grid).flatten(2).transpose(1, 2)


@torch.no_grad()
def features(model, pixels: Tensor) -> Tensor:
    """(images, tokens, D): the tower's last_hidden_state through the model's own projector."""
    return model.model.multi_modal_projector(model.model.vision_tower(pixel_values=pixels).last_hidden_state)


def project(model, hidden: Tensor) -> Tensor:
    """Pooled hidden states (.., C) -> projected tokens (.., D): the projector's norm and input projection."""
    proj = model.model.multi_modal_projector
    return proj.mm_soft_emb_norm(hidden) @ proj.mm_input_projection_weight


@torch.no_grad()
def image_tokens(model, example) -> list[dict]:
    """Per image (samples in order): its tokens' 'received' (tokens,), 'keys' and 'hidden' (tokens, C)."""
    tower = model.model.vision_tower
    layer, seen = tower.encoder.layers[-1], {}
    hook = layer.register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0] if a else kw["hidden_states"]),
                                           with_kwargs=True)
    try:
        last = tower(pixel_values=example.pixel_values).last_hidden_state
    finally:
        hook.remove()
    attn = layer.self_attn
    x = layer.layer_norm1(seen["x"])
    n, s, _ = x.shape
    q = attn.q_proj(x).reshape(n, s, attn.num_heads, -1).transpose(1, 2)
    k = attn.k_proj(x).reshape(n, s, attn.num_heads, -1).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1).mean(1)        # (images, S, S)
    received = _pool(model, probs.mean(1)[..., None])[..., 0]
    keys = _pool(model, k.transpose(1, 2).reshape(n, s, -1))
    hidden = _pool(model, last)
    return [{"received": received[i], "keys": keys[i], "hidden": hidden[i]} for i in range(n)]


def units(model, example) -> list[list[Tensor]]:
    """Per sample, each image's placeholder positions."""
    per = example.pixel_values.shape[0] // example.input_ids.shape[0]
    return [list(row.nonzero()[:, 0].chunk(per)) for row in example.input_ids == model.config.image_token_id]


def _per_sample(model, example, per_image: list) -> list[list]:
    n = len(units(model, example)[0])
    return [per_image[i * n:(i + 1) * n] for i in range(len(per_image) // n)]


@torch.no_grad()
def picks(model, example, keep: int, how: str, seed: int = 0) -> list[list[Tensor]]:
    """Per sample, per image: the kept token indices (ascending); how 'received', 'norm' or 'random'."""
    blocks = units(model, example)
    if how == "random":
        u = torch.rand((len(blocks), len(blocks[0]), blocks[0][0].numel()), generator=torch.Generator().manual_seed(seed))
        return [[u[i, j].topk(keep).indices.sort().values for j in range(len(row))] for i, row in enumerate(blocks)]
    if how == "norm":
        emb = family_inputs(model, example)[0]
        return [[emb[i, blk].norm(dim=-1).topk(keep).indices.sort().values for blk in row]
                for i, row in enumerate(blocks)]
    return _per_sample(model, example, [tok[how].topk(keep).indices.sort().values
                                        for tok in image_tokens(model, example)])


@torch.no_grad()
def visionzip(model, example, keep: int, contextual: int, authors_order: bool = True) -> tuple[list, list]:
    """Per sample, per image: VisionZip's kept token indices (ascending) by attention received, and the projected
    values their slots take: dominant tokens in raster order, then the contextual ones (the authors' sequence,
    for compact positions), or each token's at its own slot (positions kept)."""
    chosen, values = [], []
    for tok in image_tokens(model, example):
        dom, targets, hidden = zip_unit(tok["received"], tok["keys"], tok["hidden"], keep, contextual)
        kept = torch.cat([dom, targets]).sort().values
        chosen.append(kept)
        values.append(project(model, hidden[torch.cat([dom.sort().values, targets]) if authors_order else kept]))
    return _per_sample(model, example, chosen), _per_sample(model, example, values)


@torch.no_grad()
def vispruner(model, example, keep: int, important_ratio: float) -> list[list[Tensor]]:
    """Per sample, per image: VisPruner's kept indices (ascending), important by attention received, diverse by
    the pooled hidden states."""
    return _per_sample(model, example, [vispruner_choice(tok["received"], tok["hidden"], keep, important_ratio)
                                        for tok in image_tokens(model, example)])


def keep_index(model, example, chosen: list[list[Tensor]]) -> Tensor:
    return keep_of_units(units(model, example), example.input_ids.shape[1], chosen)


@torch.no_grad()
def generate(model, example, chosen, steps: int, positions: str = "keep", values=None) -> dict:
    """reference.lm_generate on the pruned prompt: the kept tokens' embeddings (merged ones: `values`, in the
    order the authors lay them out when compact), the image groups at the kept tokens."""
    emb, am, pos, _ = family_inputs(model, example)
    keep = keep_index(model, example, chosen)
    emb = emb.clone()
    if values is not None:
        for i, row in enumerate(units(model, example)):
            for blk, c, v in zip(row, chosen[i], values[i]):
                emb[i, blk[c]] = v.to(emb.dtype)
    groups = attention_groups(model, example)
    emb, am = emb.gather(1, keep[..., None].expand(-1, -1, emb.shape[-1])), am.gather(1, keep)
    pos = pos.gather(1, keep) if positions == "keep" else (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
    ref = R.lm_generate(model, emb, am, pos, max_new_tokens=steps,
                        groups=None if groups is None else groups.gather(1, keep))
    ref["keep"] = keep
    return ref
