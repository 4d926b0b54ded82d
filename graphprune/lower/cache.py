"""The pruned model's KV cache as a transformers `Cache`: per layer, exactly the tokens that layer kept.

After a pruned prefill layer l holds len_l entries (what it kept), each with a key mask (1 for a
real token, 0 for padding or an invalid static-capacity slot) and the prompt index it came from
(-1: a token fed after the prompt). Hugging Face's `generate` carries this object between steps
like any other cache: it asks `get_seq_length()` (tokens of the conversation consumed so far, in
input_ids coordinates, not entries: layers hold different numbers), reorders it for beam search
(`reorder_cache`) and expands it (`batch_repeat_interleave`). The model's decode step reads and
extends it (graphprune.lower.runtime).

`PrunedCache(capacity=n)` is the static variant: every layer is a buffer of its kept length + n
slots, written in place by the static decode graph (graphprune.rewrite.kv_cache.static_kv), so
every decode step has the same shapes and buffer addresses (CUDA graphs).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from graphprune.errors import InputError


class PrunedLayer(CacheLayerMixin):
    """One decoder layer's cache: keys / values (B, H_kv, slots, d), mask and index (B, slots);
    `length` slots are filled (all of them unless the layer is static)."""

    is_compileable = False       # graphprune compiles its own static decode graph (compile_decode)
    is_croppable = False
    supports_early_init = False

    def __init__(self, keys, values, mask, index, capacity: int = 0):
        super().__init__()
        self.length = keys.shape[2]
        if capacity:                 # static: buffers with room for `capacity` more tokens
            keys, values, mask, index = (_grow(t, dim, capacity, fill) for t, dim, fill in
                                         ((keys, 2, 0), (values, 2, 0), (mask, 1, 0), (index, 1, -1)))
        self.keys, self.values, self.mask, self.index = keys, values, mask, index
        self.static = bool(capacity)
        self.is_initialized = True

    # -- what graphprune reads -----------------------------------------------------------------
    def filled(self):
        """(keys, values, mask, index) of the filled slots."""
        n = self.length
        return self.keys[:, :, :n], self.values[:, :, :n], self.mask[:, :n], self.index[:, :n]

    @property
    def nbytes(self) -> int:
        k, v = self.filled()[:2]
        return k.numel() * k.element_size() + v.numel() * v.element_size()

    def append(self, keys, values, mask_column, index_column):
        """Dynamic layers: the decode graph returns the whole cache with the new token at the end;
        mask_column / index_column (B, 1): the token's key mask and index (-1), built once a step for
        every layer (new_columns)."""
        self.keys, self.values = keys, values
        self.mask = torch.cat([self.mask, mask_column], 1)
        self.index = torch.cat([self.index, index_column], 1)
        self.length += 1

    def new_columns(self, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask column, index column) of a token fed with key mask `mask` (B,), for append."""
        return mask[:, None].to(self.mask.dtype), torch.full_like(self.index[:, :1], -1)

    # -- what transformers calls ---------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        raise NotImplementedError("a PrunedLayer is built from a pruned prefill")

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("PrunedCache is written by graphprune's decode graphs, not by a modeling forward")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2] + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.keys.shape[2] if self.static else -1

    get_max_cache_shape = get_max_length     # its name on transformers 4.56-4.57 (abstract there)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._take_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._take_rows(torch.arange(self.keys.shape[0], device=self.keys.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._take_rows(indices)

    def _take_rows(self, rows):
        rows = rows.to(self.keys.device)
        same_batch = rows.numel() == self.keys.shape[0]
        for name in ("keys", "values", "mask", "index"):
            t = getattr(self, name)
            if self.static and same_batch:       # in place: the buffers keep their addresses
                t.copy_(t.index_select(0, rows))
            else:
                setattr(self, name, t.index_select(0, rows))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a pruned cache cannot be cropped (assisted decoding is not supported)")


def _grow(t, dim, n, fill):
    pad = list(t.shape)
    pad[dim] = n
    return torch.cat([t, t.new_full(pad, fill)], dim)


class PrunedCache(Cache):
    """Per-layer caches of their own lengths after a pruned prefill, plus where the conversation
    stands: `seen` input positions consumed (prompt incl. padding + tokens fed since) and, per
    row, the position id the next token gets. `capacity=n` makes it the static variant (n slots
    per layer for the tokens fed after the prompt). An empty cache is filled by the next prefill."""

    def __init__(self, capacity: int = 0):
        super().__init__(layers=[])
        self.capacity = capacity
        self.seen = 0
        self.next_position: torch.Tensor | None = None     # (B,) long
        # every filled slot of every layer holds a real key (mask all ones): set by fill, kept by the
        # decode steps (row selections of beam search keep it); decode then builds no key masks
        self.keys_all_real = False

    @property
    def static(self) -> bool:
        return bool(self.capacity)

    def fill(self, layers: list[tuple], seen: int, next_position: torch.Tensor) -> "PrunedCache":
        """Store a prefill's per-layer (keys, values, mask, index)."""
        if self.layers:
            raise InputError("this PrunedCache already holds a conversation; pass a new one (or none) for a new prompt")
        self.layers = [PrunedLayer(*layer, capacity=self.capacity) for layer in layers]
        self.seen, self.next_position = seen, next_position
        self.keys_all_real = all(bool(layer.mask.all()) for layer in self.layers)
        return self

    def copy(self) -> "PrunedCache":
        """A cache to continue from this point, leaving this one as it is (dynamic layers share
        their tensors, which decode steps replace and never write; static buffers are copied)."""
        out = PrunedCache(self.capacity)
        out.seen, out.next_position, out.keys_all_real = self.seen, self.next_position, self.keys_all_real
        for layer in self.layers:
            twin = PrunedLayer.__new__(PrunedLayer)
            twin.__dict__.update(layer.__dict__)
            if layer.static:
                twin.keys, twin.values, twin.mask = layer.keys.clone(), layer.values.clone(), layer.mask.clone()
            out.layers.append(twin)
        return out

    # -- graphprune's view: one entry per layer ------------------------------------------------
    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, i) -> PrunedLayer:
        return self.layers[i]

    def lengths(self) -> list[int]:
        return [layer.length for layer in self.layers]

    def bytes_per_layer(self) -> list[int]:
        return [layer.nbytes for layer in self.layers]

    def room(self, tokens: int) -> None:
        """Static caches fail clearly when the tokens to feed do not fit."""
        if self.static and self.layers and self.layers[0].length + tokens > self.layers[0].keys.shape[2]:
            left = self.layers[0].keys.shape[2] - self.layers[0].length
            raise InputError(f"the static cache has room for {left} more tokens, {tokens} were fed; "
                             "build it with a larger capacity (generate(static_cache=True) sizes it to max_new_tokens)")

    # -- transformers' view ----------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Input positions consumed (what `generate` slices a continued conversation by), not entries."""
        return self.seen

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        if self.next_position is not None:
            self.next_position = self.next_position.index_select(0, beam_idx.to(self.next_position.device))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.next_position is not None:
            self.next_position = self.next_position.repeat_interleave(repeats, 0)

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        if self.next_position is not None:
            self.next_position = self.next_position[indices]

    @property
    def is_compileable(self) -> bool:
        return False
