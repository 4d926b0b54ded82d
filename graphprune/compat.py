"""The few places where supported transformers versions differ in an API graphprune calls.

graphprune supports transformers 4.56 up to the newest 5.x it is tested with (pyproject.toml says
which). Every version switch lives here, each with the versions it covers, so the rest of the code
calls one function and a dropped version means deleting one branch. Imports only torch and
transformers (no graphprune module), so any module may use it without an import cycle; transformers
is imported on first use, so `import graphprune` stays light.
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch


@functools.cache
def transformers_version() -> tuple[int, int]:
    """(major, minor) of the installed transformers."""
    import transformers
    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(minor)


def transformers_major() -> int:
    return transformers_version()[0]


def aya_vision_logit_scale(text_config) -> float:
    """The factor AyaVisionForConditionalGeneration multiplies its head's logits by: its Cohere LM's
    `logit_scale` on transformers >= 5.25 (as CohereForCausalLM always does); 4.56-5.24 return the
    head's output unscaled."""
    return float(text_config.logit_scale) if transformers_version() >= (5, 25) else 1.0


def sliding_window(text_config) -> int | None:
    """The smallest attention window of a text config, None when every layer attends to all earlier
    tokens; 0 for a window the config does not state. transformers 5 (and 4.5x for newer models) lists
    each layer's kind in `layer_types`; older configs say `sliding_window` (with Qwen2's
    `use_sliding_window` switch)."""
    kinds = getattr(text_config, "layer_types", None)
    window = getattr(text_config, "sliding_window", None)
    if kinds is not None:
        windowed = any(kind != "full_attention" for kind in kinds)
    else:
        windowed = window is not None and getattr(text_config, "use_sliding_window", True) is not False
    if not windowed:
        return None
    return int(window) if window else 0


@functools.cache
def generate_cache_name() -> str:
    """The name generate() gives the cache: in the kwargs it passes forward and the output field it
    reads back. transformers 5.24 renamed `past_key_values` to `cache`."""
    from transformers.generation import utils
    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def cache_holding(past):
    """A DynamicCache whose layer i holds past[2i], past[2i + 1] (keys, values) as they are.
    DynamicCache.update on an empty layer concatenates onto an empty tensor, a full copy of every
    layer's cache per decode step; the first update at zero length here sets dtype and device
    (and whatever a version initialises), then the layer takes the tensors without a copy (4.56
    and 5.x both keep them in layer.keys / layer.values)."""
    from transformers.cache_utils import DynamicCache
    cache = DynamicCache()
    for i in range(len(past) // 2):
        keys, values = past[2 * i], past[2 * i + 1]
        cache.update(keys[..., :0, :], values[..., :0, :], i)
        cache.layers[i].keys, cache.layers[i].values = keys, values
    return cache


def plain_model_kwargs(**model_kwargs) -> dict:
    """from_pretrained keyword arguments that load the model's own modules, not hub kernels, unless
    the caller passes use_kernels itself.

    transformers 5.25 kernelizes every from_pretrained by default (use_kernels unset means True)
    and raises when no `kernels` package in its range is installed (none is, offline or on this
    machine's index); 4.56-5.24 default to False. graphprune loads weights and runs its own captured
    graph of the model's modules, so its loaders keep that default. use_kernels=False is accepted by
    every supported version (4.56 pops it too)."""
    return {"use_kernels": False, **model_kwargs}


def rope_config(theta: float, mrope_section: list[int] | None = None) -> dict:
    """Text-config keyword arguments for default RoPE (with Qwen2-VL's M-RoPE sections if given).

    transformers 5 reads `rope_parameters={"rope_type", "rope_theta", "mrope_section"}`; 4.x reads
    `rope_theta` plus `rope_scaling={"type": "mrope", "mrope_section"}` (Qwen2-VL maps "mrope" to
    default RoPE split into sections)."""
    if transformers_major() >= 5:
        params = {"rope_type": "default", "rope_theta": theta}
        if mrope_section is not None:
            params["mrope_section"] = list(mrope_section)
        return {"rope_parameters": params}
    # (4.x Mllama reads rope_scaling["rope_type"] unconditionally; "default" is plain RoPE everywhere)
    scaling = {"rope_type": "default"} if mrope_section is None else {"type": "mrope", "mrope_section": list(mrope_section)}
    return {"rope_theta": theta, "rope_scaling": scaling}


def qwen2vl_takes_mm_token_type_ids(model) -> bool:
    """Whether this Qwen2-VL (ForConditionalGeneration) takes `mm_token_type_ids` (1 at image tokens).

    transformers >= 5.1 does, and its processor returns them; 5.0 and 4.x find the image tokens
    from `config.image_token_id` themselves and their generate() rejects the argument."""
    return "mm_token_type_ids" in inspect.signature(vlm_body(model).get_rope_index).parameters


def vlm_body(model):
    """The body (LlavaModel, Qwen2VLModel, ...: vision tower, projector, `language_model`) of an
    XForConditionalGeneration, or the model itself when it is that body.

    Asked of the `model` attribute: on transformers 4.56-4.57 the ForConditionalGeneration has a
    `language_model` property too, so that attribute alone does not tell the two apart."""
    inner = getattr(model, "model", None)
    return inner if hasattr(inner, "language_model") else model


def feature_selection_kwargs(get_features, config) -> dict:
    """The config's `vision_feature_layer` / `vision_feature_select_strategy` for a get_image_features /
    get_video_features method that takes them: LLaVA-OneVision's get_video_features requires both on
    transformers 4.56-4.57 (5.x reads them from the config when not given). Passing the config's
    values is what the model's own forward does."""
    params = inspect.signature(get_features).parameters
    return {name: getattr(config, name) for name in ("vision_feature_layer", "vision_feature_select_strategy")
            if name in params and getattr(config, name, None) is not None}


def onevision_video_features(body, pixel_values_videos, **kw):
    """LlavaOnevisionModel.get_video_features with the image_newline that closes each video.

    transformers 5 returns an output whose pooler_output ends each video with it; 4.56-4.57 return
    the pooled frame features alone and append the newline in the model's forward."""
    out = body.get_video_features(pixel_values_videos, **kw)
    if hasattr(out, "pooler_output"):
        return out
    newline = body.image_newline[None, None, :].expand(out.shape[0], 1, -1).to(out.dtype)
    return torch.cat([out, newline], 1)


def video_llava_video_features(body, pixel_values_videos, **kw):
    """VideoLlavaModel.get_video_features without the frame count: transformers 4.56-4.57 return
    (features, num_frames); 5.x an output whose pooler_output holds the features."""
    out = body.get_video_features(pixel_values_videos, **kw)
    return out[0] if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], int) else out


def qwen2vl_rope_index(model, input_ids, mm_token_type_ids, **grids):
    """Qwen2VLModel.get_rope_index of a Qwen2-VL-style (ForConditionalGeneration) model -> (3, B, T)
    M-RoPE position ids. `grids`: image_grid_thw, video_grid_thw, attention_mask, ... Where
    get_rope_index does not take `mm_token_type_ids` its second positional argument is
    `image_grid_thw`, so everything goes by keyword."""
    kw = {k: v for k, v in grids.items() if v is not None}
    if qwen2vl_takes_mm_token_type_ids(model):
        kw["mm_token_type_ids"] = mm_token_type_ids
    pos, _ = vlm_body(model).get_rope_index(input_ids, **kw)
    return pos


def paligemma_prefix(token_type_ids, attention_mask) -> torch.Tensor:
    """(B, S) bool: the prompt tokens PaliGemma's prefill attends to bidirectionally (its prefix).

    transformers 5 reads the processor's token_type_ids (0: prefix, 1: suffix; none given: no
    prefix, causal attention); 4.56-4.57, when not training, every prompt token."""
    if transformers_major() < 5:
        return torch.ones_like(attention_mask, dtype=torch.bool)
    if token_type_ids is None:
        return torch.zeros_like(attention_mask, dtype=torch.bool)
    return token_type_ids == 0


def is_later_generate_step(model_inputs: dict) -> bool:
    """Whether inputs from GenerationMixin.prepare_inputs_for_generation are for a step after the
    first of a generate() call, whose image inputs the model must not read again.

    transformers 5 leaves image inputs out of those steps itself (`is_first_iteration`): False there.
    4.56-4.57 leave that to each model's own preparation (LLaVA's keeps pixel_values only while
    `cache_position[0] == 0`); a later step is one that feeds the single token just generated."""
    if transformers_major() >= 5:
        return False
    positions = model_inputs.get("cache_position")
    return positions is not None and positions.numel() == 1


@contextlib.contextmanager
def traceable_masks():
    """While capturing: transformers 4.x builds its SDPA masks without torch.vmap.

    transformers 4.53-4.57 expand the mask function over (batch, head, q, kv) with torch.vmap, which
    torch.export records as functorch nesting calls that a plain fx graph cannot run once rewritten
    (and ONNX cannot express). transformers 5 expands the same mask functions by broadcasting index
    tensors (`_non_vmap_expansion_sdpa`); this swaps that construction into transformers' mask
    registry for the duration of the capture, for the "sdpa" attention implementation only, and
    puts the original back after. A no-op on transformers 5."""
    if transformers_major() >= 5:
        yield
        return
    from transformers import masking_utils
    registry = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS
    before = registry._local_mapping.get("sdpa")
    registry["sdpa"] = _sdpa_mask_by_broadcast
    try:
        yield
    finally:
        if before is None:
            del registry["sdpa"]
        else:
            registry["sdpa"] = before


def _sdpa_mask_by_broadcast(batch_size, cache_position, kv_length, kv_offset=0, mask_function=None,
                            attention_mask=None, local_size=None, allow_is_causal_skip=True, **kwargs):
    # transformers 4.57's sdpa_mask_recent_torch, with the vmap over (b, h, q, kv) replaced by broadcasting
    import torch
    from transformers import masking_utils as mu
    mask_function = mask_function or mu.causal_mask_function
    q_length = cache_position.shape[0]
    padding_mask = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset, _slice=False)
    if allow_is_causal_skip and mu._ignore_causal_mask_sdpa(padding_mask, q_length, kv_length, kv_offset, local_size):
        return None
    if padding_mask is not None:
        mask_function = mu.and_masks(mask_function, mu.padding_mask_function(padding_mask))
    device = cache_position.device
    kv = torch.arange(kv_length, device=device) + kv_offset
    b = torch.arange(batch_size, device=device)
    h = torch.arange(1, device=device)
    mask = mask_function(b[:, None, None, None], h[None, :, None, None], cache_position[None, None, :, None],
                         kv[None, None, None, :])
    return mask.expand(batch_size, 1, q_length, kv_length)
