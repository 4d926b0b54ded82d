"""Signals: the values a pass looks at, extracted from (or recomputed beside) a stage graph.

Each signal becomes a few nodes inserted before the selection: attention rows recomputed for the
chosen queries only (the layer keeps its fused SDPA), post-RoPE keys/values, hidden states
(optionally through a copy of the final norm), the projector output, the instruction's layout.
"""
from __future__ import annotations

import math
import operator

import torch
from torch import fx

from graphprune import tokenops
from graphprune.anatomy.read import Anatomy, attention_windows, layer_of, module_path, sdpa_mask, seq_dims
from graphprune.errors import PassConfigError, PassNotApplicable
from graphprune.rewrite.blocks import grid_tile_table
from graphprune.rewrite.crop_rows import full_rows
from graphprune.rewrite.layout import TokenState, layout_input, state_at
from graphprune.rewrite.pass_api import (
    LAST_VISION_LAYER,
    AttendTogether,
    AttentionRows,
    CropNeighbours,
    CropOf,
    CropTiles,
    Frames,
    Hidden,
    InputEmbeds,
    Keys,
    Projected,
    SequenceIndex,
    TextEmbeds,
    TextMask,
    TokenPass,
    Values,
)


def extract_signal(gm, anat: Anatomy, sig, layer: int, state: TokenState, name: str, p: TokenPass) -> fx.Node:
    g = gm.graph
    if isinstance(sig, TextEmbeds):
        if anat.stage == "vision":
            return layout_input(gm, anat, "text_embeds")
        if layer == 0:              # a vision pass run at LLM layer 0: the instruction's input embeddings
            return _input_embeds(gm, anat, InputEmbeds("text"), p)
        raise PassConfigError(f"{p.name}: TextEmbeds is read in the vision stage (or at LLM layer 0); use "
                              "Hidden(tokens='text') or InputEmbeds('text') in prefill")
    if isinstance(sig, TextMask):
        return layout_input(gm, anat, "text_mask")
    if isinstance(sig, Frames):
        if anat.stage == "vision":
            raise PassConfigError(f"{p.name}: Frames is a prefill signal (the vision stage sees images only)")
        return layout_input(gm, anat, "unit_frames")
    if isinstance(sig, Projected):
        if anat.stage != "vision" and layer == 0:
            return _projected_at_layer_zero(gm, anat, state, p)
        if anat.stage != "vision" or layer != anat.num_layers:
            raise PassConfigError(f"{p.name}: Projected is the vision projector's output; the plan must set "
                                  "after_projector=True")
        out = g.find_nodes(op="output")[0].args[0][0]
        return g.call_function(tokenops.token_features, (out, state.vision_pos))
    if isinstance(sig, CropTiles) and anat.stage == "vision" and anat.token_patches is None \
            and anat.patches_per_token > 1:
        return _group_grid_tiles(g, anat, sig, layer, state)
    if isinstance(sig, (CropNeighbours, CropTiles, CropOf)):
        if anat.stage != "vision" or anat.token_patches is None:
            return None
        if anat.patches_per_token != 1:
            raise PassNotApplicable(f"{p.name}: {anat.model_class}'s video tokens are pooled from "
                                    f"{anat.patches_per_token} encoder patches, no cells of one crop grid")
        cls = int(bool(anat.has_cls))
        side = math.isqrt(int(anat.layer(0).attention.q.meta["val"].shape[2]) - cls)
        offset = 0 if layer == anat.num_layers else cls      # after the projector the tokens have no CLS row
        if isinstance(sig, CropOf):
            return g.call_function(tokenops.token_crops, (anat.token_patches, state.vision_pos, offset, side, cls))
        op = tokenops.crop_neighbours if isinstance(sig, CropNeighbours) else tokenops.crop_tiles
        return g.call_function(op, (anat.token_patches, state.vision_pos, offset, side, anat.crops, sig.window))
    if isinstance(sig, SequenceIndex):
        return _sequence_index(gm, anat, sig, state, p)
    if isinstance(sig, InputEmbeds):
        if sig.tokens == "vision" and layer == 0 and state.generation:
            # a layer-0 rule picks among the current tokens; these are the prompt's, some of them gone
            raise PassConfigError(f"{p.name}: reads the prompt's original vision tokens (InputEmbeds) at layer 0, "
                                  f"after {anat.selections[-1]['pass']} removed some there; put {p.name} first")
        return _input_embeds(gm, anat, sig, p)
    src = getattr(sig, "layer", None)
    if src == LAST_VISION_LAYER:
        if anat.stage != "vision" or "vision_last_hidden" not in gm.meta.get("graphprune_outputs", ()):
            raise PassConfigError(f"{p.name}: signal {name}={sig!r} needs a vision stage captured through its last "
                                  "layer (graphprune's pipeline captures it when a vision pass asks for it)")
        src = anat.num_layers + len(anat.post_layers) - 1
        if not isinstance(sig, AttentionRows) or layer != anat.num_layers:
            raise PassConfigError(f"{p.name}: signal {name}={sig!r}: the last vision layer gives attention rows to "
                                  "passes acting on the features")
    elif anat.stage == "vision" and isinstance(src, int) and src < 0:
        src += anat.num_layers
    # a layer past the feature layer (there only when read) runs on the same tokens as the feature layer
    if src is None or not 0 <= src < min(layer, anat.num_layers) and not (
            layer == anat.num_layers and 0 <= src - anat.num_layers < len(anat.post_layers)):
        raise PassConfigError(f"{p.name}: signal {name}={sig!r} must come from a layer in 0..{layer - 1} "
                              f"(before the selection at layer {layer})")
    at = state_at(anat, min(src, anat.num_layers - 1))
    earlier = None
    if at.generation != state.generation:
        if anat.stage != "vision":
            raise PassConfigError(f"{p.name}: signal {name}={sig!r} comes from layer {src}, before the tokens changed "
                                  f"at layer {anat.tokens[-1].layer}; take it from a later layer")
        if at.generation < state.rewritten:
            raise PassConfigError(f"{p.name}: signal {name}={sig!r} reads vision layer {src}, but an earlier vision "
                                  f"pass ({anat.selections[-1]['pass']}) merged or reordered the tokens since, so its "
                                  f"kept slots no longer hold their own patches; put {p.name} before it")
        # the encoder layer saw every patch and the passes since only removed some: read the signal at the
        # places the remaining patches had in that layer
        earlier = g.call_function(tokenops.positions_in_earlier, (at.seq_index, state.seq_index, state.vision_pos))
    att = anat.layer(src).attention
    tokens = getattr(sig, "tokens", None) or getattr(sig, "keys", "vision")
    if tokens not in ("vision", "text"):
        raise PassConfigError(f"{p.name}: signal {name}={sig!r}: tokens must be 'vision' or 'text'")
    if tokens == "text" or getattr(sig, "query", None) == "text":
        if anat.stage == "vision":
            raise PassNotApplicable(f"{p.name}: the vision encoder sees no text tokens; use TextEmbeds")
        text_pos = g.call_function(tokenops.positions_of, (at.seq_index, layout_input(gm, anat, "text_index")))
        text_mask = layout_input(gm, anat, "text_mask")
    keys = (at.vision_pos if earlier is None else earlier) if tokens == "vision" else text_pos
    if anat.token_patches is not None:
        return _crop_signal(g, anat, sig, name, src, keys, p)
    if isinstance(sig, AttendTogether):
        if anat.stage != "vision":
            raise PassConfigError(f"{p.name}: AttendTogether is a vision-encoder signal, got it in the {anat.stage} stage")
        return g.call_function(tokenops.attend_together, (sdpa_mask(att.node), keys, int(bool(anat.has_cls)),
                                                          anat.patches_per_token))
    if isinstance(sig, AttentionRows) and sig.query == "all":
        if anat.stage != "vision" or tokens != "vision":
            raise PassConfigError(f"{p.name}: AttentionRows query 'all' (attention received) is a vision-encoder "
                                  f"signal of the vision tokens, got {sig!r} in the {anat.stage} stage")
        return g.call_function(tokenops.attention_received, (att.q, att.k, sdpa_mask(att.node), att.scale, keys,
                                                             int(bool(anat.has_cls)), anat.patches_per_token))
    if isinstance(sig, AttentionRows):
        pick = {"last": tokenops.last_position, "cls": tokenops.first_position}.get(sig.query)
        if sig.query == "cls" and not anat.has_cls:
            raise PassNotApplicable(f"{p.name} needs the CLS token of the vision encoder, and "
                                    f"{anat.model_class} has none")
        if sig.query == "text":
            queries = text_pos
        elif pick is None:
            raise PassConfigError(f"{p.name}: AttentionRows query must be 'last', 'cls', 'text' or 'all', "
                                  f"got {sig.query!r}")
        else:
            seq_ref = at.seq_index if anat.stage != "vision" else g.call_function(_encoder_index, (att.q,))
            queries = g.call_function(pick, (seq_ref,))
        cols = keys if tokens == "vision" else g.call_function(_as_one_group, (keys,))
        rows = g.call_function(tokenops.attention_rows, (att.q, att.k, sdpa_mask(att.node), att.scale, att.is_causal,
                                                         queries, cols))
        if tokens == "text":
            rows = g.call_function(operator.getitem, (rows, (slice(None), slice(None), 0)))
        if sig.query == "text":
            rows = g.call_function(tokenops.zero_rows, (rows, text_mask))
        return rows
    grouped = anat.stage == "vision" and anat.patches_per_token > 1
    if isinstance(sig, (Keys, Values)):
        kv = anat.layer(src).kv_write
        node = (kv[0] if isinstance(sig, Keys) else kv[1]) if kv else (att.k if isinstance(sig, Keys) else att.v)
        flat = g.call_function(_heads_to_features, (node,))
        if grouped:             # a feature token's key / value: the mean over its encoder patches
            flat = g.call_function(_group_mean, (flat, int(bool(anat.has_cls)), anat.patches_per_token))
        return _features_at(g, flat, keys, tokens, 0, 1)
    if isinstance(sig, Hidden) and grouped:
        if sig.norm:
            raise PassNotApplicable(f"{p.name}: signal {name}={sig!r}: the vision encoder has no final norm to apply")
        if src < anat.num_layers - 1:          # inside the encoder: the token's patches, concatenated
            flat = g.call_function(_group_concat, (anat.layer(src).output, int(bool(anat.has_cls)),
                                                   anat.patches_per_token))
            return _features_at(g, flat, keys, tokens, 0, 1)
        # the encoder's patches become feature tokens only where they enter the projector (Qwen's merger
        # norms each patch and concatenates its 2x2 group): the features as captured, at the tokens
        return _features_at(g, anat.captured_features, keys, tokens, 0, 1)
    if isinstance(sig, Hidden):
        out = anat.layer(src).output
        if sig.norm:
            out = _final_norm(gm, anat, out, p)
        b, toks = seq_dims(out, anat)
        return _features_at(g, out, keys, tokens, b or 0, toks[0] if toks else 1)
    raise PassConfigError(f"{p.name}: unknown signal {sig!r}")


def _group_grid_tiles(g, anat: Anatomy, sig: CropTiles, layer: int, state: TokenState) -> fx.Node:
    """CropTiles where each image is one grid of tokens that are patch groups (Qwen's 2 x 2): the tiles of that
    grid (grid_h x grid_w), none crossing an attention window of the encoder layers that run on them."""
    windows = attention_windows(anat, layer) if layer < anat.num_layers else None
    tile_of, place_of, tiles = grid_tile_table(anat.grid[0], anat.grid[1], sig.window, windows)
    return g.call_function(tokenops.grid_tiles, (state.seq_index, state.vision_pos, tile_of, place_of, tiles,
                                                 sig.window ** 2))


def _crop_signal(g, anat: Anatomy, sig, name: str, src: int, keys: fx.Node, p: TokenPass) -> fx.Node:
    """A signal of an anyres vision stage (images of several crops, each its own encoder sequence): computed
    per crop, then gathered to the feature tokens as the graph gathers the features (tokenops.crop_tokens)."""
    att, offset = anat.layer(src).attention, int(bool(anat.has_cls))
    gather = (offset, anat.crops, anat.token_patches)
    if isinstance(sig, AttendTogether):
        return None                 # two tokens attend together exactly within one crop: CropOf says which
    if isinstance(sig, AttentionRows) and sig.query in ("cls", "all"):
        if sig.query == "cls" and not anat.has_cls:
            raise PassNotApplicable(f"{p.name} needs the CLS token of the vision encoder, and {anat.model_class} "
                                    "has none")
        scores = g.call_function(tokenops.crop_attention, (att.q, att.k, sdpa_mask(att.node), att.scale, offset,
                                                           sig.query))
        scores = full_rows(g, anat, scores, src)        # a slot a merge dropped (crop_rows) scores 0
        rows = g.call_function(tokenops.token_features, (g.call_function(tokenops.crop_tokens, (scores, *gather)),
                                                         keys))
        return g.call_function(_one_query, (rows,))
    if isinstance(sig, (Keys, Values)):
        flat = g.call_function(_heads_to_features, (full_rows(g, anat, att.k if isinstance(sig, Keys) else att.v,
                                                              src, 2),))
        return _features_at(g, g.call_function(tokenops.crop_tokens, (flat, *gather)), keys, "vision", 0, 1)
    if (isinstance(sig, Hidden) and anat.patches_per_token > 1 and not anat.pooled_hidden
            and anat.captured_features.meta["val"].dim() == 3):
        # a token that enters the projector as one row (a whole Qwen video: its frame's 2x2 merge group, normed
        # and concatenated; a Gemma 3 image token: its block's mean of the post-layernormed patches) has that row
        # as its last-layer hidden state, as on a single frame
        if sig.norm or src != anat.num_layers - 1:
            where = ("pooled after the encoder" if anat.pooled_tokens
                     else f"of {anat.crops} encoder sequence(s) (a whole video's frames)")
            raise PassNotApplicable(f"{p.name}: signal {name}={sig!r}: {anat.model_class}'s tokens are groups of "
                                    f"{anat.patches_per_token} patches {where}, with a hidden state of their own at "
                                    "the last layer only, where they enter the projector; read Hidden(-1)"
                                    + ("" if anat.pooled_tokens else ", or use video_unit='frame'"))
        return _features_at(g, anat.captured_features, keys, "vision", 0, 1)
    if isinstance(sig, Hidden) and anat.patches_per_token > 1 and not anat.pooled_hidden:
        # LLaVA-OneVision pools after its projector: no pooled token has a hidden state (LLaVA-NeXT-Video pools
        # before it, and the mean of its patches' hidden states is the token's: crop_tokens below)
        raise PassNotApplicable(f"{p.name}: signal {name}={sig!r}: {anat.model_class}'s video tokens are pooled "
                                f"from {anat.patches_per_token} encoder patches, and its vision stage gives no pooled "
                                "token a hidden state of its own; prune these videos by scores (vision_topk, cls_topk, "
                                "random) or by their projected features (divprune, cdpruner)")
    if isinstance(sig, Hidden) and not sig.norm:
        rows = g.call_function(tokenops.crop_tokens, (full_rows(g, anat, anat.layer(src).output, src), *gather))
        return _features_at(g, rows, keys, "vision", 0, 1)
    raise PassNotApplicable(f"{p.name}: signal {name}={sig!r} is not available on {anat.model_class}'s anyres "
                            "images (several crops, each its own encoder sequence): their vision-stage signals are "
                            "CLS attention, attention received, keys, values and hidden states")


def _one_query(rows):
    # (B, n, V) scores of one query -> AttentionRows' (B, 1, n, V)
    return rows[:, None]


def _sequence_index(gm, anat: Anatomy, sig: SequenceIndex, state: TokenState, p: TokenPass) -> fx.Node:
    g = gm.graph
    if anat.stage == "vision" or sig.tokens not in ("vision", "text"):
        raise PassConfigError(f"{p.name}: SequenceIndex is a prefill signal of tokens 'vision' or 'text', got {sig!r}")
    index = g.call_function(unpadded_index, (anat.inputs["attention_mask"], state.seq_index))
    if sig.tokens == "vision":
        return g.call_function(tokenops.token_features, (index, state.vision_pos, 0, 1))
    text_pos = g.call_function(tokenops.positions_of, (state.seq_index, layout_input(gm, anat, "text_index")))
    return g.call_function(torch.gather, (index, 1, text_pos))


def _input_embeds(gm, anat: Anatomy, sig: InputEmbeds, p: TokenPass) -> fx.Node:
    g = gm.graph
    if anat.stage == "vision" or sig.tokens not in ("vision", "text"):
        raise PassConfigError(f"{p.name}: InputEmbeds is a prefill signal of tokens 'vision' or 'text', got {sig!r}")
    emb = anat.inputs["inputs_embeds"]          # original token coordinates, before any selection
    if sig.tokens == "vision":
        return g.call_function(tokenops.token_features, (emb, anat.tokens[0].vision_pos, 0, 1))
    return _features_at(g, emb, layout_input(gm, anat, "text_index"), "text", 0, 1)


def _projected_at_layer_zero(gm, anat: Anatomy, state: TokenState, p: TokenPass) -> fx.Node:
    """The projector's output where the vision stage runs eagerly: the LLM's input embeddings at the
    current vision tokens (B, images, tokens, D), those an earlier layer-0 pass kept."""
    if state.rewritten:
        raise PassConfigError(f"{p.name}: reads the projected vision tokens, but an earlier pass "
                              f"({anat.selections[-1]['pass']}) merged or reordered them; put {p.name} first")
    g = gm.graph
    original = g.call_function(tokenops.token_features, (state.seq_index, state.vision_pos))
    return g.call_function(tokenops.token_features, (anat.inputs["inputs_embeds"], original))


def unpadded_index(attention_mask, seq_index):
    """(B, S') index of each current token among its sample's current real tokens (padding: -1)."""
    real = attention_mask.gather(1, seq_index).long()
    return (real.cumsum(-1) - 1).masked_fill(real == 0, -1)


def _features_at(g, x, keys, tokens, batch_dim, seq_dim):
    if tokens == "vision":
        return g.call_function(tokenops.token_features, (x, keys, batch_dim, seq_dim))
    grouped = g.call_function(tokenops.token_features, (x, g.call_function(_as_one_group, (keys,)), batch_dim, seq_dim))
    return g.call_function(operator.getitem, (grouped, (slice(None), 0)))


def _as_one_group(pos):
    # text tokens form a single group (B, 1, T), where vision tokens have one group per image
    return pos[:, None, :]


def _final_norm(gm, anat: Anatomy, x: fx.Node, p: TokenPass) -> fx.Node:
    """Apply a copy of the model's final norm (the nodes between the last layer and the LM head) to x."""
    g = gm.graph
    last = anat.layers[-1].output
    head = [n for n in g.nodes if n.op == "call_function" and layer_of(n) is None and module_path(n) == "head"]
    # the norm feeds the LM head; without a head (a headless body) it is what the graph returns first
    normed = head[0].args[0] if head else anat.outputs[0]
    norm_path = module_path(normed)
    order = list(g.nodes)
    after = order.index(anat.layers[-1].nodes[-1])
    nodes = [n for n in order[after:] if layer_of(n) is None and module_path(n) == norm_path and n.op == "call_function"]
    if not nodes or norm_path == module_path(last):
        raise PassNotApplicable(f"{p.name}: cannot find the final norm of {anat.model_class}")
    env = {last: x}
    for n in nodes:
        env[n] = g.node_copy(n, lambda a: env.get(a, a))
    return env[nodes[-1]]


def _encoder_index(q):
    return torch.zeros(q.shape[0], q.shape[2], dtype=torch.long, device=q.device)


def _group_mean(x, offset: int, group: int):
    """(B, offset + V * group, D) encoder values -> (B, V, D): each token's patches averaged (CLS dropped)."""
    b, _, d = x.shape
    return x[:, offset:].reshape(b, -1, group, d).mean(2)


def _group_concat(x, offset: int, group: int):
    """(B, offset + V * group, D) encoder states -> (B, offset + V, group * D): each token's patches in a row."""
    b, s, d = x.shape
    return torch.cat([x[:, :offset].repeat(1, 1, group), x[:, offset:].reshape(b, -1, group * d)], 1)


def _heads_to_features(k):
    b, h, s, d = k.shape
    return k.transpose(1, 2).reshape(b, s, h * d)
