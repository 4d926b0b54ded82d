"""Anatomy: the annotations on a captured graph that passes rely on.

Everything here is read off the graph itself: layer membership from each node's
`nn_module_stack`, attention from `aten.scaled_dot_product_attention` nodes, sequence and
batch dimensions from the symbolic shapes of the dynamic export. Nothing looks at the
model's Python classes, so a new architecture that exports to the same shape of graph
needs no change here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import fx

from graphprune import tokenops
from graphprune.errors import UnsupportedModelError

SDPA = torch.ops.aten.scaled_dot_product_attention.default
_LAYER = re.compile(r"(?:^|\.)(?:layers|blocks)\.(\d+)$")


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def layer_of(node: fx.Node) -> int | None:
    """Index of the decoder/encoder layer a node belongs to (None: prologue, epilogue, inserted)."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        m = _LAYER.search(path)
        if m:
            return int(m.group(1))
    return None


@dataclass
class Attention:
    """One layer's attention: the SDPA node and its post-RoPE operands."""
    layer: int
    node: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: fx.Node | None
    scale: float | None
    is_causal: bool
    enable_gqa: bool

    @classmethod
    def of(cls, layer: int, node: fx.Node) -> "Attention":
        a = list(node.args) + [None] * (7 - len(node.args))
        kw = node.kwargs
        return cls(layer, node, a[0], a[1], a[2], kw.get("attn_mask", a[3]), kw.get("scale", a[6]),
                   bool(kw.get("is_causal", a[5] or False)), bool(kw.get("enable_gqa", False)))


def sdpa_mask(sdpa: fx.Node):
    """The mask an SDPA node reads now (after rerouting), not the one it was captured with."""
    return sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs.get("attn_mask")


def captured_mask(mask) -> fx.Node | None:
    """The captured mask node `mask` takes kept tokens of (itself, through tokenops.take_tokens), or
    None when a pass built it (key masks, biases) or there is none."""
    while isinstance(mask, fx.Node) and mask.op == "call_function" and mask.target is tokenops.take_tokens:
        mask = mask.args[0]
    if isinstance(mask, fx.Node) and mask.op == "call_function" and isinstance(mask.target, torch._ops.OpOverload):
        return mask
    return None


def attends_causally(sdpa: fx.Node) -> bool:
    """Whether an SDPA node's attention is causal: is_causal=True, or, in a prefill (a graph with an
    `attention_mask` input) without bidirectional attention groups (no `attention_groups` input, as
    Gemma 3's and PaliGemma's have), a mask that is the captured causal-and-padding mask or kept
    tokens of it (passes keep tokens in prompt order). A mask a pass built (static-capacity key
    masks) or a vision encoder's attention is not."""
    att = Attention.of(layer_of(sdpa), sdpa)
    if att.is_causal:
        return True
    inputs = {n.name for n in sdpa.graph.find_nodes(op="placeholder")}
    return ("attention_mask" in inputs and "attention_groups" not in inputs
            and captured_mask(sdpa_mask(sdpa)) is not None)


@dataclass
class Layer:
    index: int
    nodes: list[fx.Node]
    attention: Attention
    kv_write: tuple[fx.Node, fx.Node] | None = None     # (keys, values) stored in the cache
    output: fx.Node | None = None                       # residual stream leaving the layer

    @property
    def first(self) -> fx.Node:
        return self.nodes[0]


@dataclass
class Anatomy:
    """What a stage's graph is made of. Built by `read_anatomy`, extended by passes via the API."""
    stage: str
    model_class: str
    layers: list[Layer]
    inputs: dict[str, fx.Node]
    outputs: list[fx.Node]
    batch: object = None                 # sympy symbol of the batch dimension
    seq: object = None                   # sympy symbol of the token dimension
    grid: tuple[int, int] | None = None  # patch grid (H, W) of the vision encoder, in LLM tokens
    patches_per_token: int = 1           # vision: encoder patches merged into each feature token (Qwen's 2x2: 4)
    crops: int = 1                       # vision: encoder sequences per image (LLaVA-NeXT's anyres crops)
    token_patches: fx.Node | None = None  # vision, crops: the (tokens, patches_per_token) crop patches (crop x
                                          # patches + patch) of each feature token, the gather the graph makes
                                          # (None: patches in order)
    has_cls: bool | None = None
    pooled_hidden: bool = False          # vision, crops: a token of several patches enters the projector as the
                                         # mean of their hidden states (LLaVA-NeXT-Video), so that is its hidden state
    pooled_tokens: bool = False          # vision, crops: a token of several patches is their mean, pooled after the
                                         # encoder (video frames, Gemma 3's projector), not a merger's map of them
    features: fx.Node | None = None      # vision: per-patch features entering the projector
    captured_features: fx.Node | None = None  # vision: the same as captured, before any pass reduced them
    post_layers: list = field(default_factory=list)     # vision: layers past the feature layer, captured only
                                                        # when a pass reads them (they feed no features)
    attention_kind: str = "sdpa"
    token_dims: dict = field(default_factory=dict)      # node name -> (batch dim, token dims)
    tokens: list = field(default_factory=list)          # TokenState per layer boundary (rewrite.py)
    selections: list = field(default_factory=list)      # what passes selected, in order
    crop_rows: object = None             # vision, crops: the rows each crop runs once merges inside the encoder
                                         # drop slots (rewrite.crop_rows.CropRows)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer(self, i: int) -> Layer:
        if 0 <= i - len(self.layers) < len(self.post_layers):
            return self.post_layers[i - len(self.layers)]
        if not 0 <= i < len(self.layers):
            raise IndexError(f"layer {i} out of range: the {self.stage} graph has layers 0..{len(self.layers) - 1}")
        return self.layers[i]

    def summary(self) -> dict:
        out = {"stage": self.stage, "layers": self.num_layers, "attention": self.attention_kind}
        if self.stage == "vision":
            out.update(grid=list(self.grid) if self.grid else None, cls=self.has_cls,
                       tokens=self.grid[0] * self.grid[1] if self.grid else None)
        else:
            out.update(kv_cache="per-layer (k, v) outputs" if all(l.kv_write for l in self.layers) else "none")
        return out


def _expr(d):
    return d.node.expr if isinstance(d, torch.SymInt) else None


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def read_anatomy(gm: fx.GraphModule, stage: str, model_class: str = "?") -> Anatomy:
    graph = gm.graph
    inputs = {n.name: n for n in graph.find_nodes(op="placeholder")}
    outputs = list(graph.find_nodes(op="output")[0].args[0])
    by_layer: dict[int, list[fx.Node]] = {}
    for n in graph.nodes:
        i = layer_of(n)
        if i is not None:
            by_layer.setdefault(i, []).append(n)
    layers = []
    for i in sorted(by_layer):
        sdpa = [n for n in by_layer[i] if n.target == SDPA]
        if len(sdpa) != 1:
            raise UnsupportedModelError(model_class, f"attention of {stage} layer {i}",
                                        f"expected one scaled_dot_product_attention node, found {len(sdpa)}; "
                                        "load the model with attn_implementation='sdpa'")
        layers.append(Layer(i, by_layer[i], Attention.of(i, sdpa[0]), output=_layer_output(by_layer[i])))
    if not layers:
        raise UnsupportedModelError(model_class, f"{stage} layers",
                                    "no node carries an nn_module_stack path ending in layers.<i>; "
                                    "load the model with attn_implementation='sdpa'")
    if [l.index for l in layers] != list(range(len(layers))):
        raise UnsupportedModelError(model_class, f"contiguous {stage} layer indices")
    anat = Anatomy(stage, model_class, layers, inputs, outputs)
    if stage in ("prefill", "decode"):
        _read_lm(anat, model_class)
    else:
        _read_vision(anat, gm, model_class)
    return anat


def _layer_output(nodes: list[fx.Node]) -> fx.Node | None:
    inside = set(nodes)
    leaving = [n for n in nodes if any(u not in inside and u.op != "output" for u in n.users)]
    return leaving[-1] if leaving else None


def _read_lm(anat: Anatomy, model_class: str) -> None:
    emb = _val(anat.inputs.get("inputs_embeds"))
    if emb is None:
        raise UnsupportedModelError(model_class, "inputs_embeds input of the language model")
    anat.batch, anat.seq = _expr(emb.shape[0]), _expr(emb.shape[1])
    kv = anat.outputs[1:]
    if len(kv) != 2 * len(anat.layers):
        raise UnsupportedModelError(model_class, "KV-cache writes",
                                    f"expected {2 * len(anat.layers)} cache outputs, found {len(kv)}")
    for layer in anat.layers:
        layer.kv_write = (kv[2 * layer.index], kv[2 * layer.index + 1])


def _read_vision(anat: Anatomy, gm: fx.GraphModule, model_class: str) -> None:
    # a graph captured for one shape bucket states its token grid; a fixed encoder's is its conv's output
    anat.grid = gm.meta.get("graphprune_token_grid")
    conv = [n for n in gm.graph.nodes if n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default)]
    if anat.grid is None and not conv:
        raise UnsupportedModelError(model_class, "patch embedding (conv2d) of the vision encoder")
    if anat.grid is None:
        shape = _val(conv[0]).shape
        anat.grid = (int(shape[-2]), int(shape[-1]))
    params = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    anat.has_cls = any(p.endswith("class_embedding") for p in params)
    anat.batch = _expr(_val(anat.inputs["pixel_values"]).shape[0])
    # the features entering the projector: the one value flowing into projector nodes from outside
    proj = [n for n in gm.graph.nodes if "projector" in module_path(n)]
    ins = {a for n in proj for a in n.all_input_nodes if "projector" not in module_path(a) and a.op != "get_attr"}
    if len(ins) != 1:
        raise UnsupportedModelError(model_class, "projector input (per-patch vision features)")
    anat.features = anat.captured_features = ins.pop()
    anat.token_dims[anat.features.name] = (0, (1,))
    # layers past the feature layer (kept in the graph only when a pass reads one) are not layers of the
    # feature encoder: selections and `layer=-1` count the layers that feed the features
    feeding = _ancestors(anat.features)
    anat.post_layers = [l for l in anat.layers if l.attention.node not in feeding]
    anat.layers = [l for l in anat.layers if l.attention.node in feeding]
    tokens = int(_val(anat.features).shape[1])
    if tokens != anat.grid[0] * anat.grid[1]:
        raise UnsupportedModelError(model_class, "patch grid matching the feature tokens",
                                    f"grid {anat.grid} vs {tokens} feature tokens")
    # the encoder's sequence: CLS, then each feature token's patches in a row
    encoder = int(_val(anat.layers[0].attention.q).shape[2]) - int(anat.has_cls)
    anat.crops = int(gm.meta.get("graphprune_crops", 1))
    if "graphprune_crops" in gm.meta:     # anyres: each image is `crops` encoder sequences, its tokens a gather
        found = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "token_patches"]
        if len(found) != 1:
            raise UnsupportedModelError(model_class, "the anyres token gather (token_patches)")
        anat.token_patches = found[0]
        anat.patches_per_token = int(_val(found[0]).shape[1])
        anat.pooled_hidden = bool(gm.meta.get("graphprune_pooled_hidden", False))
        anat.pooled_tokens = bool(gm.meta.get("graphprune_pooled_tokens", False)) and anat.patches_per_token > 1
        return
    if encoder % tokens:
        raise UnsupportedModelError(model_class, "feature tokens made of whole groups of encoder patches",
                                    f"{encoder} encoder patches for {tokens} feature tokens")
    anat.patches_per_token = encoder // tokens


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def seq_dims(node: fx.Node, anat: Anatomy) -> tuple[int | None, tuple[int, ...]]:
    """(batch dim, token dims) of a captured value, read from its symbolic shape."""
    if node.name in anat.token_dims:
        return anat.token_dims[node.name]
    v = _val(node)
    if not isinstance(v, torch.Tensor):
        return None, ()
    if anat.stage == "vision" and anat.grid is not None:
        # the encoder is exported with a static token count: (images, tokens[, ...]), CLS included or not
        patches, cls = anat.grid[0] * anat.grid[1], int(bool(anat.has_cls))
        # inside an encoder whose patches merge in groups (Qwen's 2x2) its sequence is longer than the grid
        ok = v.dim() >= 2 and int(v.shape[1]) in (patches, patches + cls, patches * anat.patches_per_token + cls)
        return (0, (1,)) if ok else (0, ())
    exprs = [_expr(d) for d in v.shape]
    toks = tuple(i for i, e in enumerate(exprs) if e is not None and e == anat.seq)
    batch = next((i for i, e in enumerate(exprs) if e is not None and e == anat.batch), None)
    return batch, toks


def attention_windows(anat: Anatomy, first: int) -> tuple | None:
    """Vision encoder whose tokens are groups of patches (Qwen): each token's attention window in the encoder
    layers first.. (raster order of the token grid; a key per token, the same for two tokens exactly when they
    attend together in every one of those layers), read off the captured window masks (constant buffers the
    masks of those layers derive from); None where those layers all attend over the whole image."""
    tokens, group = anat.grid[0] * anat.grid[1], anat.patches_per_token
    per_layer = []
    for layer in anat.layers[first:]:
        mask = _captured_buffer(layer.attention.node, tokens * group)
        if mask is not None:        # token t's window: the first token its first patch attends to
            per_layer.append(mask.reshape(tokens, group, tokens, group)[:, 0, :, 0].int().argmax(-1).tolist())
    return tuple(zip(*per_layer)) if per_layer else None


def _captured_buffer(sdpa: fx.Node, size: int) -> torch.Tensor | None:
    """The (size, size) boolean buffer an attention's mask derives from (a window mask as captured, before passes
    took kept tokens of it, added key masks or size biases), None if there is none."""
    node = sdpa_mask(sdpa)
    while isinstance(node, fx.Node) and node.op == "call_function":
        if node.target in (tokenops.take_shared, tokenops.take_tokens, tokenops.mask_keys):
            node = node.args[0]
        elif node.target is tokenops.bias_keys:
            node = node.args[2] if len(node.args) > 2 else None
        else:
            return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = node.graph.owning_module
    for part in node.target.split("."):
        value = getattr(value, part)
    return value if value.dtype == torch.bool and tuple(value.shape) == (size, size) else None
