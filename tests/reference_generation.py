"""tests/reference.py's hand-written language model as a transformers generation model, so that
Hugging Face's own ``generate`` (logits processors, stop strings, streamers, beam search, scores)
drives an independent, plain-PyTorch FastV and can be compared with graphprune's pruned model.

Nothing here imports graphprune. The prefill follows ``reference.lm_generate`` (explicit softmax
attention, a selection ``select(ctx)`` after layer ``select_layer - 1``, later layers on the kept
tokens with their original positions); the cache holds each layer's keys / values (post-RoPE) and
key validity; a decode step attends, in each layer, to that layer's cache plus the new token, at
position ``max(prompt positions) + 1 + tokens fed since`` (as transformers' generate for LLaVA).
"""
from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import reference as R
import torch
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast


class ReferenceCache(Cache):
    """Per-layer (keys, values, valid) lists; `seen` positions of input_ids consumed."""

    def __init__(self):
        super().__init__(layers=[])
        self.k, self.v, self.valid = [], [], []
        self.seen, self.next_pos = 0, None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def _rows(self, rows):
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]
        self.valid = [t[rows] for t in self.valid]
        self.next_pos = self.next_pos[rows]

    def reorder_cache(self, beam_idx):
        self._rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int):
        self._rows(torch.arange(self.next_pos.shape[0]).repeat_interleave(repeats))

    @property
    def is_compileable(self) -> bool:
        return False


class ReferenceVLM(nn.Module, GenerationMixin):
    """``model``'s weights run by tests/reference.py, with ``select`` (e.g. ``reference.fastv_select``)
    applied before layer ``select_layer`` (None: keep every token)."""

    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    _is_stateful = False

    def __init__(self, model, select=None, select_layer=None):
        super().__init__()
        self.hf = model
        self.config, self.generation_config = model.config, model.generation_config
        self.lm = R._LM(model)
        self.select, self.select_layer = select, select_layer

    @property
    def device(self):
        return torch.device("cpu")

    @property
    def dtype(self):
        return torch.float32

    @classmethod
    def can_generate(cls):
        return True

    @classmethod
    def is_remote_code(cls):
        return False

    @contextmanager
    def _optimize_model_for_decode(self):
        yield

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **kw):
        """Beam search repeats each sample with its image. Qwen2-VL's pixel_values rows are patches,
        one block of grid_thw.prod() rows per image (one image per sample in these tests), so the
        blocks are repeated, not the rows."""
        pixels = kw.pop("pixel_values", None)
        input_ids, kw = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **kw)
        if pixels is not None and expand_size > 1:
            if self.config.model_type == "qwen2_vl":
                blocks = pixels.split(kw["image_grid_thw"][::expand_size].prod(-1).tolist())
                pixels = torch.cat([block for block in blocks for _ in range(expand_size)])
            else:
                pixels = pixels.repeat_interleave(expand_size, 0)
        return input_ids, dict(kw, pixel_values=pixels)

    def _inputs(self, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids):
        ex = SimpleNamespace(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                             image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids)
        if self.config.model_type == "qwen2_vl":
            return R.qwen2vl_inputs(self.hf, ex)
        return R.llava_inputs(self.hf, ex)

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                mm_token_type_ids=None, past_key_values=None, use_cache=True, return_dict=True, **generate_extras):
        # generate_extras: what generate hands every model (the stop-string tokenizer), unused as by HF models
        cache = past_key_values if past_key_values is not None else ReferenceCache()
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape[0], cache.seen + input_ids.shape[1], dtype=torch.long)
        if cache.k:
            fed = attention_mask[:, -input_ids.shape[1]:]
            logits = [self._step(cache, input_ids[:, j], fed[:, j]) for j in range(input_ids.shape[1])]
            return CausalLMOutputWithPast(logits=torch.stack(logits, 1), past_key_values=cache)
        return CausalLMOutputWithPast(logits=self._prompt(cache, input_ids, attention_mask, pixel_values,
                                                           image_grid_thw, mm_token_type_ids), past_key_values=cache)

    def _prompt(self, cache, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids):
        lm = self.lm
        h, mask, pos, vmask = self._inputs(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids)
        h, valid, vmask = h.float(), mask.bool(), vmask.bool()
        b, s, _ = h.shape
        pmax = pos if pos.dim() == 2 else pos.amax(0)
        cache.next_pos = pmax.masked_fill(~valid, torch.iinfo(pmax.dtype).min).amax(-1) + 1
        index = torch.arange(s).expand(b, s)

        def allowed_for(v):
            t = v.shape[1]
            return torch.ones(t, t, dtype=torch.bool).tril()[None] & v[:, None, :]

        cos, sin = lm.cos_sin(pos)
        allowed, probs = allowed_for(valid), None
        for i in range(lm.n_layers):
            if i == self.select_layer:
                keep = self.select({"attn": probs, "vision_mask": vmask, "hidden": h, "index": index})
                h, valid, vmask, index = (R._gather_seq(h, keep), valid.gather(1, keep), vmask.gather(1, keep),
                                          index.gather(1, keep))
                pos = R._gather_pos(pos, keep)
                cos, sin = lm.cos_sin(pos)
                allowed = allowed_for(valid)
            h, k, v, probs = lm.layer(i, h, cos, sin, None, None, allowed)
            cache.k.append(k)
            cache.v.append(v)
            cache.valid.append(valid)
        cache.seen = s
        return lm.logits(h)

    def _step(self, cache, token, fed):
        lm = self.lm
        x = lm.embed[token][:, None]
        p = cache.next_pos[:, None]
        if lm.mrope_section is not None:
            p = p[None].expand(3, -1, -1)
        c, sn = lm.cos_sin(p)
        for i in range(lm.n_layers):
            cache.valid[i] = torch.cat([cache.valid[i], fed[:, None].bool()], 1)
            x, cache.k[i], cache.v[i], _ = lm.layer(i, x, c, sn, cache.k[i], cache.v[i], cache.valid[i][:, None, :])
        cache.seen += 1
        cache.next_pos = cache.next_pos + fed
        return lm.logits(x)[:, -1]

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        kwargs.setdefault("past_key_values", ReferenceCache())
        return super().generate(*args, **kwargs)
