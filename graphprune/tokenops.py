"""Token ops: the scoring and selection nodes passes insert into captured graphs.

Each op is one call_function node in the rewritten graph, so a printed graph reads like the
method (`attention_rows -> select_topk -> take_tokens`). All shapes depend only on static
budgets, never on data, so graphs stay exportable and CUDA-graph friendly.

Layout conventions (prefill): `vision_pos` is (B, images, tokens_per_image), the positions of
each image's vision tokens in the current sequence, ascending.
"""
from __future__ import annotations

import math

import torch


def budget(keep: int | float, available: int) -> int:
    """Tokens kept per image for `keep` (an int count, or a float fraction in (0, 1])."""
    k = keep if isinstance(keep, int) else max(1, round(keep * available))
    if not 0 < k <= available:
        raise ValueError(f"budget {keep!r} asks for {k} of {available} vision tokens per image")
    return k


def attention_rows(q, k, mask, scale, is_causal: bool, queries, keys):
    """Head-averaged attention probabilities of a few query rows, recomputed from q and k.

    q (B, H, S, d), k (B, H or H_kv, S, d) post-RoPE; queries (B, nq) positions; keys
    (B, n, V) positions. Softmax runs over every key (the layer's own attention row), then the
    columns at `keys` are taken: (B, nq, n, V). Only nq x S logits are formed, never S x S,
    so the layer itself keeps its fused SDPA / flash kernel.
    """
    b, h, s, d = q.shape
    if k.shape[1] != h:
        k = k.repeat_interleave(h // k.shape[1], dim=1)
    qi = queries[:, None, :, None].expand(b, h, queries.shape[1], d)
    logits = torch.matmul(q.gather(2, qi).float(), k.float().transpose(-1, -2))
    logits = logits * (scale if scale is not None else 1.0 / math.sqrt(d))
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))   # SDPA broadcasts (S, S) and (H, S, S) too
        rows = mask.expand(b, -1, s, s).gather(2, queries[:, None, :, None].expand(b, mask.shape[1], queries.shape[1], s))
        logits = logits.masked_fill(~rows, float("-inf")) if rows.dtype == torch.bool else logits + rows.float()
    elif is_causal:
        future = torch.arange(s, device=q.device)[None, None, None, :] > queries[:, None, :, None]
        logits = logits.masked_fill(future, float("-inf"))
    probs = logits.softmax(-1).mean(1)                                   # (B, nq, S)
    n, v = keys.shape[1], keys.shape[2]
    cols = probs.gather(2, keys.reshape(b, 1, n * v).expand(b, probs.shape[1], n * v))
    return cols.reshape(b, probs.shape[1], n, v)


def attention_received(q, k, mask, scale, keys, offset: int, group: int):
    """Head- and query-averaged attention each vision token receives in an encoder layer, recomputed
    from its q and k (B, H, S, d): (B, 1, n, V) at the token positions `keys` (B, n, V). The encoder's
    sequence is `offset` leading tokens (CLS), then each token's `group` patches in a row; a token
    receives the mean of its patches' columns. Every S x S logit is formed, in query chunks."""
    b, h, s, d = q.shape
    if k.shape[1] != h:
        k = k.repeat_interleave(h // k.shape[1], dim=1)
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    received = torch.zeros(b, s, device=q.device, dtype=torch.float32)
    for start in range(0, s, RECEIVED_CHUNK):
        rows = slice(start, min(s, start + RECEIVED_CHUNK))
        logits = torch.matmul(q[:, :, rows].float(), k.float().transpose(-1, -2)) * scale
        if mask is not None:
            part = mask.expand(b, h, s, s)[:, :, rows]
            logits = logits.masked_fill(~part, float("-inf")) if part.dtype == torch.bool else logits + part.float()
        received += logits.softmax(-1).sum(2).mean(1)                       # (B, S): summed over these queries
    per_token = (received[:, offset:] / s).reshape(b, -1, group).mean(-1)
    return per_token[:, None].expand(b, keys.shape[1], -1).gather(2, keys - offset)[:, None]


def crop_tokens(x, offset: int, crops: int, token_patches):
    """Per-crop encoder rows x (units x crops, offset + P, ...) -> (units, offset + T, ...): the first crop's
    `offset` leading rows (its CLS), then each feature token's row, token_patches (T, G) indexing the unit's
    crops' patches (crop x P + patch), as an anyres vision stage gathers its features: the mean of a token's
    G patches (LLaVA-OneVision's 2 x 2 pooled video tokens; an image's token is one patch)."""
    nc, s = x.shape[:2]
    n = nc // crops
    x = x.reshape(n, crops, s, *x.shape[2:])
    patches = x[:, :, offset:].reshape(n, crops * (s - offset), *x.shape[3:])
    t, group = token_patches.shape
    tokens = patches.index_select(1, token_patches.flatten()).reshape(n, t, group, *x.shape[3:]).mean(2)
    return torch.cat([x[:, 0, :offset], tokens.to(x.dtype)], 1)


def uncrop_tokens(rows, x, offset: int, crops: int, token_patches):
    """crop_tokens' inverse where each token is one patch: x (units x crops, offset + P, ...) with each feature
    token's patch row replaced by its row of rows (units, offset + T, ...); CLS rows and patches that are no
    token (unpadded away) keep x's."""
    nc, s = x.shape[:2]
    n = nc // crops
    per_crop = x.reshape(n, crops, s, *x.shape[2:])
    patches = per_crop[:, :, offset:].reshape(n, crops * (s - offset), *x.shape[2:])
    patches = patches.index_copy(1, token_patches[:, 0], rows[:, offset:].to(x.dtype))
    out = torch.cat([per_crop[:, :, :offset], patches.reshape(n, crops, s - offset, *x.shape[2:])], 2)
    return out.reshape(nc, s, *x.shape[2:])


def put_crop_tokens(x, vision_pos, values, offset: int, crops: int, token_patches):
    """put_tokens into per-crop encoder rows x (units x crops, offset + P, D): values (units, n, k, D) at the
    tokens vision_pos (indexing the offset + T rows of crop_tokens), each written to its own crop's patch row."""
    tokens = put_tokens(crop_tokens(x, offset, crops, token_patches), vision_pos, values)
    return uncrop_tokens(tokens, x, offset, crops, token_patches)


def crop_key_validity(key_valid, x, offset: int, crops: int, token_patches):
    """key_validity over the offset + T rows of crop_tokens (units, offset + T) -> per-crop encoder keys
    (units x crops, offset + P) of x: a token's validity at its patch, every other key (CLS, a patch that is
    no token) valid. None stays None."""
    if key_valid is None:
        return None
    ones = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return uncrop_tokens(key_valid, ones, offset, crops, token_patches)


def crop_key_log_sizes(log_size, x, offset: int, crops: int, token_patches):
    """key_log_sizes over the offset + T rows of crop_tokens (units, offset + T) -> per-crop encoder keys
    (units x crops, offset + P) of x: a token's log size at its patch, every other key (CLS, a patch that is no
    token) 0."""
    zeros = torch.zeros(x.shape[:2], dtype=log_size.dtype, device=x.device)
    return uncrop_tokens(log_size, zeros, offset, crops, token_patches)


# Compact crop rows: per-crop encoder sequences that dropped merged-away slots (units x crops, S' < S), each
# row remembering its slot in the crop's full sequence (rows (units x crops, S') ascending). CLIP / SigLIP add
# their position embeddings before the first layer, so later layers need no positions, only these slots.


def all_crop_rows(x):
    """(units x crops, S) rows of per-crop encoder rows x (units x crops, S, ...): every slot, in order."""
    return torch.arange(x.shape[1], device=x.device).expand(x.shape[0], x.shape[1])


def take_crop_rows(x, rows, dim: int = 1):
    """The rows `rows` (units x crops, S') of x (units x crops, ..., S, ...), the slots along `dim`."""
    shape = [rows.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = rows.shape[1]
    size = list(x.shape)
    size[dim] = rows.shape[1]
    return x.gather(dim, rows.reshape(shape).expand(size))


def full_crop_rows(x, rows, length: int, dim: int = 1):
    """Compact rows x (units x crops, ..., S', ...) back at their slots `rows` of full sequences of `length`
    along `dim`; a dropped slot (a merged-away patch, masked wherever it is read) holds zeros."""
    shape = [rows.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = rows.shape[1]
    size = list(x.shape)
    size[dim] = length
    return x.new_zeros(size).scatter(dim, rows.reshape(shape).expand(x.shape), x)


def kept_crop_rows(key_valid, rows, drop: int):
    """The slots (units x crops, S' - drop) each crop keeps running: its rows `rows` (ascending) less the first
    `drop` of them whose key is invalid (key_valid (units x crops, S) over the full slots; the static merge counts
    guarantee every crop has that many)."""
    invalid = ~key_valid.gather(1, rows)
    gone = invalid & (invalid.cumsum(1) <= drop)
    order = gone.to(torch.uint8).argsort(dim=1, stable=True)[:, :rows.shape[1] - drop]   # stable: kept rows in order
    return rows.gather(1, order)


def token_crops(token_patches, vision_pos, offset: int, side: int, leading: int):
    """(B, n, V, 2): each vision token's crop (vision_pos (B, n, V) indexing the offset + T rows of crop_tokens)
    and the `leading` tokens (CLS) its crop's encoder sequence has before its side x side patches."""
    b, n, v = vision_pos.shape
    crop = _crop_cells(token_patches, vision_pos, offset, side)[1].reshape(b, n, v)
    return torch.stack([crop, torch.full_like(crop, leading)], -1)


def crop_attention(q, k, mask, scale, offset: int, query: str):
    """(images x crops, offset + P) attention scores within each crop's own sequence (q, k (B, H, S, d)):
    query "cls", the head-averaged attention of its CLS (position 0) to each of its positions; "all", the
    attention each patch receives averaged over the crop's queries and heads (attention_received), its
    `offset` leading positions 0."""
    b, s = q.shape[0], q.shape[2]
    if query == "cls":
        every = torch.arange(s, device=q.device).expand(b, 1, s)
        first = torch.zeros(b, 1, dtype=torch.long, device=q.device)
        return attention_rows(q, k, mask, scale, False, first, every)[:, 0, 0]
    patches = torch.arange(offset, s, device=q.device).expand(b, 1, s - offset)
    received = attention_received(q, k, mask, scale, patches, offset, 1)[:, 0, 0]
    return torch.cat([received.new_zeros(b, offset), received], 1)


RECEIVED_CHUNK = 1024      # query rows per chunk of attention_received: its (B, H, chunk, S) logits bound memory


def token_features(x, keys, batch_dim: int = 0, seq_dim: int = 1):
    """Rows of x (B, S, ...) at the vision positions `keys` (B, n, V): (B, n, V, ...)."""
    b, n, v = keys.shape
    x = x.movedim(seq_dim, 1) if seq_dim != 1 else x
    idx = keys.reshape(b, n * v, *([1] * (x.dim() - 2))).expand(b, n * v, *x.shape[2:])
    return x.gather(1, idx).reshape(b, n, v, *x.shape[2:])


def last_position(seq_index):
    """(B, 1) position of the last token of the current sequence (the last prompt token)."""
    return torch.full((seq_index.shape[0], 1), seq_index.shape[1] - 1, dtype=torch.long, device=seq_index.device)


def first_position(seq_index):
    """(B, 1) position 0: the CLS query of a vision encoder."""
    return torch.zeros((seq_index.shape[0], 1), dtype=torch.long, device=seq_index.device)


def true_positions(mask, count: int):
    """Indices of the True entries of mask along its last dim, ascending, `count` of them (a static
    count: when fewer are True, the lowest False indices follow). A stable sort, no nonzero."""
    return torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :count]


def rank_scores(scores, protected=None, valid=None):
    """float32 scores where protected tokens rank first and invalid (static-padding) slots last."""
    s = scores.float()
    if valid is not None:
        s = s.masked_fill(~valid, float("-inf"))
    if protected is not None:
        s = s.masked_fill(protected, float("inf"))
    return s


def select_topk(scores, vision_pos, seq_index, k: int, protected=None, valid=None):
    """Keep the top-k vision tokens of each image by score; every other token is kept.

    Returns (keep, new_vision_pos, picked, values, valid, protected): keep (B, S') ascending
    positions into the current sequence, the kept vision tokens' positions in the new sequence
    (B, n, k), which of each image's tokens were kept (B, n, k ascending local indices), no
    merged values, and the validity / protection of the kept tokens.
    """
    picked = rank_scores(scores, protected, valid).topk(k, dim=-1, sorted=True).indices.sort(-1).values
    return apply_choice(picked, vision_pos, seq_index, protected, valid)


def protect_topk(scores, protected, valid, keep: int | float):
    """(B, n, V) bool: each image's `keep` highest-scoring tokens (a float: ceil(keep x its valid
    tokens)), joined to those already protected. Ties go to the lower index."""
    s = rank_scores(scores, None, valid)
    if isinstance(keep, float):
        count = valid.sum(-1) if valid is not None else torch.full(s.shape[:-1], s.shape[-1], device=s.device)
        k = torch.ceil(keep * count.double()).long()
    else:
        k = torch.full(s.shape[:-1], keep, device=s.device)
    order = s.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
    mark = rank < k[..., None]
    return mark if protected is None else mark | protected


def withdraw_all(vision_pos, seq_index):
    """Drop every vision token (VTW): keep all other tokens."""
    return apply_choice(vision_pos[:, :, :0], vision_pos, seq_index)


def apply_choice(choice, vision_pos, seq_index, protected=None, valid=None):
    """Turn a pass's choice (picked local indices, or a dict with picked/values/valid/protected) into the
    new token layout: (keep, new_vision_pos, picked, values, valid, protected)."""
    if isinstance(choice, dict):
        picked, values, chosen_valid = choice["picked"], choice.get("values"), choice.get("valid")
    else:
        picked, values, chosen_valid = choice, None, None
    b, n, k = picked.shape
    chosen = vision_pos.gather(2, picked)
    keep, new_pos = _apply_choice(vision_pos, chosen, seq_index, n * k)
    new_valid = None if valid is None else valid.gather(2, picked)
    if chosen_valid is not None:
        new_valid = chosen_valid if new_valid is None else new_valid & chosen_valid
    new_prot = None if protected is None else protected.gather(2, picked)
    if isinstance(choice, dict) and choice.get("protected") is not None:
        new_prot = choice["protected"]          # a merge hands its members' protection to the merged token
    return keep, new_pos, picked, values, new_valid, new_prot


def kept_sizes(choice, sizes, picked):
    """Sizes of the kept tokens: those a sized choice returns, else the kept tokens' own (None: all 1)."""
    if isinstance(choice, dict) and choice.get("sizes") is not None:
        return choice["sizes"]
    return None if sizes is None else sizes.gather(2, picked)


def _apply_choice(vision_pos, chosen, seq_index, kept_vision: int):
    # keep (B, S') ascending positions, and the kept vision tokens' new positions (B, n, k)
    b, s = seq_index.shape
    n = vision_pos.shape[1]
    kept = torch.ones(b, s, dtype=torch.bool, device=seq_index.device)
    kept = kept.scatter(1, vision_pos.reshape(b, -1), False).scatter(1, chosen.reshape(b, -1), True)
    keep = true_positions(kept, s - vision_pos.shape[1] * vision_pos.shape[2] + kept_vision)
    new_pos = positions_of(keep, chosen.reshape(b, -1)).reshape(b, n, -1)
    return keep, new_pos


def take_tokens(x, keep, batch_dim, seq_dims: tuple[int, ...]):
    """Gather the kept tokens of x along each token dimension, per sample along batch_dim.

    A value broadcast over the batch (size-1 batch dim, or none: then dim 0 is taken) is
    expanded first, since samples keep different tokens.
    """
    b, n = keep.shape
    batch_dim = 0 if batch_dim is None else batch_dim
    if x.shape[batch_dim] != b:
        x = x.expand(*[b if i == batch_dim else -1 for i in range(x.dim())])
    for d in seq_dims:
        shape = [1] * x.dim()
        shape[batch_dim], shape[d] = b, n
        idx = (keep if batch_dim < d else keep.t()).reshape(shape)
        target = list(x.shape)
        target[d] = n
        x = x.gather(d, idx.expand(target))
    return x


def seq_positions(attention_mask):
    """(B, S) ascending token positions 0..S-1: the original-index map of an unpruned sequence."""
    b, s = attention_mask.shape[0], attention_mask.shape[-1]
    return torch.arange(s, device=attention_mask.device).expand(b, s)


def put_tokens(x, vision_pos, values, group: int = 1):
    """Overwrite x (B, S, D) at the vision slots vision_pos (B, n, k) with values (B, n, k, D), as a
    fixed-shape scatter: image features into the prompt (LLaVA's masked_scatter at <image> tokens),
    or merged tokens into the residual stream. values=None leaves x as it is. group > 1: each token is
    `group` consecutive rows of x (an encoder's patches merged after its last layer, Qwen's 2x2) and its
    values (B, n, k, group x D) hold them concatenated."""
    if values is None:
        return x
    if group > 1:
        b, s, d = x.shape
        return put_tokens(x.reshape(b, s // group, group * d), vision_pos, values).reshape(b, s, d)
    b, n, k = vision_pos.shape
    idx = vision_pos.reshape(b, n * k, 1).expand(b, n * k, x.shape[-1])
    return x.scatter(1, idx, values.reshape(b, n * k, -1).to(x.dtype))


def key_validity(seq_index, new_pos, valid, group: int = 1):
    """(B, S) bool: False at the invalid vision slots of a static-capacity selection (None: all valid).
    group > 1: tokens of `group` encoder patches each (B, S x group), every patch with its token's validity."""
    if valid is None:
        return None
    b, n, k = new_pos.shape
    ones = torch.ones(seq_index.shape, dtype=torch.bool, device=seq_index.device)
    out = ones.scatter(1, new_pos.reshape(b, n * k), valid.reshape(b, n * k))
    return out.repeat_interleave(group, dim=1) if group > 1 else out


def mask_keys(mask, key_valid, q, is_causal: bool):
    """An SDPA mask that also hides the keys where key_valid is False (bool masks: True = attend)."""
    if key_valid is None:
        if mask is None and is_causal:
            s = q.shape[-2]
            return torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        return mask
    cols = key_valid[:, None, None, :]
    if mask is None:
        if not is_causal:
            return cols
        s = q.shape[-2]
        return torch.ones(s, s, dtype=torch.bool, device=q.device).tril() & cols
    if mask.dtype == torch.bool:
        return mask & cols
    return mask.masked_fill(~cols, torch.finfo(mask.dtype).min)


def key_log_sizes(seq_index, new_pos, sizes, group: int = 1):
    """(B, S) log of each vision token's size at its slot, 0 elsewhere (size 1): proportional attention.
    group > 1: tokens of `group` encoder patches each (B, S x group), every patch with its token's size."""
    b, n, k = new_pos.shape
    out = torch.zeros(seq_index.shape, dtype=sizes.dtype, device=sizes.device)
    out = out.scatter(1, new_pos.reshape(b, n * k), sizes.log().reshape(b, n * k))
    return out.repeat_interleave(group, dim=1) if group > 1 else out


def bias_keys(log_size, q, mask=None):
    """An additive SDPA mask (B, 1, 1, S) adding log_size (B, S) to every query's logit of each key; with
    the attention's own mask (bool: True = attend, or additive), that mask with the bias added."""
    bias = log_size[:, None, None, :].to(q.dtype)
    if mask is None:
        return bias
    return bias.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else bias + mask.to(q.dtype)


def group_patches(keep, group: int):
    """Encoder positions (B, S' x group) of the patches of the kept tokens keep (B, S'), where token t is
    the `group` patches t x group .. t x group + group - 1 (an encoder without leading tokens, Qwen's)."""
    b, s = keep.shape
    return (keep[..., None] * group + torch.arange(group, device=keep.device)).reshape(b, s * group)


def take_shared(x, keep, dims: tuple[int, ...]):
    """take_tokens for a value every image shares, without a batch dim (an encoder's rotary tables (S, d),
    its window mask (S, S)): (B, ...) each image's kept tokens along `dims`; a mask (two token dims)
    gets a head dim, (B, 1, S', S'), so that attention broadcasts it over heads."""
    out = take_tokens(x[None], keep, 0, tuple(d + 1 for d in dims))
    return out[:, None] if len(dims) == 2 else out


def attend_together(mask, keys, offset: int, group: int):
    """(B, n, V, V) bool: whether the tokens at encoder positions keys (B, n, V) attend to one another
    under an attention's mask ((S, S), or (B or 1, 1, S or 1, S), bool or additive; None: all do). The
    sequence is `offset` leading tokens then each token's `group` patches; a token pair attends together
    when every patch of one may attend to every patch of the other."""
    b, n, v = keys.shape
    if mask is None:
        return torch.ones(b, n, v, v, dtype=torch.bool, device=keys.device)
    allowed = mask if mask.dtype == torch.bool else mask > float("-inf")
    s = allowed.shape[-1]
    allowed = allowed.expand(*allowed.shape[:-2], s, s).reshape(-1, s, s)[:, offset:, offset:]
    t = (s - offset) // group
    tokens = allowed.reshape(-1, t, group, t, group).all(4).all(2).expand(b, t, t)
    idx = (keys - offset).reshape(b, n * v)
    rows = tokens.gather(1, idx[..., None].expand(b, n * v, t)).reshape(b, n, v, t)
    return rows.gather(3, (keys - offset)[:, :, None, :].expand(b, n, v, v))


def zero_rows(rows, row_mask):
    """Attention rows (B, T, ...) of padded text queries set to 0."""
    shape = row_mask.shape + (1,) * (rows.dim() - row_mask.dim())
    return rows * row_mask.reshape(shape).to(rows.dtype)


def positions_of(seq_index, original):
    """Positions in a sequence (seq_index: original index of each token) of the tokens with the
    given original indices (B, T), all of which that sequence holds: text tokens, or the later,
    smaller token set of a deeper layer."""
    return torch.searchsorted(seq_index.contiguous(), original.contiguous())


def positions_in_earlier(earlier_index, seq_index, vision_pos):
    """Where the current vision tokens (vision_pos (B, n, V) into a sequence whose original indices are
    seq_index) sit in an earlier, larger sequence of the same tokens (original indices earlier_index):
    (B, n, V) positions there, to read a signal of a layer that ran before tokens were removed."""
    b, n, v = vision_pos.shape
    original = token_features(seq_index, vision_pos).reshape(b, n * v)
    return positions_of(earlier_index, original).reshape(b, n, v)


def _crop_cells(token_patches, vision_pos, offset: int, side: int):
    """Each vision token's patch (crop x side^2 + cell) and its crop, row and column on the crop's side x side
    grid, (B x n, V) each (vision_pos (B, n, V) indexing the offset + T rows of crop_tokens)."""
    b, n, v = vision_pos.shape
    patch = token_patches[:, 0].index_select(0, (vision_pos - offset).reshape(-1)).reshape(b * n, v)
    cell = patch % (side * side)
    return patch, patch // (side * side), cell // side, cell % side


def crop_neighbours(token_patches, vision_pos, offset: int, side: int, crops: int, window: int):
    """(B, n, V, window^2 - 1): for each vision token (vision_pos (B, n, V) indexing the offset + T rows of
    crop_tokens), the token at each neighbour offset on its own crop's side x side patch grid (offsets in
    raster order, as blocks.grid_neighbours), -1 where that cell is off the crop or holds no token (a patch
    unpadded away, or a token pruned before). Windows never cross crops: each crop is its own image."""
    b, n, v = vision_pos.shape
    patch, crop, row, col = _crop_cells(token_patches, vision_pos, offset, side)
    owner = torch.full((b * n, crops * side * side), -1, dtype=torch.long, device=patch.device)
    owner.scatter_(1, patch, torch.arange(v, device=patch.device).expand(b * n, v))
    h = window // 2
    found = []
    for dr in range(-h, h + 1):
        for dc in range(-h, h + 1):
            if not (dr or dc):
                continue
            r, c = row + dr, col + dc
            inside = (r >= 0) & (r < side) & (c >= 0) & (c < side)
            at = crop * side * side + r.clamp(0, side - 1) * side + c.clamp(0, side - 1)
            found.append(torch.where(inside, owner.gather(1, at), -1))
    return torch.stack(found, -1).reshape(b, n, v, -1)


def crop_tiles(token_patches, vision_pos, offset: int, side: int, crops: int, window: int):
    """(B, n, tiles, window^2): the vision tokens (vision_pos (B, n, V) indexing the offset + T rows of
    crop_tokens) of each window x window tile of each crop's side x side patch grid (tiles crop after crop, in
    raster order; the last row / column of a crop's tiles may be smaller), each tile's tokens in raster order
    first, then -1 (a patch unpadded away or pruned before is no token). Tiles never cross crops."""
    b, n, v = vision_pos.shape
    patch, crop, row, col = _crop_cells(token_patches, vision_pos, offset, side)
    across, area = -(-side // window), window * window
    tile = (crop * across + row // window) * across + col // window
    slot = tile * area + (row % window) * window + col % window
    return _tile_table(slot, crops * across * across, area, b, n)


def grid_tiles(seq_index, vision_pos, tile_of: tuple, place_of: tuple, tiles: int, area: int):
    """(B, n, tiles, area): the vision tokens (vision_pos (B, n, V) into a sequence whose original token indices
    are seq_index) of each tile of one token grid, tile_of / place_of (per original token) its tile and its place
    in the tile (blocks.grid_tile_table); each tile's tokens in raster order first, then -1 (a token pruned
    before is no token)."""
    b, n, v = vision_pos.shape
    original = token_features(seq_index, vision_pos).reshape(b * n, v)
    tile = torch.tensor(tile_of, device=original.device)[original]
    place = torch.tensor(place_of, device=original.device)[original]
    return _tile_table(tile * area + place, tiles, area, b, n)


def _tile_table(slot, tiles: int, area: int, b: int, n: int):
    # (B x n, V) each token's slot (tile x area + place) -> (B, n, tiles, area) local token indices, present first
    v = slot.shape[-1]
    table = torch.full((b * n, tiles * area), -1, dtype=torch.long, device=slot.device)
    table = table.scatter(1, slot, torch.arange(v, device=slot.device).expand(b * n, v)).reshape(b * n, -1, area)
    present_first = (table < 0).to(torch.int8).argsort(dim=-1, stable=True)
    return table.gather(-1, present_first).reshape(b, n, -1, area)
