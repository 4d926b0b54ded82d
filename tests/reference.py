"""Independent reference implementation used to check graphprune.

Everything here is plain PyTorch written from the papers' equations and the model architectures. It reads
only a model's weights (``model.state_dict()``) and its config; it never calls a Hugging Face module's
forward (no ``model(...)``, no ``layer(...)``). Attention is always computed explicitly as
``softmax(Q K^T * scale + mask)`` in fp32, so that attention probabilities are available for the
selection rules.

Two pieces of bookkeeping are taken from Hugging Face, for Qwen2-VL only (see ``qwen2vl_inputs``):
the vision features (``model.model.get_image_features``: Qwen2-VL has no CLS-based pass to check, and the
pruning under test happens in the language model) and the 3-D M-RoPE position ids
(``model.model.get_rope_index``: position bookkeeping, not the computation under test).

Conventions (they match transformers 5.23 ``generate()``):
  * left padding; LLaVA position ids are ``cumsum(attention_mask) - 1`` with padded positions set to 0
    (``GenerationMixin._prepare_position_ids_for_generation``); Qwen2-VL uses ``get_rope_index`` which
    also leaves padded positions at 0. Padded tokens are masked as keys, so their positions never
    influence a real token.
  * padded queries (rows with every key masked) get an additive mask of ``finfo.min`` everywhere, which
    makes their softmax uniform (as HF's eager path) instead of NaN; their outputs are never used.
  * decoding: the token generated at step t (t = 0 is the argmax of the prefill's last logits) is fed at
    position ``max(prompt position ids of that sample) + 1 + t`` (all three M-RoPE axes alike).
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor

__all__ = [
    "llava_vision", "llava_image_features", "llava_inputs", "llava_inputs_from_vision", "qwen2vl_inputs",
    "lm_generate", "text_after_image", "image_blocks", "fastv_select", "vtw_select", "vtw_kl",
]


# --------------------------------------------------------------------------------------------- helpers

def _act(name: str) -> Callable[[Tensor], Tensor]:
    """Activation functions, written out (names as in HF configs)."""
    name = name.lower()
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu":  # exact (erf) GELU
        return lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    if name in ("silu", "swish"):
        return lambda x: x * torch.sigmoid(x)
    if name == "relu":
        return lambda x: torch.clamp(x, min=0)
    raise NotImplementedError(f"activation {name!r}")


def _weights(model) -> dict[str, Tensor]:
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def _linear(x: Tensor, w: dict[str, Tensor], prefix: str) -> Tensor:
    y = x @ w[prefix + ".weight"].t()
    b = w.get(prefix + ".bias")
    return y + b if b is not None else y


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _softmax_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, scale: float):
    """q (B,H,T,d), k/v (B,H,L,d), allowed (B,T,L) bool or None -> (out (B,H,T,d), probs (B,H,T,L))."""
    scores = (q @ k.transpose(-1, -2)) * scale
    if allowed is not None:
        neg = torch.finfo(scores.dtype).min
        scores = scores + torch.where(allowed, 0.0, neg)[:, None]
    probs = torch.softmax(scores.float(), dim=-1)
    return probs @ v, probs


# --------------------------------------------------------------------------------- LLaVA vision tower

@torch.no_grad()
def llava_vision(model, pixel_values: Tensor, after_layer: dict | None = None) -> dict:
    """CLIP vision tower + LLaVA projector, by hand, with hooks between encoder layers.

    ``after_layer={i: fn}``: after encoder layer i, ``fn(h, ctx)`` may replace the hidden states h
    (n, t, d) (CLS at row 0) by returning ``h`` or a 3-tuple ``(h', index' (n, t') long, key_valid' (n, t')
    bool)``; later layers then run on the new sequence, with invalid keys masked. ``ctx`` has ``probs`` (the
    layer's attention probabilities (n, H, t, t)), ``key_valid`` and ``index`` ((n, t) original encoder
    index of each row, CLS = 0). Hooks run only between layers that feed the features (``i + 1`` below the
    feature layer's hidden-state index); a hook after the feature layer itself is never called.

    Returns dict: ``features`` (n, V', D_text) after the projector, ``pre_features`` (n, V', d) entering it,
    ``hidden`` (n, 1 + V', d) the feature layer's output with the CLS row,
    ``cls_attn`` (n, V') head-averaged CLS attention to the patch tokens in the layer producing the features,
    ``received`` (n, V') the attention each patch receives there, averaged over heads and every query (CLS too),
    ``patch_index`` (n, V') original patch index (0..V-1) of each feature row, ``valid`` (n, V') key validity.
    """
    cfg = model.config
    vc = cfg.vision_config
    w = _weights(model)
    p = "model.vision_tower."
    if p + "embeddings.class_embedding" not in w:  # older layouts: model.vision_tower.vision_model.*
        p = "model.vision_tower.vision_model."
    eps = vc.layer_norm_eps
    n_heads = vc.num_attention_heads
    d = vc.hidden_size
    hd = d // n_heads
    act = _act(vc.hidden_act)
    after_layer = after_layer or {}

    x = pixel_values.float()
    n = x.shape[0]
    patches = F.conv2d(x, w[p + "embeddings.patch_embedding.weight"], stride=vc.patch_size)  # (n, d, g, g)
    patches = patches.flatten(2).transpose(1, 2)  # (n, V, d), row-major over the grid
    cls = w[p + "embeddings.class_embedding"].expand(n, 1, d)
    h = torch.cat([cls, patches], dim=1)
    pos = w[p + "embeddings.position_embedding.weight"]
    assert pos.shape[0] == h.shape[1], "position-embedding interpolation is not supported"
    h = h + pos[None]
    h = _layer_norm(h, w[p + "pre_layrnorm.weight"], w[p + "pre_layrnorm.bias"], eps)

    n_layers = vc.num_hidden_layers
    layer = cfg.vision_feature_layer
    assert isinstance(layer, int), "only a single vision_feature_layer is supported"
    hs_index = layer % (n_layers + 1)  # index into hidden_states (hidden_states[0] = embeddings)
    assert hs_index >= 1

    index = torch.arange(h.shape[1]).expand(n, -1)
    key_valid = torch.ones(n, h.shape[1], dtype=torch.bool)
    probs = None
    for i in range(hs_index):  # later layers do not influence the selected features
        lp = f"{p}encoder.layers.{i}."
        r = h
        y = _layer_norm(h, w[lp + "layer_norm1.weight"], w[lp + "layer_norm1.bias"], eps)
        t = y.shape[1]
        q = _linear(y, w, lp + "self_attn.q_proj").view(n, t, n_heads, hd).transpose(1, 2)
        k = _linear(y, w, lp + "self_attn.k_proj").view(n, t, n_heads, hd).transpose(1, 2)
        v = _linear(y, w, lp + "self_attn.v_proj").view(n, t, n_heads, hd).transpose(1, 2)
        allowed = None if bool(key_valid.all()) else key_valid[:, None, :].expand(n, t, t)
        o, probs = _softmax_attention(q, k, v, allowed, hd ** -0.5)
        o = o.transpose(1, 2).reshape(n, t, d)
        h = r + _linear(o, w, lp + "self_attn.out_proj")
        r = h
        y = _layer_norm(h, w[lp + "layer_norm2.weight"], w[lp + "layer_norm2.bias"], eps)
        y = _linear(act(_linear(y, w, lp + "mlp.fc1")), w, lp + "mlp.fc2")
        h = r + y
        if i in after_layer and i + 1 < hs_index:
            out = after_layer[i](h, {"probs": probs, "key_valid": key_valid, "index": index})
            h, new_index, new_valid = out if isinstance(out, tuple) else (out, index, key_valid)
            index, key_valid = new_index, new_valid

    assert cfg.vision_feature_select_strategy == "default", "the reference drops CLS (strategy 'default')"
    pre = h[:, 1:]
    cls_attn = probs[:, :, 0, 1:].mean(dim=1)  # (n, V')
    pact = _act(cfg.projector_hidden_act)
    feats = _linear(pact(_linear(pre, w, "model.multi_modal_projector.linear_1")), w,
                    "model.multi_modal_projector.linear_2")
    received = probs.mean(dim=1).mean(dim=1)[:, 1:]  # (n, V') attention each patch receives, over heads and queries
    return {"features": feats, "pre_features": pre, "cls_attn": cls_attn, "patch_index": index[:, 1:] - 1,
            "valid": key_valid[:, 1:], "hidden": h, "received": received}


@torch.no_grad()
def clip_cls_attention(model, hidden: Tensor, layer: int) -> Tensor:
    """Head-averaged attention of the CLS row to the patch rows (n, V') in CLIP encoder layer `layer`, run on
    its input ``hidden`` (n, 1 + V', d) (CLS first): layer_norm1, q / k projections, softmax(q k^T / sqrt(hd))."""
    vc = model.config.vision_config
    w = _weights(model)
    p = "model.vision_tower."
    if p + "embeddings.class_embedding" not in w:
        p = "model.vision_tower.vision_model."
    lp = f"{p}encoder.layers.{layer}."
    n, t, d = hidden.shape
    hd = d // vc.num_attention_heads
    y = _layer_norm(hidden.float(), w[lp + "layer_norm1.weight"], w[lp + "layer_norm1.bias"], vc.layer_norm_eps)
    q = _linear(y, w, lp + "self_attn.q_proj").view(n, t, -1, hd).transpose(1, 2)
    k = _linear(y, w, lp + "self_attn.k_proj").view(n, t, -1, hd).transpose(1, 2)
    probs = (q[:, :, :1] @ k.transpose(-1, -2) * hd ** -0.5).softmax(-1)        # (n, H, 1, t)
    return probs[:, :, 0, 1:].mean(1)


@torch.no_grad()
def llava_image_features(model, pixel_values: Tensor, cls_keep: int | None = None):
    """CLIP vision tower + LLaVA projector, by hand.

    Returns (features (n_images, V, D_text), kept_idx or None). With ``cls_keep=k`` (FasterVLM "cls_topk"),
    keeps the k patches most attended by the CLS query in the layer that produces the selected features
    (head-averaged attention probabilities, columns 1.. of row 0), indices sorted ascending.
    """
    out = llava_vision(model, pixel_values)
    feats = out["features"]
    if cls_keep is None:
        return feats, None
    kept = torch.topk(out["cls_attn"], cls_keep, dim=-1).indices.sort(dim=-1).values
    feats = torch.gather(feats, 1, kept[..., None].expand(-1, -1, feats.shape[-1]))
    return feats, kept


# ------------------------------------------------------------------------------------------ LM inputs

def _positions_from_mask(mask: Tensor) -> Tensor:
    # transformers 5.23 GenerationMixin._prepare_position_ids_for_generation: cumsum - 1, pads -> 0
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


@torch.no_grad()
def llava_inputs(model, example, cls_keep: int | None = None):
    """LM inputs for LLaVA: (inputs_embeds (B,S,D), attention_mask (B,S), position_ids (B,S), vision_mask (B,S)).

    Image features fill the image-token positions in row-major order (as HF's ``masked_scatter``).
    With ``cls_keep=k`` each image keeps only its k CLS-selected tokens; the other image tokens are removed
    from the sequence and positions are recomputed over the shorter sequence ("compact").
    """
    feats, kept = llava_image_features(model, example.pixel_values, cls_keep=cls_keep)
    if kept is None:
        kept = torch.arange(feats.shape[1]).expand(feats.shape[0], -1)
    emb, mask, pos, img, _ = llava_inputs_from_vision(model, example, {"features": feats, "patch_index": kept})
    return emb, mask, pos, img


@torch.no_grad()
def llava_inputs_from_vision(model, example, vision_out: dict, positions: str = "compact",
                             protected: Tensor | None = None):
    """LM inputs for LLaVA from a (possibly reduced or merged) vision output.

    ``vision_out``: ``features`` (n_images, V', D), ``patch_index`` (n_images, V') the original patch index
    (0..V-1, ascending) of each feature row, i.e. its slot (a merged token sits at its representative's
    slot), and optionally ``valid`` (n_images, V') bool (static-mode slots that stay but are masked).
    Images go to samples in order: sample b holds images ``b*n .. b*n+n-1`` (n = images per sample), its
    i-th run of V image tokens (in prompt order) being image ``b*n+i``.

    The prompt keeps, for each image, only the image-token slots listed in ``patch_index`` (filled with the
    features, in that order); the other image-token slots are removed. Invalid slots get attention mask 0
    (they act like padding) but stay in ``vision_mask``. ``positions``: ``"compact"`` = cumsum of the new
    attention mask - 1, masked slots at 0 (as ``_positions_from_mask``); ``"keep"`` = the full prompt's
    position ids gathered at the kept slots. ``protected`` (n_images, V') bool is mapped onto the prompt.

    Returns (inputs_embeds (B,S',D), attention_mask (B,S'), position_ids (B,S'), vision_mask (B,S'),
    protected_mask (B,S') bool or None).
    """
    if positions not in ("compact", "keep"):
        raise ValueError(f"positions must be 'compact' or 'keep', not {positions!r}")
    cfg = model.config
    w = _weights(model)
    ids = example.input_ids
    mask = example.attention_mask
    if mask is None:
        mask = torch.ones_like(ids)
    emb = w["model.language_model.embed_tokens.weight"][ids]  # (B, S, D)
    feats = vision_out["features"].float()
    pidx = vision_out["patch_index"].long()
    n_images, v_new = pidx.shape
    valid = vision_out.get("valid")
    valid = torch.ones(n_images, v_new, dtype=torch.bool) if valid is None else valid.bool()
    assert bool((pidx[:, 1:] > pidx[:, :-1]).all()), "patch_index must be strictly ascending per image"
    img = ids == cfg.image_token_id
    b, s = ids.shape
    assert n_images % b == 0, "every sample must hold the same number of images"
    per = n_images // b
    full_pos = _positions_from_mask(mask)

    rows_emb, rows_mask, rows_pos, rows_img, rows_prot = [], [], [], [], []
    for bi in range(b):
        slots = img[bi].nonzero(as_tuple=True)[0]
        assert slots.numel() % max(per, 1) == 0
        slots = slots.view(per, -1)  # (images of this sample, V) prompt index of each patch slot
        keep = ~img[bi]
        e, m = emb[bi].clone(), mask[bi].clone()
        prot = torch.zeros(s, dtype=torch.bool)
        for j in range(per):
            i = bi * per + j
            at = slots[j][pidx[i]]  # prompt index of each kept slot
            keep[at] = True
            e[at] = feats[i]
            m[at] = m[at] * valid[i].to(m.dtype)
            if protected is not None:
                prot[at] = protected[i].bool()
        sel = keep.nonzero(as_tuple=True)[0]
        rows_emb.append(e[sel])
        rows_mask.append(m[sel])
        rows_pos.append(full_pos[bi, sel])
        rows_img.append(img[bi, sel])
        rows_prot.append(prot[sel])
    lens = {r.shape[0] for r in rows_mask}
    assert len(lens) == 1, "every sample must keep the same number of tokens"
    new_mask = torch.stack(rows_mask)
    pos = _positions_from_mask(new_mask) if positions == "compact" else torch.stack(rows_pos)
    prot_mask = torch.stack(rows_prot) if protected is not None else None
    return torch.stack(rows_emb), new_mask, pos, torch.stack(rows_img), prot_mask


@torch.no_grad()
def qwen2vl_inputs(model, example):
    """LM inputs for Qwen2-VL: (inputs_embeds, attention_mask, position_ids (3,B,S), vision_mask).

    NOTE: the vision features come from HF's visual module (``model.model.get_image_features``) and the
    M-RoPE position ids from ``model.model.get_rope_index``. This is allowed for Qwen2-VL only: there is no
    CLS-based pass to check in its vision tower, and the positions are bookkeeping, not the computation
    under test. Everything in the language model is computed by hand in ``lm_generate``.
    """
    cfg = model.config
    w = _weights(model)
    ids = example.input_ids
    emb = w["model.language_model.embed_tokens.weight"][ids].clone()
    out = model.model.get_image_features(example.pixel_values, example.image_grid_thw)
    pooled = out.pooler_output if hasattr(out, "pooler_output") else out
    feats = torch.cat(list(pooled), dim=0).float() if isinstance(pooled, (list, tuple)) else pooled.float()
    img = ids == cfg.image_token_id
    emb[img] = feats  # row-major order, as masked_scatter
    # transformers >= 5.1 takes the image-token mask; earlier versions find image tokens themselves
    mm = {"mm_token_type_ids": example.mm_token_type_ids}
    if "mm_token_type_ids" not in inspect.signature(model.model.get_rope_index).parameters:
        mm = {}
    pos, _ = model.model.get_rope_index(ids, image_grid_thw=example.image_grid_thw,
                                        attention_mask=example.attention_mask, **mm)
    return emb, example.attention_mask, pos, img


# ------------------------------------------------------------------------------------ language model

class _LM:
    """Weights and hyper-parameters of the decoder (Llama or Qwen2 with M-RoPE)."""

    def __init__(self, model):
        cfg = model.config
        tc = getattr(cfg, "text_config", cfg)
        self.w = _weights(model)
        # the decoder's prefix: a VLM body's language_model (Idefics3 / SmolVLM: text_model), or the model's own
        pre = next((p for p in ("model.language_model.", "model.text_model.") if p + "embed_tokens.weight" in self.w),
                   "model.")
        self.pre = pre
        self.n_layers = tc.num_hidden_layers
        self.n_heads = tc.num_attention_heads
        self.n_kv = tc.num_key_value_heads
        self.hd = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        if cfg.model_type in ("qwen2_vl", "qwen2_5_vl"):  # their attention uses hidden_size // num_heads
            self.hd = tc.hidden_size // tc.num_attention_heads
        self.eps = getattr(tc, "rms_norm_eps", None)
        self.act = _act(getattr(tc, "hidden_activation", None) or tc.hidden_act)      # Gemma 3: hidden_activation
        # transformers 5: rope_parameters (Gemma 3: one per layer kind); 4.x: rope_theta plus rope_scaling
        # (Qwen2-VL's mrope_section)
        rp = getattr(tc, "rope_parameters", None) or {"rope_theta": tc.rope_theta,
                                                        **(getattr(tc, "rope_scaling", None) or {})}
        rp = rp.get("full_attention", rp)
        assert rp.get("rope_type", "default") == "default", "only default RoPE is implemented"
        theta = rp["rope_theta"]
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.hd, 2, dtype=torch.float) / self.hd))
        self.mrope_section = rp.get("mrope_section") if cfg.model_type in ("qwen2_vl", "qwen2_5_vl") else None
        self.lm_head = self.w["lm_head.weight"]
        self.embed = self.w[pre + "embed_tokens.weight"]

    def cos_sin(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """pos (B,T) or (3,B,T) -> cos, sin (B,T,hd)."""
        if self.mrope_section is None:
            assert pos.dim() == 2
            freqs = pos.float()[..., None] * self.inv_freq  # (B,T,hd/2)
        else:
            if pos.dim() == 2:
                pos = pos[None].expand(3, -1, -1)
            f = pos.float()[..., None] * self.inv_freq  # (3,B,T,hd/2)
            # M-RoPE: the rotary half-dim is split into [t, h, w] sections; section i uses axis i % 3
            chunks = f.split(list(self.mrope_section), dim=-1)
            freqs = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)
        emb = self.rotary_table(freqs)
        return emb.cos(), emb.sin()

    def rotary_table(self, freqs: Tensor) -> Tensor:
        """(..., hd/2) angles -> (..., hd): Llama pairs dimension j with j + hd/2."""
        return torch.cat((freqs, freqs), dim=-1)

    def rotate(self, x: Tensor) -> Tensor:
        return _rotate_half(x)

    def rotary_at(self, i: int) -> bool:
        return True

    def norm(self, x: Tensor, key: str) -> Tensor:
        return _rms_norm(x, self.w[key], self.eps)

    def layer(self, i: int, h: Tensor, cos: Tensor, sin: Tensor, past_k: Tensor | None,
              past_v: Tensor | None, allowed: Tensor):
        """One decoder layer. h (B,T,D); past k/v (B,KV,L0,hd) or None; allowed (B,T,L0+T) bool.

        Returns (h_out, k_all, v_all, probs (B,H,T,L0+T)); k_all/v_all include the new tokens (post-RoPE).
        """
        w, lp = self.w, f"{self.pre}layers.{i}."
        b, t, d = h.shape
        r = h
        y = self.norm(h, lp + "input_layernorm.weight")
        q = _linear(y, w, lp + "self_attn.q_proj").view(b, t, self.n_heads, self.hd).transpose(1, 2)
        k = _linear(y, w, lp + "self_attn.k_proj").view(b, t, self.n_kv, self.hd).transpose(1, 2)
        v = _linear(y, w, lp + "self_attn.v_proj").view(b, t, self.n_kv, self.hd).transpose(1, 2)
        q, k = self.qk_norm(lp, q, k)
        if self.rotary_at(i):
            q, k = self.rotary(q, cos[:, None], sin[:, None]), self.rotary(k, cos[:, None], sin[:, None])
        if past_k is not None:
            k = torch.cat([past_k, k], dim=2)
            v = torch.cat([past_v, v], dim=2)
        rep = self.n_heads // self.n_kv  # GQA: query head j uses kv head j // rep
        kk = k.repeat_interleave(rep, dim=1)
        vv = v.repeat_interleave(rep, dim=1)
        o, probs = _softmax_attention(q, kk, vv, allowed, self.hd ** -0.5)
        o = _linear(o.transpose(1, 2).reshape(b, t, self.n_heads * self.hd), w, lp + "self_attn.o_proj")
        if self.parallel:               # Cohere: attention and MLP both read the one normed input
            return r + o + self.mlp(lp, y), k, v, probs
        h = r + self.attention_out(lp, o)
        return h + self.mlp(lp, self.norm(h, lp + "post_attention_layernorm.weight")), k, v, probs

    parallel = False
    window = None                       # a sliding window runs must stay under (it is not applied)

    def qk_norm(self, lp: str, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return q, k

    def rotary(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """RoPE on the first cos.shape[-1] dims of each head (all of them unless partial), the rest as is."""
        d = cos.shape[-1]
        return torch.cat([x[..., :d] * cos + self.rotate(x[..., :d]) * sin, x[..., d:]], dim=-1)

    def attention_out(self, lp: str, o: Tensor) -> Tensor:
        return o

    def mlp(self, lp: str, y: Tensor) -> Tensor:
        w = self.w
        return _linear(self.act(_linear(y, w, lp + "mlp.gate_proj")) * _linear(y, w, lp + "mlp.up_proj"),
                       w, lp + "mlp.down_proj")

    def final_norm(self, h: Tensor) -> Tensor:
        return self.norm(h, self.pre + "norm.weight")

    def logits(self, h: Tensor) -> Tensor:
        return self.final_norm(h) @ self.lm_head.t()


class _CohereLM(_LM):
    """Cohere / Cohere2 decoder (Aya Vision's LM): mean-centred LayerNorm with a weight and no bias,
    attention and MLP in parallel on one normed input, RoPE on interleaved pairs (2j, 2j+1); Cohere2
    rotates only in its sliding-window layers (its full-attention layers have no positions). The
    logits are lm_head's times the LM's logit_scale on transformers >= 5.25, lm_head's alone before
    (Aya Vision's forward applied no logit_scale up to 5.24)."""

    parallel = True

    def __init__(self, model):
        super().__init__(model)
        tc = getattr(model.config, "text_config", model.config)
        self.eps = tc.layer_norm_eps
        kinds = getattr(tc, "layer_types", None) if tc.model_type == "cohere2" else None
        self.rotary_layers = [k == "sliding_attention" for k in kinds] if kinds else [True] * self.n_layers
        window = getattr(tc, "sliding_window", None)
        assert window is None or window >= tc.max_position_embeddings, "sliding windows are not implemented"
        major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
        self.logit_scale = float(tc.logit_scale) if (major, minor) >= (5, 25) else 1.0

    def logits(self, h: Tensor) -> Tensor:
        return super().logits(h) * self.logit_scale

    def rotary_table(self, freqs: Tensor) -> Tensor:
        return freqs.repeat_interleave(2, dim=-1)

    def rotate(self, x: Tensor) -> Tensor:
        return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)

    def rotary_at(self, i: int) -> bool:
        return self.rotary_layers[i]

    def norm(self, x: Tensor, key: str) -> Tensor:
        mu = x.mean(-1, keepdim=True)
        return self.w[key] * (x - mu) * torch.rsqrt((x - mu).pow(2).mean(-1, keepdim=True) + self.eps)


class _Glm4vLM(_LM):
    """GLM-4.1V's decoder: head_dim = hidden / heads, M-RoPE on the first partial_rotary_factor of each
    head's dims, on interleaved pairs (2j, 2j+1), the sections [t, h, w] chosen before the pairs are
    doubled; RMSNorm after attention and after the MLP too (four per layer); gate and up projections
    fused in one gate_up_proj (gate first)."""

    def __init__(self, model):
        super().__init__(model)
        tc = model.config.text_config
        rp = getattr(tc, "rope_parameters", None) or {**(getattr(tc, "rope_scaling", None) or {})}
        self.hd = tc.hidden_size // tc.num_attention_heads
        rotary = int(self.hd * rp.get("partial_rotary_factor", getattr(tc, "partial_rotary_factor", 1.0)))
        self.inv_freq = 1.0 / (rp.get("rope_theta", getattr(tc, "rope_theta", None))
                               ** (torch.arange(0, rotary, 2, dtype=torch.float) / rotary))
        self.mrope_section = rp["mrope_section"]

    def rotary_table(self, freqs: Tensor) -> Tensor:
        return freqs.repeat_interleave(2, dim=-1)

    def rotate(self, x: Tensor) -> Tensor:
        return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)

    def attention_out(self, lp: str, o: Tensor) -> Tensor:
        return self.norm(o, lp + "post_self_attn_layernorm.weight")

    def mlp(self, lp: str, y: Tensor) -> Tensor:
        gate, up = _linear(y, self.w, lp + "mlp.gate_up_proj").chunk(2, dim=-1)
        return self.norm(_linear(self.act(gate) * up, self.w, lp + "mlp.down_proj"), lp + "post_mlp_layernorm.weight")


class _Qwen3VLLM(_LM):
    """Qwen3-VL's decoder: Qwen3 (RMSNorm of each query and key head before RoPE) with interleaved
    M-RoPE: rotary frequency j takes the height position when j % 3 == 1 and j < 3 * sections[1], the
    width position when j % 3 == 2 and j < 3 * sections[2], the temporal one otherwise."""

    def __init__(self, model):
        super().__init__(model)
        self.mrope_section = model.config.text_config.rope_parameters["mrope_section"]
        j = torch.arange(self.hd // 2)
        _, h, w = self.mrope_section
        self.axis = torch.where((j % 3 == 1) & (j < 3 * h), 1, torch.where((j % 3 == 2) & (j < 3 * w), 2, 0))

    def cos_sin(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        if pos.dim() == 2:
            pos = pos[None].expand(3, -1, -1)
        f = pos.float()[..., None] * self.inv_freq                               # (3, B, T, hd/2)
        freqs = torch.stack([f[a, ..., j] for j, a in enumerate(self.axis.tolist())], dim=-1)
        emb = self.rotary_table(freqs)
        return emb.cos(), emb.sin()

    def qk_norm(self, lp: str, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.norm(q, lp + "self_attn.q_norm.weight"), self.norm(k, lp + "self_attn.k_norm.weight")


class _GemmaLM(_LM):
    """Gemma (PaliGemma's LM) and Gemma 3 decoders: RMSNorm scaling by (1 + weight), token embeddings
    scaled by sqrt(hidden_size), GELU (tanh) MLP. Gemma 3 adds an RMSNorm on each head's queries and
    keys, norms after attention and around the MLP, the attention scale query_pre_attn_scalar^-0.5,
    and a RoPE base of its own (rope_local_base_freq) in its sliding-window layers. cos_sin returns
    one table per layer kind (sliding, full); a layer takes its kind's. The sliding window itself is
    not applied: lm_generate refuses runs long enough for it to bind."""

    def __init__(self, model):
        super().__init__(model)
        tc = getattr(model.config, "text_config", model.config)
        self.embed = self.embed * torch.tensor(tc.hidden_size ** 0.5)
        self.gemma3 = tc.model_type == "gemma3_text"
        kinds = getattr(tc, "layer_types", None) or ["full_attention"] * self.n_layers
        self.kind = [int(k == "full_attention") for k in kinds]
        self.inv_freqs = [self.inv_freq, self.inv_freq]
        self.window = getattr(tc, "sliding_window", None)
        if self.gemma3:
            self.scale = tc.query_pre_attn_scalar ** -0.5
            rp = getattr(tc, "rope_parameters", None)        # transformers 5: per kind; 4.x: rope_local_base_freq
            local = rp["sliding_attention"]["rope_theta"] if rp else tc.rope_local_base_freq
            self.inv_freqs[0] = 1.0 / (local ** (torch.arange(0, self.hd, 2, dtype=torch.float) / self.hd))

    scale = None

    def cos_sin(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        emb = torch.stack([self.rotary_table(pos.float()[..., None] * f) for f in self.inv_freqs])
        return emb.cos(), emb.sin()

    def norm(self, x: Tensor, key: str) -> Tensor:
        return _rms_norm(x, 1.0 + self.w[key], self.eps)

    def layer(self, i: int, h: Tensor, cos: Tensor, sin: Tensor, past_k: Tensor | None,
              past_v: Tensor | None, allowed: Tensor):
        w, lp = self.w, f"{self.pre}layers.{i}."
        b, t, _ = h.shape
        y = self.norm(h, lp + "input_layernorm.weight")
        q, k, v = (_linear(y, w, f"{lp}self_attn.{n}_proj").view(b, t, -1, self.hd).transpose(1, 2) for n in "qkv")
        if self.gemma3:
            q, k = self.norm(q, lp + "self_attn.q_norm.weight"), self.norm(k, lp + "self_attn.k_norm.weight")
        c, s = cos[self.kind[i]][:, None], sin[self.kind[i]][:, None]
        q, k = self.rotary(q, c, s), self.rotary(k, c, s)
        if past_k is not None:
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        rep = self.n_heads // self.n_kv
        o, probs = _softmax_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), allowed,
                                      self.scale or self.hd ** -0.5)
        o = _linear(o.transpose(1, 2).reshape(b, t, -1), w, lp + "self_attn.o_proj")
        if not self.gemma3:
            h = h + o
            return h + self.mlp(lp, self.norm(h, lp + "post_attention_layernorm.weight")), k, v, probs
        h = h + self.norm(o, lp + "post_attention_layernorm.weight")
        mlp = self.mlp(lp, self.norm(h, lp + "pre_feedforward_layernorm.weight"))
        return h + self.norm(mlp, lp + "post_feedforward_layernorm.weight"), k, v, probs


def language_model(model) -> _LM:
    """The reference decoder for `model`'s language model."""
    tc = getattr(model.config, "text_config", model.config)
    if tc.model_type in ("cohere", "cohere2"):
        return _CohereLM(model)
    if tc.model_type == "qwen3_vl_text":
        return _Qwen3VLLM(model)
    if tc.model_type in ("gemma", "gemma3_text"):
        return _GemmaLM(model)
    return _Glm4vLM(model) if tc.model_type == "glm4v_text" else _LM(model)


def llava_vision_layer0(model, pixel_values: Tensor) -> Tensor:
    """Layer-0 output of the LLaVA vision encoder (n, 1 + V, d)."""
    seen = {}

    def spy(h, ctx):
        seen["h"] = h
        return h

    llava_vision(model, pixel_values, after_layer={0: spy})
    return seen["h"]


def _gather_seq(x: Tensor, keep: Tensor) -> Tensor:
    """Gather along the sequence dim: x (B,S,...) -> (B,S',...)."""
    idx = keep.view(*keep.shape, *([1] * (x.dim() - 2))).expand(*keep.shape, *x.shape[2:])
    return torch.gather(x, 1, idx)


def _gather_pos(pos: Tensor, keep: Tensor) -> Tensor:
    if pos.dim() == 2:
        return torch.gather(pos, 1, keep)
    return torch.gather(pos, 2, keep[None].expand(pos.shape[0], -1, -1))


def text_after_image(vision_mask: Tensor, attention_mask: Tensor) -> Tensor:
    """(B,S) bool: the real tokens after the last vision token of each sample (the instruction)."""
    s = vision_mask.shape[1]
    ar = torch.arange(s).expand_as(vision_mask)
    last = torch.where(vision_mask.bool(), ar, torch.full_like(ar, -1)).amax(1, keepdim=True)
    return (ar > last) & attention_mask.bool() & (last >= 0)


def image_blocks(vision_mask_row: Tensor, images: int | None = None) -> Tensor:
    """Sequence indices of each image's current vision tokens in one sample: (n_images, V) long.

    An image's vision tokens are one contiguous run of ``vision_mask_row`` (images are separated by text in
    the prompt). With ``images=n`` the sample's vision tokens are instead split into n equal blocks in
    sequence order (for prompts whose images touch). Every image must have the same count V.
    """
    pos = vision_mask_row.bool().nonzero(as_tuple=True)[0]
    if images is None:
        breaks = (pos[1:] - pos[:-1] != 1).nonzero(as_tuple=True)[0] + 1
        runs = torch.tensor_split(pos, breaks.tolist())
        sizes = {r.numel() for r in runs}
        assert len(sizes) == 1, f"images of a sample have different token counts: {[r.numel() for r in runs]}"
        return torch.stack(list(runs))
    assert pos.numel() % images == 0, "vision tokens do not split evenly into the images"
    return pos.view(images, -1)


@torch.no_grad()
def lm_generate(model, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, *,
                select: Callable[[dict], Tensor] | None = None, select_layer: int | None = None,
                selects: dict | None = None, protected: Tensor | None = None,
                cut_to_final: tuple[int, int] | None = None,
                max_new_tokens: int = 16, vision_mask: Tensor | None = None, positions: str = "keep",
                deepstack: Tensor | None = None, groups: Tensor | None = None,
                text_mask: Tensor | None = None) -> dict:
    """Prefill + greedy decoding of the language model by hand, optionally pruning before some layers.

    ``selects={K: fn}`` (or ``select`` + ``select_layer``): layers ``0..K-1`` see every token; after layer
    K-1, ``fn(ctx)`` returns ``keep`` (B,S') sorted indices into the current sequence, or a dict with
    ``keep`` and optionally ``hidden`` (B,S',D) (replaces the gathered hidden states: merges) and ``valid``
    (B,S') bool (slots that are kept but masked as keys from then on: static-capacity modes). Layers ``>= K``
    run on the kept tokens only (causal in the original order, original position ids kept).

    ctx: ``attn`` (B,H,S,S) probabilities of layer K-1, ``hidden`` its output, ``keys``/``values``
    (B,KV,S,hd) its post-RoPE cache entries, ``norm`` (the model's final RMSNorm), ``vision_mask``,
    ``text_mask`` (instruction tokens after the last image: the argument ``text_mask`` (B,S) where given, for
    prompts whose vision blocks end in slots that are no vision token, such as LLaVA-NeXT's closing
    image_newline), ``attention_mask`` (key validity as 0/1),
    ``protected`` (B,S) bool, ``index`` (B,S) original prompt index, ``position_ids``, ``layer``.

    ``groups`` (B,S) int: bidirectional attention groups of the prompt (Gemma 3's image blocks,
    PaliGemma's prefix): in prefill a token of group g >= 0 also attends to every (valid) token of
    group g, later ones included; -1 (the default everywhere): causal only. Decode tokens are causal.
    ``cut_to_final=(a, b)``: after prefill, the caches of layers a..b-1 keep only the tokens that the final
    selection kept (MustDrop's output-aware cache).
    ``positions="compact"``: after each selection the kept real (and valid) tokens are renumbered 0..n-1
    (padding and invalid slots: 0), and in decoding each layer's new token takes the position = the number
    of real tokens in that layer's cache (each layer continues its own numbering; MustDrop's rule).
    ``deepstack`` (levels, B, S, D): Qwen3-VL's DeepStack features in prompt coordinates (zero at
    non-vision tokens); in prefill, level i is added to the output of layer i at every token still in
    the sequence (so after a selection, only the kept tokens' features).
    Returns prefill/step logits, greedy ``tokens``, ``keep`` (prompt indices kept after the last
    selection), ``kv_lens``, ``kv_index`` (per layer, prompt index of each cache slot) and ``kv_valid``.
    """
    lm = language_model(model)
    selects = dict(selects or {})
    if select is not None:
        selects[select_layer] = select
    if any(k >= lm.n_layers or k < 1 for k in selects):
        raise ValueError("select layers must be in 1..n_layers-1")
    h = inputs_embeds.float()
    b, s, _ = h.shape
    assert lm.window is None or s + max_new_tokens < lm.window, "a run this long reaches the sliding window"
    valid = attention_mask.bool()  # key validity (B,S)
    pos = position_ids
    vmask = vision_mask.bool() if vision_mask is not None else torch.zeros(b, s, dtype=torch.bool)
    tmask = text_after_image(vmask, attention_mask) if text_mask is None else text_mask.bool()
    prot = protected.bool() if protected is not None else torch.zeros(b, s, dtype=torch.bool)
    index = torch.arange(s).expand(b, s)
    # decode positions: max prompt position (over all axes) + 1 + step, from the unpruned prompt
    pmax = pos if pos.dim() == 2 else pos.amax(0)
    pmax = pmax.masked_fill(~valid, torch.iinfo(pmax.dtype).min).amax(-1)  # (B,)

    group = groups if groups is not None else torch.full((b, s), -1)

    def prefill_allowed(valid_keys: Tensor) -> Tensor:
        t = valid_keys.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        together = (group[:, :, None] == group[:, None, :]) & (group[:, :, None] >= 0)
        return (causal[None] | together) & valid_keys[:, None, :]

    cache_k: list[Tensor] = []
    cache_v: list[Tensor] = []
    cache_valid: list[Tensor] = []
    cache_index: list[Tensor] = []
    keep = None
    cos, sin = lm.cos_sin(pos)
    allowed = prefill_allowed(valid)
    last_probs = None
    for i in range(lm.n_layers):
        if i in selects:
            ctx = {"attn": last_probs, "hidden": h, "vision_mask": vmask, "attention_mask": valid.long(),
                   "text_mask": tmask, "protected": prot, "index": index, "norm": lm.final_norm,
                   "position_ids": pos, "layer": i, "keys": cache_k[-1], "values": cache_v[-1]}
            out = selects[i](ctx)
            out = out if isinstance(out, dict) else {"keep": out}
            k_idx = out["keep"].long()
            assert k_idx.dim() == 2 and k_idx.shape[0] == b
            assert bool((prot & ~torch.zeros_like(prot).scatter(1, k_idx, True)).sum() == 0), \
                "a selection dropped a protected token"
            h = out.get("hidden", _gather_seq(h, k_idx))
            valid = torch.gather(valid, 1, k_idx)
            if "valid" in out:
                valid = valid & out["valid"].bool()
            vmask, tmask, prot, index, group = (torch.gather(t, 1, k_idx) for t in (vmask, tmask, prot, index, group))
            pos = _gather_pos(pos, k_idx)
            if positions == "compact":
                assert pos.dim() == 2, "compact positions are 1-D"
                pos = (valid.long().cumsum(1) - 1).masked_fill(~valid, 0)
            keep = index
            cos, sin = lm.cos_sin(pos)
            allowed = prefill_allowed(valid)
        h, k, v, last_probs = lm.layer(i, h, cos, sin, None, None, allowed)
        if deepstack is not None and i < deepstack.shape[0]:
            h = h + _gather_seq(deepstack[i].float(), index)
        cache_k.append(k)
        cache_v.append(v)
        cache_valid.append(valid.clone())
        cache_index.append(index.clone())
    if cut_to_final is not None:
        for i in range(*cut_to_final):
            at = torch.searchsorted(cache_index[i].contiguous(), index.contiguous())
            cache_k[i] = cache_k[i].gather(2, at[:, None, :, None].expand(-1, cache_k[i].shape[1], -1, lm.hd))
            cache_v[i] = cache_v[i].gather(2, at[:, None, :, None].expand(-1, cache_v[i].shape[1], -1, lm.hd))
            cache_valid[i], cache_index[i] = valid.clone(), index.clone()

    prefill_logits = lm.logits(h)  # (B,S',V)
    kv_lens = [k.shape[2] for k in cache_k]
    kv_index = [c.clone() for c in cache_index]
    kv_valid = [c.clone() for c in cache_valid]

    layer_count = [c.sum(1) for c in cache_valid]  # real tokens per layer cache (compact decode positions)
    step_logits = [prefill_logits[:, -1]]
    tokens = [step_logits[0].argmax(-1)]
    for step in range(max_new_tokens - 1):
        x = lm.embed[tokens[-1]][:, None]  # (B,1,D)
        p = (pmax + 1 + step)[:, None]  # (B,1)
        if lm.mrope_section is not None:
            p = p[None].expand(3, -1, -1)
        c, sn = lm.cos_sin(p)
        for i in range(lm.n_layers):
            if positions == "compact":
                c, sn = lm.cos_sin((layer_count[i] + step)[:, None])
            cache_valid[i] = torch.cat([cache_valid[i], torch.ones(b, 1, dtype=torch.bool)], dim=1)
            x, cache_k[i], cache_v[i], _ = lm.layer(i, x, c, sn, cache_k[i], cache_v[i],
                                                    cache_valid[i][:, None, :])
        lg = lm.logits(x)[:, -1]
        step_logits.append(lg)
        tokens.append(lg.argmax(-1))
    return dict(prefill_logits=prefill_logits, keep=keep, kv_lens=kv_lens, kv_index=kv_index, kv_valid=kv_valid,
                tokens=torch.stack(tokens[:max_new_tokens], dim=1), step_logits=step_logits[:max_new_tokens])


# ----------------------------------------------------------------------------------- selection rules

def fastv_select(keep: int):
    """FastV (Chen et al. 2024): after layer K-1, rank vision tokens by the attention they receive from the
    last token (head-averaged), keep the top ``keep`` of them and every non-vision token."""

    def select(ctx: dict) -> Tensor:
        attn = ctx["attn"]  # (B,H,S,S)
        vm = ctx["vision_mask"].bool()
        scores = attn[:, :, -1, :].mean(dim=1)  # (B,S)
        scores = scores.masked_fill(~vm, float("-inf"))
        top = torch.topk(scores, keep, dim=-1).indices  # (B,keep)
        rows = []
        for bi in range(vm.shape[0]):
            nonvis = (~vm[bi]).nonzero(as_tuple=True)[0]
            rows.append(torch.cat([nonvis, top[bi]]).sort().values)
        return torch.stack(rows)

    return select


def vtw_select():
    """VTW (Lin et al. 2024): withdraw every vision token after layer K-1."""

    def select(ctx: dict) -> Tensor:
        vm = ctx["vision_mask"].bool()
        return torch.stack([(~vm[bi]).nonzero(as_tuple=True)[0] for bi in range(vm.shape[0])])

    return select


def vtw_kl(full_logits_last: Tensor, withdrawn_logits_last: Tensor) -> float:
    """KL(P_withdrawn || P_full) of the last-token distributions, mean over samples (VTW paper)."""
    lw = torch.log_softmax(withdrawn_logits_last.float(), dim=-1)
    lf = torch.log_softmax(full_logits_last.float(), dim=-1)
    return float((lw.exp() * (lw - lf)).sum(-1).mean())
