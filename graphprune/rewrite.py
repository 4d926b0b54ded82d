"""The rewrite engine: turns a pass's Plan into nodes in a captured graph.

apply_plan = signals -> score -> select -> reroute -> record. Rerouting is one general rule:
every value that flows into the region that runs on the reduced sequence (layers >= K and the
epilogue; for vision passes, the projector) and has a token dimension is replaced by its kept
tokens; every symbolic sequence length becomes the kept length. Hidden states, rotary cos/sin,
masks and position ids are all just such values, so no pass names any of them, and the KV
cache outputs of layers >= K shrink by construction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from . import tokenops
from .anatomy import Anatomy, layer_of, seq_dims
from .errors import GraphVerificationError, PassConfigError, PassNotApplicable
from .pass_api import AttentionRows, Hidden, Keys, PassResult, TokenPass, TopK, WithdrawAll

SYM_SIZE = torch.ops.aten.sym_size.int


@dataclass
class TokenState:
    """Graph nodes describing the token sequence from `layer` on."""
    layer: int
    vision_pos: fx.Node          # (B, images, tokens) positions of vision tokens
    seq_index: fx.Node           # (B, S) original position of every token


def output_names(gm: fx.GraphModule) -> list[str]:
    return gm.meta.setdefault("graphprune_outputs", [])


def add_output(gm: fx.GraphModule, node: fx.Node, name: str) -> None:
    out = gm.graph.find_nodes(op="output")[0]
    out.args = (tuple(out.args[0]) + (node,),)
    output_names(gm).append(name)


def init_tokens(gm: fx.GraphModule, anat: Anatomy) -> None:
    """Give the graph its token layout: inputs/nodes passes read vision positions from."""
    if anat.tokens:
        return
    g = gm.graph
    if anat.stage == "vision":
        with g.inserting_after(anat.features):
            vp = g.call_function(patch_positions, (anat.features,))
        with g.inserting_after(vp):
            si = g.call_function(_flatten_positions, (vp,))
    else:
        last = list(g.find_nodes(op="placeholder"))[-1]
        with g.inserting_after(last):
            vp = g.placeholder("vision_pos")
        anat.inputs["vision_pos"] = vp
        first = anat.layers[0].first
        with g.inserting_before(first):
            si = g.call_function(tokenops.seq_positions, (anat.inputs["attention_mask"],))
    anat.tokens.append(TokenState(0, vp, si))


def patch_positions(features):
    """(images, 1, tokens) positions of the patch tokens of each image: the vision-stage layout."""
    n, v = features.shape[0], features.shape[1]
    return torch.arange(v, device=features.device).expand(n, 1, v)


def _flatten_positions(vision_pos):
    return vision_pos[:, 0, :]


def _state_at(anat: Anatomy, layer: int) -> TokenState:
    return [t for t in anat.tokens if t.layer <= layer][-1]


def apply_plan(p: TokenPass, stage, anat: Anatomy) -> PassResult:
    gm, g = stage.gm, stage.gm.graph
    plan = p.plan()
    p.requires(anat)
    init_tokens(gm, anat)
    if plan.positions not in ("keep", "compact"):
        raise PassConfigError(f"{p.name}: positions must be 'keep' or 'compact', got {plan.positions!r}")
    if anat.stage == "vision":
        anchor = next(u for u in anat.features.users if u.target is not patch_positions)
        layer = anat.num_layers                     # the projector runs on the reduced tokens
    else:
        if plan.positions == "compact":
            raise PassNotApplicable(f"{p.name}: positions='compact' between LLM layers is not supported yet; "
                                    "use positions='keep'")
        layer = plan.layer
        if layer is None or not 1 <= layer < anat.num_layers:
            raise PassConfigError(f"{p.name}: layer={layer} is out of range for a {anat.num_layers}-layer "
                                  f"language model; use 1..{anat.num_layers - 1}")
        if any(t.layer >= layer for t in anat.tokens[1:]):
            raise PassConfigError(f"{p.name}: passes in one stage must act at increasing layers; "
                                  f"layer {layer} comes after a selection at layer {anat.tokens[-1].layer}")
        anchor = anat.layer(layer).first
    state = _state_at(anat, layer)

    with g.inserting_before(anchor):
        signals = {name: _signal(g, anat, sig, layer, name, p) for name, sig in plan.signals.items()}
        if isinstance(plan.select, WithdrawAll):
            sel = g.call_function(tokenops.withdraw_all, (state.vision_pos, state.seq_index))
            kept_desc = 0
        elif isinstance(plan.select, TopK):
            scores = _score(g, plan, signals, p)
            k = g.call_function(_budget_for, (state.vision_pos, plan.select.keep))
            sel = g.call_function(tokenops.select_topk, (scores, state.vision_pos, state.seq_index, k))
            kept_desc = plan.select.keep
        else:
            raise PassConfigError(f"{p.name}: unknown selection rule {plan.select!r}")
        keep = g.call_function(_item, (sel, 0))
        new_pos = g.call_function(_item, (sel, 1))
        picked = g.call_function(_item, (sel, 2))
        new_index = g.call_function(tokenops.take_tokens, (state.seq_index, keep, 0, (1,)))
    rerouted = _reroute(gm, anat, anchor, layer, keep)
    anat.tokens.append(TokenState(layer, new_pos, new_index))
    if anat.stage == "vision":
        with g.inserting_before(g.find_nodes(op="output")[0]):
            add_output(gm, g.call_function(_flatten_positions, (picked,)), "patches_kept")
    else:
        add_output(gm, new_index, f"tokens_from_layer_{layer}")
    info = {"pass": repr(p), "stage": anat.stage, "layer": layer if anat.stage != "vision" else None,
            "keep": kept_desc, "positions": plan.positions, "rerouted": rerouted,
            "signals": {k: repr(v) for k, v in plan.signals.items()}}
    anat.selections.append(info)
    verify(gm, anat)
    return PassResult(gm, True, info)


def _item(t, i):
    return t[i]


def _budget_for(vision_pos, keep):
    return tokenops.budget(keep, vision_pos.shape[-1])


def _signal(g, anat: Anatomy, sig, layer: int, name: str, p: TokenPass) -> fx.Node:
    src = getattr(sig, "layer", None)
    if anat.stage == "vision" and isinstance(src, int) and src < 0:
        src += anat.num_layers
    if anat.stage != "vision" and (src is None or not 0 <= src < layer):
        raise PassConfigError(f"{p.name}: signal {name}={sig!r} must come from a layer in 0..{layer - 1} "
                              f"(before the selection at layer {layer})")
    if anat.stage == "vision" and not 0 <= src < anat.num_layers:
        raise PassConfigError(f"{p.name}: signal {name}={sig!r}: the vision encoder has layers "
                              f"0..{anat.num_layers - 1} that feed the features")
    state = _state_at(anat, src)
    att = anat.layer(src).attention
    keys = state.vision_pos
    if anat.stage == "vision" and anat.has_cls:
        keys = g.call_function(torch.add, (keys, 1))      # CLS sits at 0 in the encoder sequence
    if isinstance(sig, AttentionRows):
        pick = {"last": tokenops.last_position, "cls": tokenops.first_position}.get(sig.query)
        if pick is None:
            raise PassConfigError(f"{p.name}: AttentionRows query must be 'last' or 'cls', got {sig.query!r}")
        if sig.query == "cls" and not anat.has_cls:
            raise PassNotApplicable(f"{p.name} needs the CLS token of the vision encoder, and "
                                    f"{anat.model_class} has none")
        seq_ref = state.seq_index if anat.stage != "vision" else g.call_function(_encoder_index, (att.q,))
        queries = g.call_function(pick, (seq_ref,))
        return g.call_function(tokenops.attention_rows, (att.q, att.k, att.mask, att.scale, att.is_causal, queries, keys))
    if isinstance(sig, Keys):
        k = anat.layer(src).kv_write[0] if anat.layer(src).kv_write else att.k
        flat = g.call_function(_heads_to_features, (k,))
        return g.call_function(tokenops.token_features, (flat, keys))
    if isinstance(sig, Hidden):
        out = anat.layer(src).output
        b, toks = seq_dims(out, anat)
        return g.call_function(tokenops.token_features, (out, keys, b or 0, toks[0] if toks else 1))
    raise PassConfigError(f"{p.name}: unknown signal {sig!r}")


def _encoder_index(q):
    return torch.zeros(q.shape[0], q.shape[2], dtype=torch.long, device=q.device)


def _heads_to_features(k):
    b, h, s, d = k.shape
    return k.transpose(1, 2).reshape(b, s, h * d)


def _score(g, plan, signals: dict, p: TokenPass) -> fx.Node:
    if plan.score is None:
        if len(signals) != 1:
            raise PassConfigError(f"{p.name}: a TopK plan with several signals needs a score function")
        node = next(iter(signals.values()))
        return g.call_function(_squeeze_queries, (node,))
    tracer = fx.proxy.GraphAppendingTracer(g)
    out = plan.score(**{k: fx.Proxy(v, tracer) for k, v in signals.items()})
    if not isinstance(out, fx.Proxy):
        raise PassConfigError(f"{p.name}: score must return a tensor computed from the signals")
    return out.node


def _squeeze_queries(x):
    # (B, 1, images, tokens) attention rows of a single query -> scores (B, images, tokens)
    return x[:, 0] if x.dim() == 4 else x


def _reroute(gm, anat: Anatomy, anchor: fx.Node, layer: int, keep: fx.Node) -> list[str]:
    g = gm.graph
    nodes = list(g.nodes)
    region = [n for n in nodes[nodes.index(anchor):]
              if n.op not in ("output", "placeholder") and (layer_of(n) is None or layer_of(n) >= layer)]
    inside = set(region)
    replaced: dict[fx.Node, fx.Node | None] = {}
    for n in region:
        for a in list(n.all_input_nodes):
            if a in inside or a.op == "get_attr":
                continue
            if a not in replaced:
                replaced[a] = _reduced(g, anat, a, anchor, keep)
            if replaced[a] is not None:
                n.replace_input_with(a, replaced[a])
    return sorted(a.name for a, r in replaced.items() if r is not None)


def _reduced(g, anat: Anatomy, a: fx.Node, anchor: fx.Node, keep: fx.Node) -> fx.Node | None:
    val = a.meta.get("val")
    if anat.token_dims.get(a.name) == "seq_size" or (
            isinstance(val, torch.SymInt) and val.node.expr == anat.seq):
        with g.inserting_before(anchor):
            size = g.call_function(SYM_SIZE, (keep, 1))
        anat.token_dims[size.name] = "seq_size"
        return size
    if isinstance(val, torch.SymInt) and anat.seq is not None and anat.seq in val.node.expr.free_symbols:
        raise GraphVerificationError(f"cannot reroute {a.name} = {val.node.expr}: a size derived from the "
                                     "sequence length other than the length itself")
    batch, toks = seq_dims(a, anat)
    if not toks:
        return None
    with g.inserting_before(anchor):
        node = g.call_function(tokenops.take_tokens, (a, keep, batch, toks))
    anat.token_dims[node.name] = (batch if batch is not None else 0, toks)
    return node


def verify(gm: fx.GraphModule, anat: Anatomy) -> None:
    """Checks after each pass: a well-formed graph whose attention all runs downstream of inputs."""
    try:
        gm.graph.lint()
    except Exception as e:  # fx raises plain RuntimeError
        raise GraphVerificationError(f"{anat.stage} graph is malformed after rewriting: {e}") from e
    for layer in anat.layers:
        if layer.attention.node.graph is not gm.graph:
            raise GraphVerificationError(f"attention of layer {layer.index} was lost from the graph")
    gm.recompile()
