"""A Hugging Face decode step over caches the torch.compile backend pruned, with padding: refused with an
InputError, inside the compiled step, with no graph break.

A padded prefill is pruned exactly, but Hugging Face's decode cannot follow it: its padding mask has one
column per prompt token while the pruned layers' caches hold fewer. Depending on the transformers version,
the mismatch fails dynamo's fake-tensor pass inside SDPA (a raw TorchRuntimeError, before any frame reaches
the backend's own checks) or builds the mask from the wrong columns. Without padding the step is exact:
Hugging Face passes either no mask (transformers 5's generate drops an all-ones one) or an all-ones 2-D
mask (older generate, or a caller's own loop), and an all-ones mask over one new token masks nothing.

So a forward pre-hook on the language model, traced by dynamo, compares shapes only: a step whose 2-D mask
is longer than a layer's cache (a pruned cache) hands the mask to `unpadded`, a custom op that raises
`InputError(PADDED)` when the mask holds padding and is otherwise the identity on the step's embeddings
(so no compiler drops it), and the step goes on without the mask, as Hugging Face runs an all-ones one.
Dynamo traces the op into the step's graph: the decision on the mask's values runs on every step,
compiled, with no graph break. Prompts (empty caches) and unpruned steps trace straight through.
"""
from __future__ import annotations

import weakref

import torch

from graphprune.errors import InputError

PADDED = ("padded batch: its prefill is pruned exactly, but decoding it needs graphprune's per-layer "
          "key masks (Hugging Face's mask has one column per prompt token, the shrunk caches fewer); "
          "use graphprune.prune(model, ...).generate(...) for padded batches")

_WATCHED: weakref.WeakSet = weakref.WeakSet()


def refuse_padded(mask: torch.Tensor) -> None:
    """InputError(PADDED) when the (B, keys) padding mask of a step over pruned caches masks any key."""
    if bool((mask == 0).any()):
        raise InputError(PADDED)


@torch.library.custom_op("graphprune::unpadded", mutates_args=())
def unpadded(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`embeds`, once `mask` is known to hold no padding (refuse_padded). A copy: a custom op's output
    may not alias its input."""
    refuse_padded(mask)
    return embeds.clone()


@unpadded.register_fake
def _(embeds, mask):
    return torch.empty_like(embeds)


def watch_decodes(language_model: torch.nn.Module) -> None:
    """Hook `language_model` (once): a padded decode step over its pruned caches raises InputError(PADDED)."""
    if language_model in _WATCHED:
        return
    layers = language_model.config.num_hidden_layers

    def hook(module, args, kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        mask = kwargs.get("attention_mask")
        embeds = kwargs.get("inputs_embeds")
        if cache is None or not isinstance(mask, torch.Tensor) or mask.dim() != 2 or embeds is None:
            return None
        steps = embeds.shape[1]
        past = [cache.get_seq_length(i) for i in range(layers)]
        if past[0] == 0 or all(p + steps == mask.shape[-1] for p in past):
            return None
        return args, {**kwargs, "inputs_embeds": unpadded(embeds, mask), "attention_mask": None}

    language_model.register_forward_pre_hook(hook, with_kwargs=True)
    _WATCHED.add(language_model)
