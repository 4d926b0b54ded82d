"""The selection rules of the methods' released code, transcribed in plain PyTorch from what that code
does (read, never copied), one sample at a time as the authors run them (batch size 1, indices into
the sample's own sequence). Nothing here imports graphprune. tests/test_authors.py feeds them the very
tensors graphprune's default passes score and compares the kept sets.

  * FastV (pkunlp-icler/FastV): head-averaged attention of the last token in layer K-1 to the image
    tokens, top `keep`, kept in ascending order.
  * VisionZip (dvlab-research/VisionZip), dominant tokens: CLS attention of the feature layer summed
    over heads, top `dominant` patches, ascending.
  * DART (ZichenWen1/DART, `get_retained_image_token`): pivots = top-L1-norm keys of the image and of
    the tokens after it; their sequence indices go into a Python `set`, which is iterated; every pivot
    removes the `max_num_trunction // P` candidates least cosine-similar to it (final-normed hidden
    states) from the pool; retained = the set minus the text pivots (vision pivots + picks).
  * MustDrop (liuting20/MustDrop): `conditional_pooling` (3x3 windows on the layer-0 output, window
    score = mean cosine over ordered pairs, the top-r windows with r = windows >= tau merge into their
    last member, emitted first in descending score, then the unmerged tokens ascending), the key set
    (top ceil(0.08 (N-1)) by head-averaged CLS attention) and `dual_attention_filter` (drop a token
    when its column sum < gamma x total AND its column max < alpha; the key set is re-added and the
    result `torch.unique`d, i.e. ascending). Filter `pruning_layers=[L, ...]`: layer L's own attention,
    layers L+1.. run reduced, positions renumbered 0..n-1, output-aware cache over layers L_0..L_last,
    decode positions = each layer's cache length (tests/reference.py lm_generate(positions="compact")).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def fastv_keep(last_row: Tensor, keep: int) -> list[int]:
    """last_row (V,) head-averaged attention of the last token to the image tokens."""
    return sorted(last_row.topk(keep).indices.tolist())


def visionzip_dominant(cls_attn: Tensor, dominant: int) -> list[int]:
    """cls_attn (H, V) or head-averaged (V,) CLS attention to the patches (a head sum ranks alike)."""
    score = cls_attn.sum(0) if cls_attn.dim() == 2 else cls_attn
    return sorted(score.topk(dominant).indices.tolist())


def dart_retained(keys: Tensor, last_state: Tensor, image_start: int, image_len: int, max_num_trunction: int,
                  pivot_image_token: int = 4, pivot_text_token: int = 4) -> list[int]:
    """keys (S, Hd) post-RoPE keys of layer K-1 (heads concatenated), last_state (S, D) its output after
    the final norm, for one sample's sequence (the instruction ends it). Returns the retained image
    tokens as indices local to the image, ascending."""
    token_topk = max_num_trunction // (pivot_image_token + pivot_text_token)
    img_norm = keys[image_start:image_start + image_len].abs().sum(-1)
    txt_norm = keys[image_start + image_len:].abs().sum(-1)
    image_indices = (img_norm.topk(pivot_image_token).indices + image_start).tolist()
    query_indices = (txt_norm.topk(pivot_text_token).indices + image_start + image_len).tolist()
    indices_set = set(image_indices + query_indices)
    valid = set(range(image_start, image_start + image_len))
    valid.difference_update(image_indices)
    for item in list(indices_set.copy()):
        pool = list(valid)
        neg_sim = -F.cosine_similarity(last_state[item], last_state[pool], dim=-1)
        picks = [pool[i] for i in neg_sim.topk(token_topk).indices.tolist()]
        indices_set.update(picks)
        valid.difference_update(picks)
    indices_set.difference_update(query_indices)
    return sorted(i - image_start for i in indices_set)


def dart_visit_order(pivots: list[int]) -> list[int]:
    """The order the authors' loop visits pivots inserted in this order (vision best-first, then text)."""
    return list(set(pivots))


def dual_attention_filter(attn: Tensor, gamma: float, alpha: float, key_set: Tensor | None = None) -> Tensor:
    """attn (T, V) head-averaged attention of the text tokens after the image (rows) to the image tokens.
    Returns the kept image tokens (ascending local indices): not (sum < gamma x total and max < alpha),
    plus the key set."""
    col_sum = attn.sum(0)
    dropped = (col_sum < col_sum.sum(0) * gamma) & (attn.max(0)[0] < alpha)
    kept = torch.arange(attn.shape[1])[~dropped]
    if key_set is not None:
        kept = torch.unique(torch.cat([kept, key_set]))
    return kept


def filter_select(gamma: float, alpha: float):
    """dual_attention_filter as a select fn for tests/reference.py's lm_generate, placed at layer L+1 so that
    ctx["attn"] is layer L's own attention (the authors' placement); one sample at a time, its key set the
    protected tokens."""

    def select(ctx: dict) -> Tensor:
        attn = ctx["attn"].float().mean(1)                    # (B, S, S)
        rows = []
        for b in range(attn.shape[0]):
            vis = ctx["vision_mask"][b].nonzero()[:, 0]
            txt = ctx["text_mask"][b].nonzero()[:, 0]
            keys = ctx["protected"][b][vis].nonzero()[:, 0]
            kept = dual_attention_filter(attn[b][txt][:, vis], gamma, alpha, keys)
            other = (~ctx["vision_mask"][b]).nonzero()[:, 0]
            rows.append(torch.cat([other, vis[kept]]).sort().values)
        return torch.stack(rows)

    return select


def window_scores(patches: Tensor, window: int = 3) -> tuple[Tensor, Tensor]:
    """patches (V, d) on a square grid divisible by `window` -> (similarity per window (W,), members (W, w*w)
    patch indices, windows in raster order, members row-major)."""
    v, _ = patches.shape
    g = math.isqrt(v)
    assert g * g == v and g % window == 0
    grid = torch.arange(v).view(g, g)
    members = grid.unfold(0, window, window).unfold(1, window, window).reshape(-1, window * window)
    x = patches[members]                                            # (W, n, d)
    sims = F.cosine_similarity(x[:, :, None, :], x[:, None, :, :], dim=-1)
    n = window * window
    sims = sims * (1 - torch.eye(n))
    return sims.sum((-1, -2)) / (n * (n - 1)), members


def conditional_pooling(h: Tensor, tau: float, window: int = 3) -> tuple[Tensor, Tensor]:
    """h (1 + V, d) layer-0 output (CLS first). Returns (merged sequence (1 + V', d), the patch each patch
    row stands for (V',): a merged window's last member, in the emitted order)."""
    cls, patches = h[:1], h[1:]
    score, members = window_scores(patches, window)
    r = int((score >= tau).sum())
    top = score.topk(r).indices                                     # merged windows, most similar first
    merged_members = members[top]
    rest = torch.ones(members.shape[0], dtype=torch.bool)
    rest[top] = False
    unmerged = members[rest].reshape(-1).sort().values
    dst = merged_members[:, -1]
    merged = patches[merged_members].mean(1)                        # sizes are 1: the plain mean
    out = torch.cat([cls, merged, patches[unmerged]])
    return out, torch.cat([dst, unmerged])


def key_set(cls_attn: Tensor, ratio: float = 0.08) -> Tensor:
    """cls_attn (V',) head-averaged CLS attention to the (merged) patches -> top ceil(ratio x V') indices."""
    return cls_attn.topk(math.ceil(ratio * cls_attn.shape[0])).indices
