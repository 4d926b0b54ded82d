"""A Hugging Face decode step over caches the torch.compile backend pruned, with padding: refused with an
InputError before dynamo traces the layers.

A padded prefill is pruned exactly, but Hugging Face's decode cannot follow it: its padding mask has one
column per prompt token while the pruned layers' caches hold fewer, and dynamo's fake-tensor pass fails on
that mismatch inside SDPA (a raw TorchRuntimeError) before any frame reaches the backend's own checks.
Without padding Hugging Face passes no mask and the step is exact. So a forward pre-hook on the language
model, traced by dynamo, compares shapes only: a step whose mask is longer than a layer's cache (a pruned
cache) calls `_refuse_if_padded`, which dynamo runs eagerly (a graph break, on pruned decode steps only)
and which raises if the mask holds padding. Prompts (empty caches) and unpruned steps trace straight through.
"""
from __future__ import annotations

import weakref

import torch

from graphprune.errors import InputError

_WATCHED: weakref.WeakSet = weakref.WeakSet()


@torch._dynamo.disable
def _refuse_if_padded(mask: torch.Tensor, message: str) -> None:
    if bool((mask == 0).any()):
        raise InputError(message)


def watch_decodes(language_model: torch.nn.Module, layers: int, message: str) -> None:
    """Hook `language_model` (once): a padded decode step over its pruned caches raises InputError(message)."""
    if language_model in _WATCHED:
        return

    def hook(module, args, kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        mask = kwargs.get("attention_mask")
        embeds = kwargs.get("inputs_embeds")
        if cache is None or not isinstance(mask, torch.Tensor) or mask.dim() != 2 or embeds is None:
            return
        steps = embeds.shape[1]
        past = [cache.get_seq_length(i) for i in range(layers)]
        if past[0] > 0 and any(p + steps != mask.shape[-1] for p in past):
            _refuse_if_padded(mask, message)

    language_model.register_forward_pre_hook(hook, with_kwargs=True)
    _WATCHED.add(language_model)
