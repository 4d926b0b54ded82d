"""Capture: torch.export (non-strict) of each component into a plain fx.GraphModule.

Three stages are captured per model:
  vision   pixel_values -> projected image features (n_images, tokens, d_text)
  prefill  (inputs_embeds, position_ids, attention_mask) -> (logits, k_0, v_0, ..., k_L-1, v_L-1)
  decode   (inputs_embeds, position_ids, attention_mask, k_0, v_0, ...) -> same outputs, one token

The image-feature merge (LLaVA's masked_scatter at <image> tokens) is done by the runtime as a
scatter at the vision positions, so the prefill graph takes embeddings and stays free of the
data-dependent checks (`.item()`, `_is_all_true`) that break capture of the full model.
Batch and sequence (and past length) are exported as dynamic dimensions, so one capture serves
every prompt length and batch size.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.export import Dim

from graphprune.compat import traceable_masks
from graphprune.families import Family, family_of

STAGES = ("vision", "prefill", "decode")


@dataclass
class Stage:
    """One captured graph. `gm` is None for a stage run eagerly (`eager` says why)."""
    name: str
    gm: fx.GraphModule | None
    inputs: list[str] = field(default_factory=list)
    eager: str = ""
    module: nn.Module | None = None     # the eager fallback

    def copy(self) -> "Stage":
        gm = None
        if self.gm is not None:
            gm = fx.GraphModule(self.gm, copy.deepcopy(self.gm.graph))
            gm.meta.update(copy.deepcopy(self.gm.meta))
        return Stage(self.name, gm, list(self.inputs), self.eager, self.module)


class _Prefill(nn.Module):
    def __init__(self, lm, head):
        super().__init__()
        self.lm, self.head = lm, head

    def forward(self, inputs_embeds, position_ids, attention_mask):
        from transformers.cache_utils import DynamicCache
        cache = DynamicCache()
        out = self.lm(inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=attention_mask,
                      past_key_values=cache, use_cache=True)
        return (self.head(out.last_hidden_state), *_flat_kv(cache))


class _Decode(nn.Module):
    def __init__(self, lm, head):
        super().__init__()
        self.lm, self.head = lm, head

    def forward(self, inputs_embeds, position_ids, attention_mask, *past):
        from transformers.cache_utils import DynamicCache
        cache = DynamicCache()
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.lm(inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=attention_mask,
                      past_key_values=cache, use_cache=True)
        return (self.head(out.last_hidden_state), *_flat_kv(cache))


def _flat_kv(cache):
    kv = []
    for layer in cache.layers:
        kv += [layer.keys, layer.values]
    return kv


def plain_graph_module(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """ep.module() without pytree codegen and input guards, so graphs can gain inputs/outputs."""
    gm = ep.module()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    graph._codegen = fx.graph.CodeGen()
    out = fx.GraphModule(gm, graph)
    # drop what the wrapper does not return (e.g. vision layers after the feature layer)
    out.graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
    out.recompile()
    return out


def _kv_names(family: Family) -> list[str]:
    return [f"{kv}_{i}" for i in range(_example_sizes(family)[3]) for kv in ("k", "v")]


def _example_sizes(family: Family):
    tc = family.text_config()
    heads = tc.num_attention_heads
    kv_heads = getattr(tc, "num_key_value_heads", None) or heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    return tc.hidden_size, kv_heads, head_dim, tc.num_hidden_layers


def _positions_example(family: Family, b: int, s: int, device, offset: int = 0):
    pos = torch.arange(offset, offset + s, device=device).expand(b, s)
    if family.position_axes > 1:
        pos = pos[None].expand(family.position_axes, b, s)
    return pos.contiguous()


def capture_prefill(family: Family, *, device=None, dtype=None) -> Stage:
    hidden, _, _, _ = _example_sizes(family)
    lm = family.language_model()
    device = device or next(lm.parameters()).device
    dtype = dtype or next(lm.parameters()).dtype
    b, s = 2, 23     # odd sizes so no static dim is mistaken for batch or sequence
    args = (torch.zeros(b, s, hidden, device=device, dtype=dtype), _positions_example(family, b, s, device),
            torch.ones(b, s, dtype=torch.long, device=device))
    batch, seq = Dim("batch", min=1), Dim("seq", min=2)
    pos_shape = {1: batch, 2: seq} if family.position_axes > 1 else {0: batch, 1: seq}
    with torch.no_grad(), traceable_masks():
        ep = torch.export.export(_Prefill(lm, family.lm_head()), args, strict=False,
                                 dynamic_shapes=({0: batch, 1: seq}, pos_shape, {0: batch, 1: seq}))
    gm = plain_graph_module(ep)
    gm.meta["graphprune_outputs"] = ["logits"] + _kv_names(family)
    return Stage("prefill", gm, ["inputs_embeds", "position_ids", "attention_mask"])


def capture_decode(family: Family, *, device=None, dtype=None) -> Stage:
    hidden, kv_heads, head_dim, layers = _example_sizes(family)
    lm = family.language_model()
    device = device or next(lm.parameters()).device
    dtype = dtype or next(lm.parameters()).dtype
    b, p = 2, 19
    past = []
    for _ in range(2 * layers):
        past.append(torch.zeros(b, kv_heads, p, head_dim, device=device, dtype=dtype))
    args = (torch.zeros(b, 1, hidden, device=device, dtype=dtype), _positions_example(family, b, 1, device, p),
            torch.ones(b, p + 1, dtype=torch.long, device=device), *past)
    # Dim.AUTO: the cache-length guards HF emits (min(...) over strides) trip a named Dim.
    auto = Dim.AUTO
    pos_shape = {1: auto} if family.position_axes > 1 else {0: auto}
    dyn = ({0: auto}, pos_shape, {0: auto, 1: auto}, tuple([{0: auto, 2: auto}] * len(past)))
    with torch.no_grad(), traceable_masks():
        ep = torch.export.export(_Decode(lm, family.lm_head()), args, strict=False, dynamic_shapes=dyn)
    names = ["inputs_embeds", "position_ids", "attention_mask"]
    names += [f"past_{kv}_{i}" for i in range(layers) for kv in ("k", "v")]
    gm = plain_graph_module(ep)
    gm.meta["graphprune_outputs"] = ["logits"] + _kv_names(family)
    return Stage("decode", gm, names)


def capture_vision(family: Family, *, device=None, dtype=None) -> Stage:
    module = family.vision_module()
    if module is None:
        return Stage("vision", None, ["pixel_values"], eager="data-dependent patch grid (grid_thw): "
                     "the vision encoder runs eagerly and vision-stage passes are not available")
    vc = family.model.config.vision_config
    p = next(module.parameters())
    device, dtype = device or p.device, dtype or p.dtype
    px = torch.zeros(2, vc.num_channels, vc.image_size, vc.image_size, device=device, dtype=dtype)
    with torch.no_grad():
        ep = torch.export.export(module, (px,), strict=False, dynamic_shapes=({0: Dim("images", min=1)},))
    gm = plain_graph_module(ep)
    gm.meta["graphprune_outputs"] = ["features"]
    return Stage("vision", gm, ["pixel_values"])


def capture(model: nn.Module, stages=STAGES) -> dict[str, Stage]:
    """Capture the named stages of a Hugging Face VLM."""
    family = family_of(model)
    fns = {"vision": capture_vision, "prefill": capture_prefill, "decode": capture_decode}
    return {name: fns[name](family) for name in stages}
