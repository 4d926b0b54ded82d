"""Independent reference for vision-stage pruning on Qwen2-VL / Qwen2.5-VL / Qwen3-VL. Nothing here imports graphprune.

* Scores: the attention each LLM token receives in a vision block, recomputed by hand: the block's input
  is read off the model's own encoder run (a forward pre-hook on that block: hidden states, rotary (cos,
  sin), cu_seqlens), then norm1, q / k from the qkv weights, rotary by the rotate-half formula, softmax
  over each cu_seqlens segment (one image or video frame in a full-attention block), averaged over heads
  and the segment's queries. The encoder runs in Qwen2.5-VL's window order: Hugging Face's window index
  (merge groups) maps it back to the processor's patch order, and a token's score is the mean over its
  2x2 merge group's patches.
* Selection: each unit (an image, or a video's temporal patch; with video_unit="video" a whole video, its
  frames' tokens in order) keeps its top-k tokens (ties: lower index), or, for random, the top-k of
  torch.rand((units, 1, tokens), generator=manual_seed(seed)).
* The pruned prompt: the full merged embeddings (reference_families: the model's get_image_features /
  get_video_features at the placeholders) and M-RoPE positions (get_rope_index) gathered at the kept
  tokens, original (t, h, w) positions kept; the model's own forward runs it (inputs_embeds,
  position_ids, attention_mask), prefill and greedy decoding through its cache.
* Qwen3-VL: its merger is norm, linear_fc1, act_fn, linear_fc2 (Qwen2's: ln_q, mlp). Its DeepStack
  features (reference_families.deepstack: get_image_features' deepstack_features at the placeholders)
  are gathered at the kept tokens like the embeddings (a merged token carries its place's rows) and
  the prefill runs the model's own language model with them (visual_pos_masks: the kept vision tokens,
  deepstack_visual_embeds: their rows), then lm_head; decoding as above.
"""
from __future__ import annotations

import math

import torch
from reference_families import deepstack, family_inputs
from torch import Tensor


def merger_norm(visual):
    """The norm the merger applies to each patch before the 2x2 concatenation."""
    return visual.merger.ln_q if hasattr(visual.merger, "ln_q") else visual.merger.norm


def merger_mlp(visual, x: Tensor) -> Tensor:
    """The merger after its norm, on concatenated 2x2 groups x (..., 4 * D)."""
    m = visual.merger
    return m.mlp(x) if hasattr(m, "mlp") else m.linear_fc2(m.act_fn(m.linear_fc1(x)))


def _window_index(visual, grid: Tensor) -> Tensor | None:
    """Hugging Face's window permutation of the merge groups (None: Qwen2-VL's encoder has no windows)."""
    if not hasattr(visual, "fullatt_block_indexes"):
        return None
    if hasattr(visual, "get_window_index"):                     # transformers 4.x
        return visual.get_window_index(grid)[0]
    from transformers.vision_utils import get_vision_window_index
    return get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
                                   patch_size=visual.patch_size, kwargs={})[0]


@torch.no_grad()
def encoder_tokens(model, pixels: Tensor, grid: Tensor, layer: int) -> dict:
    """Per LLM token of every image / frame of `grid`, in order: `score` the attention it receives in vision
    block `layer`, `keys` its patches' mean post-RoPE key there (heads concatenated) and, for the last block,
    `hidden` what enters the merger's MLP (its patches' block outputs through the merger's norm, concatenated)."""
    visual = model.model.visual
    block = visual.blocks[layer]
    seen = {}

    def before(module, args, kwargs):
        seen.update(kwargs, hidden=args[0] if args else kwargs["hidden_states"])

    def after(module, args, kwargs, out):
        seen["out"] = out[0] if isinstance(out, tuple) else out

    handles = [block.register_forward_pre_hook(before, with_kwargs=True),
               block.register_forward_hook(after, with_kwargs=True)]
    try:
        visual(pixels, grid_thw=grid)
    finally:
        for handle in handles:
            handle.remove()
    x = block.norm1(seen["hidden"]).float()
    s, heads = x.shape[0], block.attn.num_heads
    qkv = (x @ block.attn.qkv.weight.float().T + block.attn.qkv.bias.float()).reshape(s, 3, heads, -1)
    cos, sin = (t.float()[:, None, :] for t in seen["position_embeddings"])

    def rope(t):
        half = t.shape[-1] // 2
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

    q, k = rope(qkv[:, 0]).transpose(0, 1), rope(qkv[:, 1]).transpose(0, 1)       # (H, S, hd)
    cu = seen["cu_seqlens"].tolist()
    score = torch.zeros(s)
    for a, b in zip(cu[:-1], cu[1:]):
        probs = (q[:, a:b] @ k[:, a:b].transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        score[a:b] = probs.mean(0).mean(0)
    per_patch = {"score": score[:, None], "keys": k.transpose(0, 1).reshape(s, -1),
                 "hidden": merger_norm(visual)(seen["out"]).float()}
    group = visual.spatial_merge_size ** 2
    window = _window_index(visual, grid)
    if window is not None:                        # window order -> the processor's patch order
        place = (window[:, None] * group + torch.arange(group)).flatten()
        per_patch = {name: torch.zeros_like(t).index_copy(0, place, t) for name, t in per_patch.items()}
    return {"score": per_patch["score"].reshape(-1, group).mean(-1),
            "keys": per_patch["keys"].reshape(-1, group, per_patch["keys"].shape[-1]).mean(1),
            "hidden": per_patch["hidden"].reshape(-1, group * per_patch["hidden"].shape[-1])}


def units(model, example, video_unit: str = "frame") -> list[list[Tensor]]:
    """Per sample, each unit's prompt positions (images; a video's frames, or with video_unit="video" each whole
    video), in prompt order."""
    cfg = model.config
    out = []
    for row in example.input_ids:
        blocks = []
        for token, grid in ((cfg.image_token_id, example.image_grid_thw), (cfg.video_token_id, example.video_grid_thw)):
            at = (row == token).nonzero()[:, 0]
            if at.numel() == 0:
                continue
            per = grid.shape[0] // example.input_ids.shape[0]
            for t, h, w in grid[:per].tolist():
                n = h * w // cfg.vision_config.spatial_merge_size ** 2
                whole = token == cfg.video_token_id and video_unit == "video"
                blocks += [at[:t * n]] if whole else list(at[:t * n].split(n))
                at = at[t * n:]
        out.append(sorted(blocks, key=lambda blk: int(blk[0])))
    return out


def unit_tokens(model, example, layer: int, video_unit: str = "frame") -> list[list[dict]]:
    """Per sample, per unit (prompt order), encoder_tokens' tensors of its tokens (a whole video's: its frames')."""
    cfg, kw = model.config, example.as_kwargs()
    by_token = {}
    for token, pixels, grid in ((cfg.image_token_id, "pixel_values", "image_grid_thw"),
                                (cfg.video_token_id, "pixel_values_videos", "video_grid_thw")):
        if kw.get(pixels) is not None:
            by_token[token] = encoder_tokens(model, kw[pixels], kw[grid], layer)
    out = []
    for i, blocks in enumerate(units(model, example, video_unit)):
        row = []
        for blk in blocks:
            tensors = by_token[int(example.input_ids[i, blk[0]])]
            row.append({name: t[:blk.numel()] for name, t in tensors.items()})
            tensors.update({name: t[blk.numel():] for name, t in tensors.items()})
        out.append(row)
    return out


def kept_positions(model, example, keep: int, how: str = "attention", layer: int = -1, seed: int = 0,
                   video_unit: str = "frame") -> Tensor:
    """(B, S') sorted prompt indices kept: every non-prunable token, and each unit's chosen tokens."""
    blocks = units(model, example, video_unit)
    if how == "attention":
        picks = [[unit["score"].topk(keep).indices for unit in row]
                 for row in unit_tokens(model, example, layer, video_unit)]
    else:
        n, v = len(blocks[0]), blocks[0][0].numel()
        u = torch.rand((len(blocks) * n, 1, v), generator=torch.Generator().manual_seed(seed))
        picks = [[u[i * n + j, 0].topk(keep).indices for j in range(n)] for i in range(len(blocks))]
    return keep_index(model, example, picks, video_unit)


def keep_index(model, example, picks: list[list[Tensor]], video_unit: str = "frame") -> Tensor:
    """(B, S') sorted prompt indices: every non-prunable token and each unit's chosen local indices."""
    return keep_of_units(units(model, example, video_unit), example.input_ids.shape[1], picks)


def keep_of_units(blocks: list[list[Tensor]], length: int, picks: list[list[Tensor]]) -> Tensor:
    """(B, S') sorted prompt indices of prompts of `length` tokens: all but the units' `blocks` (per sample,
    each unit's prompt positions), and of each unit its chosen local indices `picks`."""
    rows = []
    for row, pick in zip(blocks, picks):
        drop = torch.zeros(length, dtype=torch.bool)
        for blk, chosen in zip(row, pick):
            drop[blk] = True
            drop[blk[chosen]] = False
        rows.append((~drop).nonzero()[:, 0])
    return torch.stack(rows)


@torch.no_grad()
def hf_generate(model, example, keep_index: Tensor, steps: int, embeds: Tensor | None = None,
                deepstack_rows: Tensor | None = None, valid: Tensor | None = None,
                prompt_rows: Tensor | None = None) -> dict:
    """Prefill logits and `steps` greedy tokens of the model's own forward on the pruned prompt (its
    embeddings `embeds`, else the full prompt's at the kept tokens). On Qwen3-VL its DeepStack rows:
    `deepstack_rows` (levels, B, S', D) at the kept tokens, else `prompt_rows` (levels, B, S, D) in prompt
    coordinates taken at the kept tokens, else the unpruned run's there. valid (B, S) bool: kept slots that
    no token may attend to (attention mask 0: a static capacity's empty slots)."""
    emb, am, pos, vm = family_inputs(model, example)
    emb = emb.gather(1, keep_index[..., None].expand(-1, -1, emb.shape[-1])) if embeds is None else embeds
    if valid is not None:
        am = am * valid.to(am.dtype)
    am, pos = am.gather(1, keep_index), pos.gather(2, keep_index[None].expand(pos.shape[0], -1, -1))
    rows = deepstack(model, example) if prompt_rows is None else prompt_rows
    if rows is None:
        out = model(inputs_embeds=emb, position_ids=pos, attention_mask=am, use_cache=True)
        logits, cache = out.logits, out.past_key_values
    else:                   # Qwen3-VL: the kept vision tokens' DeepStack rows, through its own language model
        at = vm.gather(1, keep_index)
        if deepstack_rows is None:
            rows = rows.gather(2, keep_index[None, ..., None].expand(rows.shape[0], -1, -1, rows.shape[-1]))
        else:
            rows = deepstack_rows
        out = model.model.language_model(inputs_embeds=emb, position_ids=pos, attention_mask=am, use_cache=True,
                                          visual_pos_masks=at, deepstack_visual_embeds=[level[at] for level in rows])
        logits, cache = model.lm_head(out.last_hidden_state), out.past_key_values
    kv_lens = [cache.get_seq_length(i) for i in range(len(cache))]
    nxt = pos.amax(0).masked_fill(am == 0, -1).amax(-1, keepdim=True) + 1         # (B, 1)
    tokens, embed = [], model.get_input_embeddings()
    tok = logits[:, -1].argmax(-1)
    for step in range(steps):
        tokens.append(tok)
        if step == steps - 1:
            break
        am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
        p = (nxt + step)[None].expand(3, -1, -1)
        step_out = model(inputs_embeds=embed(tok[:, None]), position_ids=p, attention_mask=am, past_key_values=cache,
                         use_cache=True)
        cache, tok = step_out.past_key_values, step_out.logits[:, -1].argmax(-1)
    return {"prefill_logits": logits, "tokens": torch.stack(tokens, 1), "keep": keep_index, "kv_lens": kv_lens}


def zip_unit(score: Tensor, keys: Tensor, hidden: Tensor, keep: int, contextual: int):
    """VisionZip on one unit's tokens: (dominant indices (top keep - contextual by score), contextual target
    indices (ascending), every token's hidden with each target's members' mean added)."""
    dom = score.topk(keep - contextual).indices
    rest = torch.tensor([j for j in range(score.numel()) if j not in set(dom.tolist())])
    targets = rest[torch.arange(0, rest.numel(), max(1, rest.numel() // contextual))[:contextual]]
    members = torch.tensor([j for j in rest.tolist() if j not in set(targets.tolist())])
    metric = torch.nn.functional.normalize(keys, dim=-1)
    owner = (metric[members] @ metric[targets].T).argmax(-1)
    values = hidden.clone()
    for t, target in enumerate(targets.tolist()):
        group = members[owner == t]
        if group.numel():
            values[target] = values[target] + hidden[group].mean(0)
    return dom, targets, values


@torch.no_grad()
def visionzip(model, example, keep: int, contextual: int, video_unit: str = "frame") -> tuple[Tensor, Tensor]:
    """VisionZip with attention-received dominance, positions kept: per unit the top keep - contextual tokens
    by score (last block), the rest (ascending) grouped around `contextual` targets taken every (rest //
    contextual)-th, each other token joining the target whose key is most cosine-similar; a contextual token
    is its target's hidden plus its members' mean, at the target's place. Returns the kept prompt indices
    (B, S') and the pruned prompt's embeddings (B, S', D): the merger's MLP of each kept token's hidden."""
    emb, _, _, _ = family_inputs(model, example)
    rows, embeds = [], []
    for i, (blocks, tokens) in enumerate(zip(units(model, example, video_unit),
                                             unit_tokens(model, example, -1, video_unit))):
        drop = torch.zeros(example.input_ids.shape[1], dtype=torch.bool)
        row = emb[i].clone()
        for blk, unit in zip(blocks, tokens):
            dom, targets, values = zip_unit(unit["score"], unit["keys"], unit["hidden"], keep, contextual)
            chosen = torch.cat([dom, targets])
            drop[blk] = True
            drop[blk[chosen]] = False
            row[blk[chosen]] = merger_mlp(model.model.visual, values[chosen]).float()
        keep_index = (~drop).nonzero()[:, 0]
        rows.append(keep_index)
        embeds.append(row[keep_index])
    return torch.stack(rows), torch.stack(embeds)
