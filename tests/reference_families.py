"""Independent reference inputs for the model families beyond LLaVA-1.5 (Qwen2-VL / Qwen2.5-VL with
images and video, LLaVA-NeXT), for ``reference.lm_generate``. Nothing here imports graphprune.

As for Qwen2-VL in ``reference.qwen2vl_inputs``, two pieces of bookkeeping come from Hugging Face:
the vision features (the model's ``get_image_features`` / ``get_video_features``: the pruning under
test happens in the language model) and Qwen's 3-D M-RoPE position ids (``get_rope_index``). The
rest is written here from the processors' layouts:
  * Qwen: the prunable vision tokens are the ``<|image_pad|>`` / ``<|video_pad|>`` placeholders; a unit
    is an image, or one temporal patch (frame) of a video (``video_unit="video"``: the whole video).
  * LLaVA-1.5: the prunable tokens are the ``<image>`` placeholders (patches, no CLS), positions
    ``cumsum(mask) - 1``; an image is a unit.
  * Mistral 3: the prunable tokens are the ``[IMG]`` placeholders; ``[IMG_BREAK]`` / ``[IMG_END]`` are
    other ids, text to the language model. Positions are ``cumsum(mask) - 1``. The same for Aya Vision
    (``<|IMG_PATCH|>`` placeholders; start, tile and end markers are text); a unit is an image: the
    tile runs one marker apart. And Video-LLaVA: ``<image>`` / ``<video>`` placeholders (no markers), a
    video's block being its frames' (patches + CLS) in order. And InternVL: ``<IMG_CONTEXT>``
    placeholders, all tiles of an image in one run between ``<img>`` and ``</img>``. And Idefics3 / SmolVLM:
    ``<image>`` placeholders, one run per tile, tiles and global view marked by other ids (text here).
    GLM-4.1V: Qwen's layout (``<|image|>`` between begin / end of image) and its M-RoPE bookkeeping.
    Qwen3-VL: Qwen's placeholders, a video's frames each in its own block after a time stamp (text);
    its DeepStack features (``deepstack``) are the features' ``deepstack_features`` at the placeholders.
  * Gemma 3 / PaliGemma: ``<image_soft_token>`` / ``<image>`` placeholders, text embeddings scaled by
    sqrt(hidden_size); Gemma 3's begin / end-of-image markers are text. PaliGemma's features are its
    projector's output (transformers 4.x divides them by sqrt(hidden_size) and its LM multiplies the
    input back), its positions ``cumsum(mask)`` (1-indexed). Their bidirectional attention groups
    (``attention_groups``) from Hugging Face's rules: Gemma 3, each run of ``token_type_ids == 1`` (an
    image) is a group; PaliGemma, the prefix ``token_type_ids == 0`` is one group (transformers 4.x:
    every prompt token, it ignores token_type_ids when not training).
  * LLaVA-NeXT: an image's placeholders are the base view's ``side^2`` patches, then the unpadded crop
    grid row by row, each row closed by one image_newline slot (LlavaNextProcessor's
    ``_get_number_of_features``; OneVision caps the grid at ``anyres_max_N``); a OneVision video is
    frames x pooled patches then one newline slot. Newline slots are not prunable. Positions are
    ``cumsum(mask) - 1``.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor

__all__ = ["attention_groups", "deepstack", "family_inputs", "fastv_units_select"]


def _merge(model, ids: Tensor, example) -> Tensor:
    """Token embeddings with each modality's features written at its placeholders, in order."""
    cfg = model.config
    emb = model.state_dict()[_embed_key(model)][ids].clone().float()
    body = model.model
    kw = example.as_kwargs()
    pixels = kw.get("pixel_values", kw.get("pixel_values_images"))     # Video-LLaVA's processor: the latter
    if cfg.model_type in ("gemma3", "paligemma"):
        emb = emb * torch.tensor(cfg.text_config.hidden_size ** 0.5)
        if cfg.model_type == "paligemma":
            feats = body.multi_modal_projector(body.vision_tower(pixels).last_hidden_state)
        else:
            feats = body.get_image_features(pixels)
        emb[ids == cfg.image_token_id] = _flat(feats).float()
        return emb
    if pixels is not None:
        extra = {k: kw[k] for k in ("image_grid_thw", "image_sizes", "pixel_attention_mask") if k in kw}
        emb[ids == cfg.image_token_id] = _flat(body.get_image_features(pixels, **extra)).float()
    if kw.get("pixel_values_videos") is not None:
        extra = {k: kw[k] for k in ("video_grid_thw",) if k in kw}
        # LLaVA-OneVision on transformers 4.56-4.57: required arguments, the config's values
        params = inspect.signature(body.get_video_features).parameters
        extra.update({name: getattr(cfg, name) for name in ("vision_feature_layer", "vision_feature_select_strategy")
                      if name in params})
        feats = body.get_video_features(kw["pixel_values_videos"], **extra)
        if cfg.model_type == "video_llava" and isinstance(feats, tuple):   # 4.56-4.57: (features, frames)
            feats = feats[0]
        if cfg.model_type == "llava_onevision" and not hasattr(feats, "pooler_output"):
            # 4.56-4.57 return the frames only; their forward closes each video with image_newline
            feats = torch.cat([feats, body.image_newline.expand(feats.shape[0], 1, -1)], 1)
        emb[ids == cfg.video_token_id] = _flat(feats).float()
    return emb


def _embed_key(model) -> str:
    keys = [k for k in model.state_dict() if k.endswith("embed_tokens.weight")]
    assert len(keys) == 1, keys
    return keys[0]


def _flat(out) -> Tensor:
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, (list, tuple)):
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
    return feats.reshape(-1, feats.shape[-1])


def _llava_next_prunable(model, example) -> Tensor:
    """(B, S) bool: the image placeholders that hold patch features (not image_newline)."""
    cfg = model.config
    ids = example.input_ids
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    out = torch.zeros_like(ids, dtype=torch.bool)
    sizes = example.image_sizes if example.image_sizes is not None else torch.zeros(0, 2, dtype=torch.long)
    per = sizes.shape[0] // ids.shape[0]
    for b in range(ids.shape[0]):
        slots = (ids[b] == cfg.image_token_id).nonzero(as_tuple=True)[0]
        marks = []
        for h0, w0 in sizes[b * per:(b + 1) * per].tolist():
            # best crop grid: the pinpoint resolution that keeps the most effective pixels, then wastes least
            best, best_eff, best_waste = None, -1, float("inf")
            for ph, pw in cfg.image_grid_pinpoints:
                scale = min(pw / w0, ph / h0)
                eff = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
                waste = ph * pw - eff
                if eff > best_eff or (eff == best_eff and waste < best_waste):
                    best, best_eff, best_waste = (ph, pw), eff, waste
            rows, cols = side * best[0] // cfg.vision_config.image_size, side * best[1] // cfg.vision_config.image_size
            if w0 / h0 > cols / rows:
                rows -= 2 * ((rows - int(round(h0 * cols / w0, 7))) // 2)
            else:
                cols -= 2 * ((cols - int(round(w0 * rows / h0, 7))) // 2)
            if cfg.model_type == "llava_onevision":        # crop grid capped at anyres_max_N base views
                ratio = (rows * cols / (int(cfg.vision_aspect_ratio.strip("anyres_max_")) * side * side)) ** 0.5
                if ratio > 1.1:
                    rows, cols = int(rows // ratio), int(cols // ratio)
            row = [True] * cols + [False]
            marks += [True] * side * side + row * rows
        assert len(marks) == slots.numel(), "layout differs from the prompt's placeholder count"
        out[b, slots] = torch.tensor(marks, dtype=torch.bool)
        if example.pixel_values_videos is not None:     # OneVision: each video block ends in one newline slot
            videos = (ids[b] == cfg.video_token_id).nonzero(as_tuple=True)[0]
            per_video = videos.view(example.pixel_values_videos.shape[0] // ids.shape[0], -1)
            newline = 1 if cfg.model_type == "llava_onevision" else 0     # LLaVA-NeXT-Video: none
            out[b, per_video[:, :per_video.shape[1] - newline].reshape(-1)] = True
    return out


# families whose prunable tokens are exactly their image placeholders (markers around and between
# them are other token ids), with 1-D positions cumsum(mask) - 1
PLACEHOLDER_FAMILIES = ("llava", "mistral3", "aya_vision", "video_llava", "internvl", "idefics3", "smolvlm", "gemma3",
                        "paligemma")


@torch.no_grad()
def family_inputs(model, example):
    """(inputs_embeds, attention_mask, position_ids, vision_mask (B, S) prunable tokens, units per sample)."""
    cfg = model.config
    ids, am = example.input_ids, example.attention_mask
    emb = _merge(model, ids, example)
    if cfg.model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v"):   # GLM-4.1V, Qwen3-VL: the same bookkeeping
        extra = {"second_per_grid_ts": example.second_per_grid_ts} if example.second_per_grid_ts is not None else {}
        # transformers >= 5.1 takes the vision-token types; earlier versions find the tokens themselves
        if "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters:
            extra["mm_token_type_ids"] = example.mm_token_type_ids
        pos, _ = model.model.get_rope_index(ids, image_grid_thw=example.image_grid_thw,
                                            video_grid_thw=example.video_grid_thw, attention_mask=am, **extra)
        vm = (ids == cfg.image_token_id) | (ids == getattr(cfg, "video_token_id", -1))
    elif cfg.model_type in ("llava_next", "llava_onevision", "llava_next_video"):
        pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
        vm = _llava_next_prunable(model, example)
    elif cfg.model_type in PLACEHOLDER_FAMILIES:
        pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 0) + (cfg.model_type == "paligemma")
        vm = (ids == cfg.image_token_id) | (ids == getattr(cfg, "video_token_id", -1))
    else:
        raise ValueError(cfg.model_type)
    return emb, am, pos, vm


def instruction_mask(model, example) -> Tensor:
    """(B, S) bool: the real tokens after each sample's last image or video placeholder, whether it holds a
    patch feature or not (LLaVA-NeXT's image_newline closing an image, OneVision's closing a video): the
    instruction the text-guided methods read."""
    cfg, ids = model.config, example.input_ids
    placeholders = (ids == cfg.image_token_id) | (ids == getattr(cfg, "video_token_id", -1))
    ar = torch.arange(ids.shape[1]).expand_as(ids)
    last = torch.where(placeholders, ar, -1).amax(1, keepdim=True)
    return (ar > last) & example.attention_mask.bool() & (last >= 0)


@torch.no_grad()
def deepstack(model, example) -> Tensor | None:
    """Qwen3-VL's DeepStack features (levels, B, S, D) in prompt coordinates: level l of each image's
    and video's features (get_image_features / get_video_features ``deepstack_features``, in prompt
    order) at its placeholders, zero elsewhere, as the model's forward adds them at visual_pos_masks;
    None for other families."""
    cfg = model.config
    if cfg.model_type != "qwen3_vl":
        return None
    ids, kw = example.input_ids, example.as_kwargs()
    levels = len(cfg.vision_config.deepstack_visual_indexes)
    out = torch.zeros(levels, *ids.shape, cfg.text_config.hidden_size)
    modalities = (("pixel_values", "image_grid_thw", cfg.image_token_id, "get_image_features"),
                  ("pixel_values_videos", "video_grid_thw", cfg.video_token_id, "get_video_features"))
    for pixels, grid, token, get in modalities:
        if kw.get(pixels) is not None:
            feats = getattr(model.model, get)(kw[pixels], kw[grid]).deepstack_features
            for level in range(levels):
                out[level][ids == token] = torch.cat(feats[level]).float()
    return out


def attention_groups(model, example) -> Tensor | None:
    """(B, S) bidirectional attention groups for ``reference.lm_generate``, None for a causal LM."""
    import transformers
    types, ids = example.token_type_ids, example.input_ids
    if model.config.model_type == "gemma3":
        if types is None:                       # Hugging Face: causal everywhere without them
            return None
        image = types == 1
        starts = image & ~torch.cat([torch.zeros_like(image[:, :1]), image[:, :-1]], 1)
        return torch.where(image, starts.long().cumsum(1) - 1, -1)
    if model.config.model_type == "paligemma":
        if int(transformers.__version__.split(".")[0]) < 5:
            return torch.zeros_like(ids)
        return None if types is None else torch.where(types == 0, 0, -1)
    return None


def units_of(model, example, video_unit: str = "frame") -> int:
    """Number of keep units per sample: images, plus frames (temporal patches) or videos."""
    b = example.input_ids.shape[0]
    n = 0
    if example.image_grid_thw is not None:
        n += example.image_grid_thw.shape[0] // b
    elif model.config.model_type == "aya_vision":
        # pixel_values rows are tiles; the processor writes one tile marker between the tiles of an
        # image, and end / start / tile markers (at least three tokens) between images
        slots = (example.input_ids[0] == model.config.image_token_id).nonzero(as_tuple=True)[0]
        n += 1 + int((slots[1:] - slots[:-1] > 3).sum())
    elif model.config.model_type == "internvl":       # pixel_values rows are tiles; an image is one <img> block
        slots = (example.input_ids[0] == model.config.image_token_id).nonzero(as_tuple=True)[0]
        n += 1 + int((slots[1:] - slots[:-1] > 1).sum())
    elif model.config.model_type in ("idefics3", "smolvlm"):
        # pixel_values (samples, tiles, ...); an image's tiles are 2 or 3 tokens apart (<fake> <row_i_col_j>,
        # with "\n" ending a row), 4 before its global view ("\n" "\n" <fake> <global-img>); the
        # prompts here put its closing <fake>, two text tokens, <fake> <row_1_col_1> before the next image
        slots = (example.input_ids[0] == model.config.image_token_id).nonzero(as_tuple=True)[0]
        n += 1 + int((slots[1:] - slots[:-1] > 5).sum())
    elif example.pixel_values is not None:
        n += example.pixel_values.shape[0] // b
    elif example.pixel_values_images is not None:
        n += example.pixel_values_images.shape[0] // b
    if example.video_grid_thw is not None:
        grids = example.video_grid_thw[: example.video_grid_thw.shape[0] // b]
        n += int(grids[:, 0].sum()) if video_unit == "frame" else grids.shape[0]
    elif example.pixel_values_videos is not None:       # OneVision: (videos, frames, C, H, W)
        videos, frames = example.pixel_values_videos.shape[0] // b, example.pixel_values_videos.shape[1]
        n += videos * frames if video_unit == "frame" else videos
    return n


def fastv_units_select(keep: int, units: int):
    """FastV per unit: each unit (the sample's vision tokens split into `units` equal blocks in prompt
    order) keeps its `keep` tokens that the last prompt token attends to most (head mean) after layer
    K-1; non-vision tokens are kept."""

    def select(ctx: dict) -> Tensor:
        vm = ctx["vision_mask"].bool()
        score = ctx["attn"][:, :, -1, :].mean(1)
        rows = []
        for b in range(vm.shape[0]):
            blocks = vm[b].nonzero(as_tuple=True)[0].view(units, -1)
            top = score[b, blocks].topk(keep, dim=-1).indices
            rows.append(torch.cat([(~vm[b]).nonzero(as_tuple=True)[0], blocks.gather(1, top).reshape(-1)]).sort().values)
        return torch.stack(rows)

    return select
