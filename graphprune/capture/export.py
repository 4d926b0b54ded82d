"""Capture: torch.export (non-strict) of each component into a plain fx.GraphModule.

Three stages are captured per model:
  vision   pixel_values -> projected image features (n_images, tokens, d_text)
  prefill  (inputs_embeds, position_ids, attention_mask) -> (logits, k_0, v_0, ..., k_L-1, v_L-1)
           (+ attention_groups, for a family whose LM attends bidirectionally within token groups)
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

from graphprune.compat import cache_holding, traceable_masks
from graphprune.errors import UnsupportedModelError
from graphprune.families import Family, family_of

STAGES = ("vision", "prefill", "decode")


@dataclass
class Stage:
    """One captured graph. `gm` is None for a stage run eagerly (`eager` says why)."""
    name: str
    gm: fx.GraphModule | None
    inputs: list[str] = field(default_factory=list)
    eager: str = ""
    module: nn.Module | None = None     # the eager module the graph was captured from (or runs instead)
    check_inputs: tuple | None = None   # a seeded example to compare graph and module on (graphprune.verify)

    def copy(self) -> "Stage":
        gm = None
        if self.gm is not None:
            gm = fx.GraphModule(self.gm, copy.deepcopy(self.gm.graph))
            gm.meta.update(copy.deepcopy(self.gm.meta))
        return Stage(self.name, gm, list(self.inputs), self.eager, self.module, self.check_inputs)


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


class _GroupedPrefill(_Prefill):
    """The prefill of a family with bidirectional attention groups (Family.attention_groups_input):
    it builds the LM's mask from them, in the graph, so a pass reroutes it like any sequence tensor.
    An LM with sliding-window layers takes it per layer kind; runs stay inside the window
    (Family.check_run_length), where the window never binds."""

    def forward(self, inputs_embeds, position_ids, attention_mask, attention_groups):
        mask = grouped_mask(attention_mask, attention_groups)
        if getattr(self.lm.config, "sliding_window", None) is not None:
            mask = {"full_attention": mask, "sliding_attention": mask}
        return super().forward(inputs_embeds, position_ids, mask)


def grouped_mask(attention_mask: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) bool: query i attends to key j when j <= i or both are in one group (>= 0), and
    key j is not padding: Hugging Face's causal mask OR its blockwise overlay, AND the padding mask."""
    index = torch.arange(groups.shape[1], device=groups.device)
    causal = index[None, :] <= index[:, None]
    same = (groups[:, :, None] == groups[:, None, :]) & (groups[:, :, None] >= 0)
    return ((causal | same) & attention_mask.bool()[:, None, :])[:, None]


class _Decode(nn.Module):
    def __init__(self, lm, head):
        super().__init__()
        self.lm, self.head = lm, head

    def forward(self, inputs_embeds, position_ids, attention_mask, *past):
        cache = cache_holding(past)
        out = self.lm(inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=attention_mask,
                      past_key_values=cache, use_cache=True)
        return (self.head(out.last_hidden_state), *_flat_kv(cache))


class _DeepstackPrefill(_Prefill):
    """The prefill of a language model that adds vision features to the outputs of its first layers
    (Qwen3-VL's DeepStack), taking them dense: deepstack_embeds (levels, B, S, D), zero at non-vision
    tokens. Each add is then a dense add of a sequence-dim input, which a pruned sequence gathers like
    any token value, instead of the model's boolean-indexed write at a vision mask."""

    def __init__(self, lm, head, layers: list[nn.Module]):
        super().__init__(lm, head)
        self.deepstack_layers = layers

    def forward(self, inputs_embeds, position_ids, attention_mask, deepstack_embeds):
        hooks = [layer.register_forward_hook(lambda mod, args, out, level=level: out + deepstack_embeds[level])
                 for level, layer in enumerate(self.deepstack_layers)]
        try:
            return super().forward(inputs_embeds, position_ids, attention_mask)
        finally:
            for hook in hooks:
                hook.remove()


class _MaskedDeepstackPrefill(_Prefill):
    """The same through the model's own DeepStack path (visual_pos_masks and the features of the
    vision tokens), the eager module the captured prefill is checked against."""

    def forward(self, inputs_embeds, position_ids, attention_mask, deepstack_embeds):
        from transformers.cache_utils import DynamicCache
        cache = DynamicCache()
        at = deepstack_embeds.ne(0).any(-1).any(0)
        out = self.lm(inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=attention_mask,
                      past_key_values=cache, use_cache=True, visual_pos_masks=at,
                      deepstack_visual_embeds=[level[at] for level in deepstack_embeds])
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
    # drop what the wrapper does not return (e.g. vision layers after the feature layer), but never
    # an in-place write: its result is unused, its effect (e.g. M-RoPE sections copied into a view
    # of the rotary table) is what later nodes read
    out.graph.eliminate_dead_code(is_impure_node=_must_stay)
    out.recompile()
    _release_export_caches(ep)
    return out


# ShapeEnv records that serve the export itself (its dispatch cache, the fake inputs it tracks to
# produce guards, the guards it produced): cleared once the export has returned
_EXPORT_ONLY = ("fake_tensor_cache", "tracked_fakes", "guards", "var_to_sources", "source_to_var", "var_to_range_sloc",
                "replacements_slocs", "symbol_guard_counter")


def _release_export_caches(ep: torch.export.ExportedProgram) -> None:
    """Drop what torch keeps from an export once it has returned. Its ShapeEnv outlives the export
    (torch holds it from C++: a symbolic storage size of a fake input, torch 2.13), and with it
    what served the export only (_EXPORT_ONLY: the fake-tensor dispatch cache, the tracked fake
    inputs, the guards and their sources, the constraint solver): per captured-and-dropped tiny
    model 2.2 MiB with them all, 0.22 MiB with the cache dropped, 0.05 MiB with all of them (the
    symbols' ranges and replacements stay: anatomy reads the graphs' symbolic sizes). The env is
    the export's own, so no other export or compiled model loses anything. proxy_tensor's
    id -> node map of the last export goes too: torch reads it only inside an export (its
    fake-tensor leak check) and clears it when the next one starts."""
    from torch.fx.experimental import proxy_tensor
    for node in ep.graph.nodes:
        env = getattr(getattr(node.meta.get("val"), "fake_mode", None), "shape_env", None)
        if env is None:
            continue
        for name in _EXPORT_ONLY:
            records = getattr(env, name, None)
            if isinstance(records, (dict, list)):
                records.clear()
        env.dim_constraints = None      # export's suggested-fix solver state, rebuilt by the next export
        break
    leak_map = getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", None)
    if isinstance(leak_map, dict):
        leak_map.clear()


def _must_stay(node: fx.Node) -> bool:
    if node.op in ("placeholder", "output"):
        return True
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable


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


def _check_generator() -> torch.Generator:
    return torch.Generator().manual_seed(20240)


def _left_padded_mask(b: int, s: int, pad: int, device) -> torch.Tensor:
    mask = torch.ones(b, s, dtype=torch.long, device=device)
    mask[-1, :pad] = 0                      # the last sample is left-padded
    return mask


def _check_positions(family: Family, mask: torch.Tensor, s: int) -> torch.Tensor:
    """Position ids for the last s tokens of a left-padded mask; M-RoPE axes made to differ (as
    image tokens make them) so a graph that mixes up the axes' sections is caught."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -s:]
    if family.position_axes == 1:
        return pos
    return torch.stack([pos, pos // 2, pos % 5] + [pos] * (family.position_axes - 3)).contiguous()


def _random_embeds(family: Family, b: int, s: int, device) -> torch.Tensor:
    ids = torch.randint(0, family.text_config().vocab_size, (b, s), generator=_check_generator()).to(device)
    with torch.no_grad():
        return family.embed(ids)


def capture_prefill(family: Family, *, device=None, dtype=None) -> Stage:
    hidden, _, _, _ = _example_sizes(family)
    lm = family.language_model()
    device = device or next(lm.parameters()).device
    dtype = dtype or next(lm.parameters()).dtype
    b, s = 2, 23     # odd sizes so no static dim is mistaken for batch or sequence
    grouped = family.attention_groups_input
    args = (torch.zeros(b, s, hidden, device=device, dtype=dtype), _positions_example(family, b, s, device),
            torch.ones(b, s, dtype=torch.long, device=device))
    batch, seq = Dim("batch", min=1), Dim("seq", min=2)
    pos_shape = {1: batch, 2: seq} if family.position_axes > 1 else {0: batch, 1: seq}
    dynamic = ({0: batch, 1: seq}, pos_shape, {0: batch, 1: seq})
    names, module, eager = ["inputs_embeds", "position_ids", "attention_mask"], _Prefill(lm, family.lm_head()), None
    deepstack = family.deepstack_layers()
    if deepstack and grouped:
        raise UnsupportedModelError(family.model_class, "prefill capture", "deepstack features and bidirectional "
                                    "attention groups together are not supported")
    if deepstack:
        args += (torch.zeros(len(deepstack), b, s, hidden, device=device, dtype=dtype),)
        dynamic += ({1: batch, 2: seq},)
        names.append("deepstack_embeds")
        module = _DeepstackPrefill(lm, family.lm_head(), deepstack)
        eager = _MaskedDeepstackPrefill(lm, family.lm_head())
    if grouped:
        args, dynamic = args + (torch.full((b, s), -1, device=device),), dynamic + ({0: batch, 1: seq},)
        names.append("attention_groups")
        module = _GroupedPrefill(lm, family.lm_head())
    with torch.no_grad(), traceable_masks():
        ep = torch.export.export(module, args, strict=False, dynamic_shapes=dynamic)
    gm = plain_graph_module(ep)
    gm.meta["graphprune_outputs"] = ["logits"] + _kv_names(family)
    check = None
    if device.type != "meta":
        mask = _left_padded_mask(b, 11, 3, device)
        check = (_random_embeds(family, b, 11, device), _check_positions(family, mask, 11), mask)
        if deepstack:       # features at a few tokens of each sample, as vision tokens carry them
            g = _check_generator()
            at = torch.rand(b, 11, generator=g) < 0.4
            feats = torch.randn(len(deepstack), b, 11, hidden, generator=g) * at[..., None]
            check += (feats.to(device, dtype),)
        if grouped:                         # a block of 4 tokens in each sample, after sample 1's padding
            check += (torch.tensor([[-1] * 4 + [0] * 4 + [-1] * 3, [-1] * 5 + [0] * 4 + [1] * 2], device=device),)
    return Stage("prefill", gm, names, module=eager or module, check_inputs=check)


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
    check = None
    if device.type != "meta":
        g, p = _check_generator(), 7
        mask = _left_padded_mask(b, p + 1, 2, device)
        kv = [torch.randn(t.shape[0], t.shape[1], p, t.shape[3], generator=g).to(device, dtype) for t in past]
        check = (_random_embeds(family, b, 1, device), _check_positions(family, mask, 1), mask, *kv)
    return Stage("decode", gm, names, module=_Decode(lm, family.lm_head()), check_inputs=check)


def capture_vision(family: Family, *, device=None, dtype=None, through_last: bool = False, bucket=None) -> Stage:
    """through_last: keep the encoder's layers past the feature layer (returned as `vision_last_hidden`).
    bucket: the shape bucket of a family whose vision stage is captured per bucket (Family.vision_buckets);
    without one such a family's vision stage runs eagerly until a vision pass asks for a bucket."""
    if family.vision_buckets and bucket is None:
        return Stage("vision", None, ["pixel_values"], eager=f"{family.eager_vision}: the vision encoder is "
                     "captured per shape bucket when a vision-stage pass runs, else it runs eagerly")
    module = family.vision_module(through_last=through_last, **({"bucket": bucket} if bucket is not None else {}))
    if module is None:
        return Stage("vision", None, ["pixel_values"], eager=f"{family.eager_vision}: the vision encoder runs "
                     "eagerly (the model's own get_image_features) and vision-stage passes are not available")
    p = next(module.parameters())
    device, dtype = device or p.device, dtype or p.dtype
    if bucket is None:
        vc = family.model.config.vision_config
        px = torch.zeros(2, vc.num_channels, vc.image_size, vc.image_size, device=device, dtype=dtype)
    else:
        px = family.vision_example(bucket, 2).to(device, dtype)
    with torch.no_grad():
        ep = torch.export.export(module, (px,), strict=False, dynamic_shapes=({0: Dim("images", min=1)},))
    gm = plain_graph_module(ep)
    # a bucketed encoder may return more than the features (Qwen3-VL's deepstack_features): it names them
    names = list(getattr(module, "output_names", ["features"]))
    gm.meta["graphprune_outputs"] = names + (["vision_last_hidden"] if through_last else [])
    mark_per_token_outputs(gm, names, getattr(module, "per_token_outputs", ()))
    if hasattr(module, "grid"):     # the token grid the features come in (the encoder's patches are grouped)
        gm.meta["graphprune_token_grid"] = tuple(module.grid)
    if hasattr(module, "token_patches"):    # tokens gathered from (several crops') patches: anyres, pooled grids
        gm.meta["graphprune_crops"] = module.crops
        # LLaVA-NeXT-Video: a pooled token's patches are averaged before the projector, so the mean of their
        # hidden states is what the projector maps (OneVision pools after it, Gemma 3 after a post-layernorm)
        gm.meta["graphprune_pooled_hidden"] = bool(getattr(module, "pool_before_projector", False))
        # a token of several patches is their mean (a pooling), not a merger's map of the group (Qwen's videos)
        gm.meta["graphprune_pooled_tokens"] = bool(getattr(module, "pooled_tokens", False))
    check = None
    if device.type != "meta":
        check = (torch.randn(3, *px.shape[1:], generator=_check_generator()).to(device, dtype),)
    eager = family.vision_eager_module(bucket)
    return Stage("vision", gm, ["pixel_values"], module=eager or module, check_inputs=check)


def mark_per_token_outputs(gm: fx.GraphModule, names: list[str], per_token) -> None:
    """Mark the outputs named in per_token (one row per feature token, as Qwen3-VL's DeepStack rows: the module's
    `per_token_outputs`) and, for a stack of them, the values stacked: a selection takes such a value by its kept
    tokens, not by their encoder patches, and reduces it wherever it was computed (apply._reroute)."""
    out = gm.graph.find_nodes(op="output")[0].args[0]
    for name in per_token:
        node = out[names.index(name)]
        stacked = node.args[0] if node.target == torch.ops.aten.stack.default else []
        for value in [node, *stacked]:
            value.meta["graphprune_per_token"] = True


class _VisionBucket(nn.Module):
    """Images of one size (or videos of one shape) -> their features, the family's own
    get_image_features (anyres crops, packing, unpadding, image_newline; the image size baked in as
    Python ints, so the crop count, grid and unpadding are constants of the graph) or
    get_video_features."""

    def __init__(self, family: Family, image_size: tuple[int, int] | None):
        super().__init__()
        self.family, self.body = family, family.body()
        self.image_size = None if image_size is None else [int(image_size[0]), int(image_size[1])]

    def forward(self, pixels):
        if self.image_size is None:
            return self.family.vision_feature_rows(pixel_values_videos=pixels)
        return self.family.vision_feature_rows(pixel_values=pixels, image_sizes=[list(self.image_size)] * pixels.shape[0])


def capture_vision_bucket(family: Family, pixels: torch.Tensor, image_size=None) -> Stage:
    """The vision stage of a family whose crop count and packing depend on the image size
    (LLaVA-NeXT / OneVision anyres), captured for one shape bucket: images of `image_size` (H, W),
    `pixels` the pixel_values (images, crops, C, H, W), every size static; image_size None: videos,
    `pixels` the pixel_values_videos (videos, frames, C, H, W). Outputs `features` (rows, D): the
    rows the placeholders take, image_newline rows included. check_inputs: other pixels of the same
    shape (graphprune.verify.eager)."""
    module = _VisionBucket(family, image_size)
    with torch.no_grad():
        ep = torch.export.export(module, (pixels,), strict=False)
    gm = plain_graph_module(ep)
    gm.meta["graphprune_outputs"] = ["features"]
    check = (torch.randn(*pixels.shape, generator=_check_generator()).to(pixels),)
    return Stage("vision", gm, ["pixel_values" if image_size is not None else "pixel_values_videos"], module=module,
                 check_inputs=check)


def capture(model: nn.Module, stages=STAGES) -> dict[str, Stage]:
    """Capture the named stages of a Hugging Face VLM."""
    family = family_of(model)
    fns = {"vision": capture_vision, "prefill": capture_prefill, "decode": capture_decode}
    return {name: fns[name](family) for name in stages}
