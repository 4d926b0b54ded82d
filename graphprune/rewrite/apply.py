"""The rewrite engine: turns a pass's Plan into nodes in a captured graph.

apply_plan = signals -> score -> select -> reroute -> record. Rerouting is one general rule:
every value that flows into the region that runs on the reduced sequence (layers >= K and the
epilogue; for vision passes, the projector) and has a token dimension is replaced by its kept
tokens; every symbolic sequence length becomes the kept length. Hidden states, rotary cos/sin,
masks and position ids are all just such values, so no pass names any of them, and the KV
cache outputs of layers >= K shrink by construction.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx

from graphprune import tokenops
from graphprune.anatomy.read import Anatomy, layer_of, sdpa_mask, seq_dims
from graphprune.errors import GraphVerificationError, PassConfigError, PassNotApplicable
from graphprune.rewrite.crop_rows import drop_count, rows_at, shorten
from graphprune.rewrite.kv_cache import keep_final_tokens
from graphprune.rewrite.layout import TokenState, _flatten_positions, _to_features, add_output, init_tokens, state_at
from graphprune.rewrite.pass_api import (
    Choose,
    Frames,
    InputEmbeds,
    KeepCache,
    PassResult,
    Plan,
    Projected,
    Protect,
    SequenceIndex,
    TextEmbeds,
    TextMask,
    TokenPass,
    TopK,
    WithdrawAll,
)
from graphprune.rewrite.positions import check_one_axis, renumber
from graphprune.rewrite.signals import extract_signal

SYM_SIZE = torch.ops.aten.sym_size.int


def apply_pass(p: TokenPass, stage, anat: Anatomy, plans: list[Plan] | None = None) -> PassResult:
    """Apply every Plan of a pass (one per layer for multi-layer methods) in layer order; `plans`:
    the pipeline's placement of them elsewhere (a vision pass run at LLM layer 0), else p.plan()."""
    if plans is None:
        plans = p.plan()
        plans = plans if isinstance(plans, list) else [plans]
    p.requires(anat)
    infos = [apply_plan(p, plan, stage, anat) for plan in plans]
    info = infos[0] if len(infos) == 1 else {**infos[0], "layer": [i["layer"] for i in infos], "plans": infos}
    return PassResult(stage.gm, True, info)


def apply_plan(p: TokenPass, plan: Plan, stage, anat: Anatomy) -> dict:
    gm, g = stage.gm, stage.gm.graph
    init_tokens(gm, anat)
    if plan.positions not in ("keep", "compact"):
        raise PassConfigError(f"{p.name}: positions must be 'keep' or 'compact', got {plan.positions!r}")
    if anat.stage == "vision" and not isinstance(plan.select, Protect):
        # the LLM numbers the vision tokens one way, whatever number of vision passes chose them
        other = next((s for s in anat.selections if s["rule"] != "Protect" and s["positions"] != plan.positions), None)
        if other is not None:
            raise PassConfigError(f"{p.name}: positions={plan.positions!r}, but {other['pass']} in the same vision "
                                  f"stage numbers the kept tokens positions={other['positions']!r}; give "
                                  f"{p.name} positions={other['positions']!r}")
    if isinstance(plan.select, KeepCache):
        info = keep_final_tokens(p, plan.select, gm, anat)
        verify(gm, anat)
        return info
    layer, anchor = _where(p, plan, anat)
    state = state_at(anat, layer)
    if anat.stage == "vision" and layer == anat.num_layers and state.coords == "encoder":
        with g.inserting_before(anchor):
            conv = g.call_function(_to_features, (state.vision_pos, state.seq_index, int(bool(anat.has_cls))))
            state = dataclasses.replace(state, layer=layer, vision_pos=g.call_function(operator.getitem, (conv, 0)),
                                        seq_index=g.call_function(operator.getitem, (conv, 1)), coords="features")

    with g.inserting_before(anchor):
        signals = {name: extract_signal(gm, anat, sig, layer, state, name, p) for name, sig in plan.signals.items()}
        rule = plan.select
        if isinstance(rule, Protect):
            scores = _score(g, plan, signals, p)
            prot = g.call_function(tokenops.protect_topk, (scores, state.protected, state.valid, rule.keep))
            anat.tokens.append(dataclasses.replace(state, layer=layer, protected=prot,
                                                   stream=state.stream if state.layer == layer else None))
            if anat.stage == "vision":
                with g.inserting_before(g.find_nodes(op="output")[0]):
                    add_output(gm, g.call_function(_flatten_positions, (prot,)), "patches_protected")
            info = _info(p, plan, anat, layer, rule.keep, [])
            verify(gm, anat)
            return info
        if isinstance(rule, WithdrawAll):
            sel = g.call_function(tokenops.withdraw_all, (state.vision_pos, state.seq_index))
            kept_desc = 0
        elif isinstance(rule, TopK):
            scores = _score(g, plan, signals, p)
            k = g.call_function(_budget_for, (state.vision_pos, rule.keep))
            sel = g.call_function(tokenops.select_topk, (scores, state.vision_pos, state.seq_index, k,
                                                         state.protected, state.valid))
            kept_desc = rule.keep
        elif isinstance(rule, Choose):
            k = None if rule.keep is None else g.call_function(_capacity_for, (state.vision_pos, rule.keep))
            sized = dict(sizes=state.sizes) if rule.sized else {}
            choice = g.call_function(rule.fn, (), dict(k=k, protected=state.protected, valid=state.valid,
                                                       vision_pos=state.vision_pos, **sized, **signals,
                                                       **dict(rule.options)))
            if rule.ordered and (anat.stage != "vision" or plan.positions != "compact"):
                raise PassConfigError(f"{p.name}: an ordered choice reorders tokens, which only the vision stage "
                                      "with positions='compact' allows")
            sel = g.call_function(apply_choice_in_order if rule.ordered else tokenops.apply_choice,
                                  (choice, state.vision_pos, state.seq_index, state.protected, state.valid))
            kept_desc = "data-dependent" if rule.keep is None else rule.keep
        else:
            raise PassConfigError(f"{p.name}: unknown selection rule {rule!r}")
        keep, new_pos, picked, values, valid, prot = (g.call_function(operator.getitem, (sel, i)) for i in range(6))
        new_index = g.call_function(tokenops.take_tokens, (state.seq_index, keep, 0, (1,)))
        sized = isinstance(rule, Choose) and rule.sized
        sizes = g.call_function(tokenops.kept_sizes, (choice if sized else None, state.sizes, picked)) \
            if sized or state.sizes is not None else None
    hidden = _stream(anat, layer)
    on_crops = anat.stage == "vision" and anat.token_patches is not None
    masked = (isinstance(rule, Choose) and (rule.static_mask or rule.masks_on_crops and on_crops)) or state.masked
    crop_rows, rows_note = None, None
    if on_crops and layer < anat.num_layers:
        # anyres crops (_in_place_on_crops): merged-away slots masked crop by crop, or dropped where counts allow
        rerouted, group = [], 1
        stream, key_valid, crop_rows, rows_note = _merge_in_crops(gm, anat, anchor, layer, hidden, new_pos,
                                                                  new_index, values, valid, rule, state.valid is None)
    else:
        # inside an encoder whose patches merge in groups after its last layer, a token is its group's patches
        group = anat.patches_per_token if anat.stage == "vision" and layer < anat.num_layers else 1
        rerouted, replaced = _reroute(gm, anat, anchor, layer, keep, plan.after_projector, group)
        stream = _put_values(gm, anat, anchor, replaced.get(hidden) if hidden is not None else None, new_pos,
                             values, plan.after_projector, group)
        if anat.stage == "vision" and layer == anat.num_layers and not plan.after_projector:
            anat.features = stream          # what now enters the projector: a later pass reduces this
        key_valid = _mask_invalid_keys(gm, anat, anchor, layer, new_pos, new_index, valid, group) if masked else None
    if isinstance(rule, Choose) and rule.proportional:
        _bias_keys_by_size(p, gm, anat, anchor, layer, new_pos, new_index, sizes, group, crop_rows)
    if plan.positions == "compact" and anat.stage != "vision":
        renumber(gm, anat, anchor, layer, new_index, key_valid, replaced)
    rewrites = isinstance(rule, Choose) and (rule.merges or rule.ordered)
    anat.tokens.append(TokenState(layer, new_pos, new_index, state.coords, valid if masked else None, prot,
                                  state.generation + 1, masked, key_valid,
                                  state.generation + 1 if rewrites else state.rewritten, sizes, stream))
    out = g.find_nodes(op="output")[0]
    with g.inserting_before(out):
        if anat.stage == "vision":
            vis_index = g.call_function(tokenops.token_features, (new_index, new_pos))
            add_output(gm, g.call_function(_flatten_positions, (vis_index,)), "patches_kept")
            add_output(gm, g.call_function(_flatten_valid, (valid, vis_index)), "patches_valid")
            add_output(gm, g.call_function(_flatten_valid, (prot, vis_index, False)), "patches_protected")
        else:
            add_output(gm, new_index, f"tokens_from_layer_{layer}")
            if key_valid is not None:
                add_output(gm, key_valid, f"valid_from_layer_{layer}")
    info = _info(p, plan, anat, layer, kept_desc, rerouted)
    if rows_note:
        info["encoder_rows"] = rows_note
    verify(gm, anat)
    return info


def apply_choice_in_order(choice, vision_pos, seq_index, protected=None, valid=None):
    """tokenops.apply_choice, but each image's kept tokens fill its (contiguous) block of slots in the
    order of `picked`, so the sequence itself is reordered."""
    keep, new_pos, picked, values, new_valid, new_prot = tokenops.apply_choice(choice, vision_pos, seq_index,
                                                                               protected, valid)
    b = keep.shape[0]
    chosen = vision_pos.gather(2, picked)
    keep = keep.scatter(1, new_pos.sort(-1).values.reshape(b, -1), chosen.reshape(b, -1))
    return keep, new_pos.sort(-1).values, picked, values, new_valid, new_prot


def _flatten_valid(mask, like, default=True):
    if mask is None:
        return torch.full(like.shape[::2], default, dtype=torch.bool, device=like.device)
    return mask[:, 0, :]


def _info(p, plan, anat, layer, keep, rerouted) -> dict:
    info = {"pass": repr(p), "stage": anat.stage, "layer": layer if anat.stage != "vision" else None,
            "keep": keep, "positions": plan.positions, "rerouted": rerouted, "rule": type(plan.select).__name__,
            "capacity": isinstance(plan.select, Choose) and plan.select.static_mask,
            "signals": {k: repr(v) for k, v in plan.signals.items()}}
    if anat.stage == "vision":      # where a vision pass acted: an anyres image's crops merge at the features only
        # no crop count: it is the prune-time probe bucket's, not that of the images a call brings
        crops = ", per crop grid" if anat.token_patches is not None else ""
        if crops and isinstance(plan.select, Choose) and plan.select.masks_on_crops:
            crops += " (its counts per crop)"          # a rule run on each crop's sequence (ToMe's keep / r)
        info["at"] = "features" + crops if layer == anat.num_layers else f"encoder layer {layer}" + crops
    anat.selections.append(info)
    return info


def _where(p: TokenPass, plan: Plan, anat: Anatomy) -> tuple[int, fx.Node]:
    """(first layer on the reduced sequence, node before which the selection is inserted)."""
    if anat.stage == "vision":
        layer = anat.num_layers if plan.layer is None else plan.layer
        if not 1 <= layer <= anat.num_layers:
            raise PassConfigError(f"{p.name}: vision layer={layer}: the encoder has layers 0..{anat.num_layers - 1} "
                                  f"feeding the features; use 1..{anat.num_layers - 1}, or none for the features")
        if layer < anat.num_layers and anat.token_patches is not None and not _in_place_on_crops(plan, anat):
            raise PassNotApplicable(f"{p.name}: vision layer={layer} selects inside the encoder, where a vision unit "
                                    f"of {anat.model_class} is {anat.crops} encoder sequences (an anyres image's crops, "
                                    "a whole video's frames); select at the features (no layer), or, for a video, per "
                                    "frame (video_unit='frame')")
        if layer < anat.num_layers and anat.patches_per_token > 1 and not p.whole_groups:
            raise PassNotApplicable(f"{p.name}: vision layer={layer} selects inside the encoder, whose tokens there are "
                                    f"patches that {anat.model_class} merges {anat.patches_per_token} to a feature "
                                    "token only after its last layer; select at the features (no layer)")
        if plan.after_projector:
            anchor = _output_node(anat)
        elif layer == anat.num_layers:
            anchor = next(n for n in anat.features.graph.nodes if n in anat.features.users)
        else:
            anchor = anat.layer(layer).first
    else:
        if plan.positions == "compact":
            check_one_axis(anat, p)
        layer = plan.layer
        if layer is None or not 0 <= layer < anat.num_layers:
            raise PassConfigError(f"{p.name}: layer={layer} is out of range for a {anat.num_layers}-layer "
                                  f"language model; use 1..{anat.num_layers - 1} (0: on the input embeddings)")
        if layer == 0:
            early = (InputEmbeds, TextMask, SequenceIndex, Frames, Projected, TextEmbeds)
            late = sorted(name for name, sig in plan.signals.items() if not isinstance(sig, early))
            if late:
                raise PassConfigError(f"{p.name}: layer=0 selects before the first LLM layer, where only the input "
                                      f"embeddings and the prompt's layout exist; signals {late} come from a layer")
        anchor = anat.layer(layer).first
    prev = anat.tokens[-1].layer
    if len(anat.tokens) > 1 and layer < prev:
        raise PassConfigError(f"{p.name}: passes in one stage must act at increasing layers; "
                              f"layer {layer} comes after a selection at layer {prev}")
    return layer, anchor


def _in_place_on_crops(plan: Plan, anat: Anatomy) -> bool:
    """A selection inside the encoder of an anyres image (its crops separate encoder sequences, its tokens a
    gather after the encoder) that keeps every slot where it is (positions='keep', a static choice of every
    slot, only masking some): it needs no gather before the features, so it runs crop by crop."""
    rule = plan.select
    return (plan.positions == "keep" and isinstance(rule, Choose)
            and (rule.static_mask and rule.keep == 1.0 or rule.masks_on_crops)
            and not rule.ordered and anat.patches_per_token == 1)


def _merge_in_crops(gm, anat: Anatomy, anchor, layer: int, stream, new_pos, new_index, values, valid, rule,
                    static: bool):
    """Anyres crops inside the encoder: the chosen values written to each token's own crop patch row of the
    residual stream entering `layer`, and the invalid (merged-away) tokens' patches masked as keys in every
    encoder layer from `layer` on. Where the merge counts per crop are static (crop_rows.drop_count), the crops
    drop the merged-away slots they all reach, so later layers run shorter sequences; otherwise the masked
    patches still run as queries. Returns (stream, key validity over the tokens, (the full crop rows, the rows
    kept or None) for proportional attention, what happened to the merged-away slots)."""
    g = gm.graph
    crops = (int(bool(anat.has_cls)), anat.crops, anat.token_patches)
    nodes = list(g.nodes)
    later = set(nodes[nodes.index(anchor):])        # the signals read before the anchor keep the unmerged states
    again = anat.tokens[-1].layer == layer and anat.tokens[-1].stream is stream     # a second choice at `layer`
    rows, length = rows_at(anat, layer if again else layer - 1)
    drop, note = drop_count(gm, anat, rule, layer, static, valid is not None)
    with g.inserting_before(anchor):
        full = stream if rows is None else g.call_function(tokenops.full_crop_rows,
                                                           (stream, rows, anat.crop_rows.full))
        put = g.call_function(tokenops.put_crop_tokens, (full, new_pos, values, *crops))
        key_valid = per_crop = None
        if valid is not None:
            key_valid = g.call_function(tokenops.key_validity, (new_index, new_pos, valid))
            per_crop = g.call_function(tokenops.crop_key_validity, (key_valid, put, *crops))
        if drop:
            rows = g.call_function(tokenops.kept_crop_rows, (per_crop, rows if rows is not None else
                                                             g.call_function(tokenops.all_crop_rows, (put,)), drop))
        out = put if rows is None else g.call_function(tokenops.take_crop_rows, (put, rows))
        if rows is not None and per_crop is not None:
            per_crop = g.call_function(tokenops.take_crop_rows, (per_crop, rows))
    for u in list(stream.users):
        if u in later:
            u.replace_input_with(stream, out)
    if drop:
        shorten(gm, anat, layer, rows, (length or anat.crop_rows.full) - drop)
    if per_crop is None:
        return out, None, (put, rows), note
    for l in anat.layers[layer:]:
        sdpa, att = l.attention.node, l.attention
        old = sdpa_mask(sdpa)
        if rows is not None:
            # the rows changed: validity and sizes are cumulative, so the masks are made anew on these rows
            with g.inserting_before(sdpa):
                _set_mask(att, g.call_function(tokenops.mask_keys, (None, per_crop, sdpa.args[0], att.is_causal)))
            _erase_unused(g, old)
            continue
        if isinstance(old, fx.Node) and old.target is tokenops.bias_keys:
            # an earlier sized merge's proportional attention: mask under its bias, which a later one replaces
            base = old.args[2] if len(old.args) > 2 else None
            with g.inserting_before(old):
                masked = g.call_function(tokenops.mask_keys, (base, per_crop, sdpa.args[0], att.is_causal))
            old.args = (*old.args[:2], masked)
            continue
        with g.inserting_before(sdpa):
            _set_mask(att, g.call_function(tokenops.mask_keys, (old, per_crop, sdpa.args[0], att.is_causal)))
    return out, key_valid, (put, rows), note


def _erase_unused(g, node) -> None:
    """Erase a replaced mask node and what fed only it."""
    while isinstance(node, fx.Node) and not node.users:
        feeds = [a for a in node.all_input_nodes if a.op == "call_function"]
        g.erase_node(node)
        node = next((a for a in feeds if not a.users), None)


def _output_node(anat: Anatomy) -> fx.Node:
    return anat.features.graph.find_nodes(op="output")[0]


def _stream(anat: Anatomy, layer: int) -> fx.Node | None:
    """The residual stream entering `layer` (what merged values replace)."""
    if anat.stage == "vision" and layer == anat.num_layers:
        return anat.features
    if anat.tokens[-1].layer == layer and anat.tokens[-1].stream is not None:
        return anat.tokens[-1].stream          # an earlier selection at this layer reduced it
    if layer == 0:
        return anat.inputs["inputs_embeds"]
    return anat.layer(layer - 1).output


def _budget_for(vision_pos, keep):
    return tokenops.budget(keep, vision_pos.shape[-1])


def _capacity_for(vision_pos, keep):
    # a Choose rule's count: its budget, at most the tokens there are
    v = vision_pos.shape[-1]
    return min(keep, v) if isinstance(keep, int) else tokenops.budget(keep, v)


def _score(g, plan, signals: dict, p: TokenPass) -> fx.Node:
    if plan.score is None:
        if len(signals) != 1:
            raise PassConfigError(f"{p.name}: a plan with several signals needs a score function")
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


def _reroute(gm, anat: Anatomy, anchor: fx.Node, layer: int, keep: fx.Node, after_projector: bool = False,
             group: int = 1):
    """group > 1: keep holds tokens of `group` encoder patches each; the encoder's values are reduced to
    their patches, and so are the buffers every image shares (rotary tables, window masks)."""
    g = gm.graph
    nodes = list(g.nodes)
    tokens = keep
    if group > 1:
        with g.inserting_before(anchor):
            keep = g.call_function(tokenops.group_patches, (tokens, group))
    buffers = {name for name, _ in gm.named_buffers()} if group > 1 else set()
    if after_projector:
        region = [anchor]                       # only the graph output reads the projected tokens
    else:
        region = [n for n in nodes[nodes.index(anchor):]
                  if n.op not in ("output", "placeholder") and (layer_of(n) is None or layer_of(n) >= layer)]
    inside = set(region)
    replaced: dict[fx.Node, fx.Node | None] = {}
    for n in region:
        for a in list(n.all_input_nodes):
            if a in inside or (a.op == "get_attr" and a.target not in buffers):
                continue
            if after_projector and not (a is n.args[0][0]):
                continue                        # only the features output, not the bookkeeping outputs
            if a not in replaced:
                replaced[a] = _reduced(g, anat, a, anchor, keep, tokens)
            if replaced[a] is not None:
                n.replace_input_with(a, replaced[a])
    if anat.stage == "vision" and not after_projector and layer < anat.num_layers:
        _resize_static(g, region, anat, anchor, keep, tokens)
    if anat.stage == "vision":
        # per-token outputs computed before this selection (Qwen3-VL's DeepStack rows, tapped at earlier blocks)
        # follow the kept tokens, as the features do: the graph returns them at the features' count
        out = g.find_nodes(op="output")[0]
        for a in out.all_input_nodes:
            if a.meta.get("graphprune_per_token") and a not in inside:
                if replaced.get(a) is None:
                    replaced[a] = _reduced(g, anat, a, anchor, keep, tokens)
                out.replace_input_with(a, replaced[a])
    return sorted(a.name for a, r in replaced.items() if r is not None), replaced


def _resize_static(g, region, anat: Anatomy, anchor: fx.Node, keep: fx.Node, tokens: fx.Node) -> None:
    # The vision encoder is exported with a static token count, baked into view/reshape sizes: its sequence
    # length, and where patches merge in groups (keep: their patches) the token count of the merger's input.
    cls = int(bool(anat.has_cls))
    n_tok = anat.grid[0] * anat.grid[1] * anat.patches_per_token + cls
    shape_ops = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten.expand.default}
    with g.inserting_before(anchor):
        size = g.call_function(SYM_SIZE, (keep, 1))
        sizes = {n_tok: size}
        if keep is not tokens:
            sizes[anat.grid[0] * anat.grid[1]] = g.call_function(SYM_SIZE, (tokens, 1))
            anat.token_dims[sizes[anat.grid[0] * anat.grid[1]].name] = "token_size"
    anat.token_dims[size.name] = "seq_size"     # a later selection in the encoder resizes it again
    for n in region:
        if n.target in shape_ops and any(d in sizes for d in n.args[1] if isinstance(d, int)):
            n.args = (n.args[0], [sizes.get(d, d) if isinstance(d, int) else d for d in n.args[1]]) + tuple(n.args[2:])


def _reduced(g, anat: Anatomy, a: fx.Node, anchor: fx.Node, keep: fx.Node, tokens: fx.Node) -> fx.Node | None:
    """The kept tokens of a value flowing into the reduced region (keep: positions in the current sequence;
    tokens: the kept tokens themselves where keep lists their patches), or None if it has no token dim."""
    val = a.meta.get("val")
    if anat.token_dims.get(a.name) == "token_size":
        with g.inserting_before(anchor):
            size = g.call_function(SYM_SIZE, (tokens, 1))
        anat.token_dims[size.name] = "token_size"
        return size
    if a.op == "get_attr":        # a buffer the images share: the dims as long as the encoder's sequence
        dims = tuple(i for i, d in enumerate(val.shape) if d == anat.grid[0] * anat.grid[1] * anat.patches_per_token)
        if not dims:
            return None
        with g.inserting_before(anchor):
            node = g.call_function(tokenops.take_shared, (a, keep, dims))
        anat.token_dims[node.name] = (0, tuple(d + 1 + (len(dims) == 2) for d in dims))
        return node
    if anat.token_dims.get(a.name) == "seq_size" or (
            isinstance(val, torch.SymInt) and anat.seq is not None and val.node.expr == anat.seq):
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
    # where patches merge in groups, a value with one row per token (Qwen3-VL's DeepStack features, marked
    # per-token where captured) takes the kept tokens themselves, not their patches
    per_token = bool(a.meta.get("graphprune_per_token", False))
    with g.inserting_before(anchor):
        node = g.call_function(tokenops.take_tokens, (a, tokens if per_token else keep, batch, toks))
    node.meta["graphprune_per_token"] = per_token
    anat.token_dims[node.name] = (batch if batch is not None else 0, toks)
    return node


def _put_values(gm, anat: Anatomy, anchor: fx.Node, stream: fx.Node | None, new_pos, values,
                after_projector, group: int = 1) -> fx.Node:
    """Merged tokens: overwrite the reduced residual stream at the kept vision slots with `values`.
    Returns the new stream, which the reduced region now reads."""
    g = gm.graph
    if after_projector:
        out = g.find_nodes(op="output")[0]
        stream = out.args[0][0]
        with g.inserting_before(out):
            put = g.call_function(tokenops.put_tokens, (stream, new_pos, values))
        anat.token_dims[put.name] = seq_dims(stream, anat)     # a later pass reduces it
        out.args = ((put,) + tuple(out.args[0][1:]),)
        return put
    if stream is None:
        raise GraphVerificationError("no residual stream enters the reduced region to merge values into")
    with g.inserting_before(anchor):
        put = g.call_function(tokenops.put_tokens, (stream, new_pos, values, group))
    anat.token_dims[put.name] = seq_dims(stream, anat)
    for u in list(stream.users):
        if u is not put:
            u.replace_input_with(stream, put)
    return put


def _mask_invalid_keys(gm, anat: Anatomy, anchor, layer: int, new_pos, new_index, valid, group: int = 1) -> fx.Node:
    """Static capacity: invalid slots stay in the tensors but no later attention may read them (group > 1: inside
    an encoder whose tokens are patch groups, every patch of an invalid token)."""
    g = gm.graph
    with g.inserting_before(anchor):
        key_valid = g.call_function(tokenops.key_validity, (new_index, new_pos, valid, group))
    anat.token_dims[key_valid.name] = (0, (1,))
    for l in anat.layers[layer:]:
        sdpa, att = l.attention.node, l.attention
        with g.inserting_before(sdpa):
            mask = g.call_function(tokenops.mask_keys, (sdpa_mask(sdpa), key_valid, sdpa.args[0], att.is_causal))
        _set_mask(att, mask)
    return key_valid


def _set_mask(att, mask: fx.Node) -> None:
    """Make an attention read `mask` (which already holds any causal structure) instead of its own."""
    sdpa = att.node
    args = list(sdpa.args) + [None] * (4 - len(sdpa.args))
    args[3] = mask
    if len(args) > 5:
        args[5] = False
    kwargs = {k: v for k, v in sdpa.kwargs.items() if k != "attn_mask"}
    if "is_causal" in kwargs:
        kwargs["is_causal"] = False
    sdpa.args, sdpa.kwargs = tuple(args), kwargs
    att.mask, att.is_causal = mask, False


def _bias_keys_by_size(p: TokenPass, gm, anat: Anatomy, anchor, layer: int, new_pos, new_index, sizes,
                       group: int = 1, crop_rows=None) -> None:
    """Proportional attention (ToMe): every later encoder attention adds log(size) of each key to its
    logits, inside the attention's own mask (windows) where it has one. A later sized choice replaces the
    bias (sizes are cumulative), it does not add to it. crop_rows: the per-crop encoder rows of anyres images
    (units x crops, S), which the log sizes are laid on (a token's at its patch, CLS and patches no token 0)."""
    g = gm.graph
    if anat.stage != "vision":
        raise PassConfigError(f"{p.name}: proportional attention is defined in the vision encoder only")
    if not anat.layers[layer:]:
        return                                        # merged after the last encoder layer: no attention follows
    with g.inserting_before(anchor):
        log_size = g.call_function(tokenops.key_log_sizes, (new_index, new_pos, sizes, group))
        if crop_rows is not None:
            full, rows = crop_rows
            log_size = g.call_function(tokenops.crop_key_log_sizes, (log_size, full, int(bool(anat.has_cls)),
                                                                     anat.crops, anat.token_patches))
            if rows is not None:            # the crops run fewer rows (crop_rows): their keys' sizes
                log_size = g.call_function(tokenops.take_crop_rows, (log_size, rows))
        else:
            anat.token_dims[log_size.name] = (0, (1,))       # a later selection gathers it like any token value
    for l in anat.layers[layer:]:
        att = l.attention
        old = sdpa_mask(att.node)
        earlier = isinstance(old, fx.Node) and old.target is tokenops.bias_keys
        base = (old.args[2] if len(old.args) > 2 else None) if earlier else old
        if att.is_causal:
            raise PassNotApplicable(f"{p.name}: proportional attention needs the encoder's attention non-causal; "
                                    f"layer {l.index} is causal (set proportional_attention=False)")
        with g.inserting_before(att.node):
            _set_mask(att, g.call_function(tokenops.bias_keys, (log_size, att.node.args[0], base)))
        _erase_unused(g, old)                                    # the replaced bias and what fed only it


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
