"""Model inputs checked at the entrance of a pruned model, before any graph runs.

What a Hugging Face processor returns is accepted; what would make a pruned run silently wrong
(image tokens that do not match the images, right padding) or fail deep inside a graph (1-D ids,
a wrong image size, NaN pixels) is refused with an InputError that names the value and says what
to do. Masks are normalised here (bool / float 0-1 -> long), so every path after this sees one kind.
"""
from __future__ import annotations

import math
from numbers import Real

import torch

from graphprune.errors import InputError


def check_model_inputs(family, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                       mm_token_type_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask as long) after checking every input against the model's family."""
    input_ids = _token_ids(input_ids, family.embed_rows())
    attention_mask = _attention_mask(attention_mask, input_ids)
    if mm_token_type_ids is not None and (not isinstance(mm_token_type_ids, torch.Tensor)
                                          or mm_token_type_ids.shape != input_ids.shape):
        raise InputError(f"mm_token_type_ids {_describe(mm_token_type_ids)} must be a tensor shaped like input_ids "
                         f"{tuple(input_ids.shape)}")
    _check_images(family, input_ids, pixel_values, image_grid_thw)
    return input_ids, attention_mask


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"of shape {tuple(x.shape)} and dtype {x.dtype}"
    text = repr(x)
    return f"{type(x).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _token_ids(input_ids, vocab: int) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        raise InputError(f"input_ids must be a torch tensor of token ids (batch, seq), got {_describe(input_ids)}; "
                         "use the processor's return_tensors='pt' output or torch.tensor([ids])")
    if input_ids.dtype in (torch.bool,) or input_ids.dtype.is_floating_point or input_ids.dtype.is_complex:
        raise InputError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise InputError(f"input_ids must be (batch, seq) with at least one token, got shape {tuple(input_ids.shape)}"
                         + ("; add the batch dimension with input_ids[None]" if input_ids.dim() == 1 else ""))
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        raise InputError(f"input_ids hold token id {low if low < 0 else high}, outside this model's vocabulary "
                         f"0..{vocab - 1}")
    return input_ids.long()


def _attention_mask(mask, input_ids) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(input_ids)
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"attention_mask must be a torch tensor like input_ids, got {_describe(mask)}")
    if mask.shape != input_ids.shape:
        raise InputError(f"attention_mask of shape {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}; "
                         "give the 2-D padding mask the processor returns")
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        bad = mask[(mask != 0) & (mask != 1)][0].item()
        raise InputError(f"attention_mask holds {bad!r}: a padding mask holds only 0 (pad) and 1 (token)")
    mask = mask.long()
    empty = (mask.sum(1) == 0).nonzero()
    if len(empty):
        raise InputError(f"sample {int(empty[0])} of the batch is all padding (its attention_mask is all 0)")
    right = (mask[:, 1:] < mask[:, :-1]).any(1).nonzero()
    if len(right):
        b = int(right[0])
        raise InputError(f"sample {b} is not left-padded (its attention_mask has a 0 after a 1: "
                         f"{mask[b].tolist()[:12]}{'...' if mask.shape[1] > 12 else ''}); pruning scores from the "
                         "last prompt token, so pad on the left: tokenizer.padding_side = 'left' "
                         "(processor.tokenizer.padding_side = 'left')")
    return mask


def _check_images(family, input_ids, pixel_values, image_grid_thw) -> None:
    image_id = family.image_token_id()
    is_image = input_ids == image_id
    tokens = int(is_image.sum())
    if pixel_values is None:
        if tokens:
            raise InputError(f"the prompt has {tokens} image tokens (id {image_id}) but no pixel_values were given")
        return
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.dtype.is_floating_point:
        raise InputError(f"pixel_values must be a floating-point tensor, got {_describe(pixel_values)}")
    if not bool(torch.isfinite(pixel_values).all()):
        raise InputError("pixel_values contain NaN or inf; every answer would be NaN: check the image "
                         "loading and normalisation")
    per_image = family.image_token_counts(pixel_values, image_grid_thw)
    if per_image is None:                  # e.g. the ONNX runner's host family: the runtime's own checks apply
        return
    if tokens != sum(per_image):
        raise InputError(f"Image features and image tokens do not match: the prompt has {tokens} image tokens "
                         f"(id {image_id}) and the {len(per_image)} image(s) give {sum(per_image)} features "
                         f"({', '.join(map(str, sorted(set(per_image))))} per image); let the processor expand "
                         "each image into its tokens")
    expected = iter(per_image)
    for b in range(input_ids.shape[0]):
        for block in _runs(is_image[b]):
            want = next(expected)
            if block != want:
                raise InputError(f"sample {b} has an image-token block of {block} tokens where its image gives "
                                 f"{want}: each image's tokens must be one contiguous block (as the processor "
                                 "writes them); graphprune prunes an image's block as its patch grid")


def _runs(flags: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D bool tensor, in order."""
    pos = flags.nonzero()[:, 0]
    if len(pos) == 0:
        return []
    breaks = (pos[1:] != pos[:-1] + 1).nonzero()[:, 0] + 1
    edges = [0, *breaks.tolist(), len(pos)]
    return [b - a for a, b in zip(edges, edges[1:])]


def check_generate_options(*, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id,
                           pad_token_id) -> None:
    """Decoding options that would crash a sampling step or loop silently wrong, refused up front."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(do_sample, bool):
        raise InputError(f"do_sample must be True or False, got {do_sample!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not math.isfinite(temperature) \
            or (do_sample and temperature <= 0):
        raise InputError(f"temperature must be a finite number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise InputError(f"top_k must be None or an int >= 0 (0 keeps every token), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, Real) or not 0.0 <= top_p <= 1.0):
        raise InputError(f"top_p must be None or a number in [0, 1], got {top_p!r}")
    for name, ids in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        items = ids if isinstance(ids, (list, tuple)) and name == "eos_token_id" else [ids]
        if ids is not None and any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items):
            raise InputError(f"{name} must be a token id (int >= 0){' or a list of them' if name[0] == 'e' else ''}, "
                             f"got {ids!r}")
