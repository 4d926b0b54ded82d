"""Independent references for DART (Wen et al. 2025, "Stop looking for important tokens ... duplication
matters more") and the random baseline, written from docs/methods.md (the contract) in plain PyTorch.

Nothing here imports graphprune. ``dart_select`` / ``random_select`` are select functions for
``reference.lm_generate(selects={K: fn})``; ``random_patches`` picks patches for the vision stage.

Readings of the contract that it leaves open (stated again where they apply):
  * images: a sample's vision tokens are split into images by contiguous runs of ``vision_mask``
    (``images=n`` splits them into n equal blocks instead); every image has the same count V.
  * non-vision tokens (system prompt, instruction, left padding) are always kept, like FastV's reference.
  * ``attn_max`` / ``attn_min``: the query is the last row of layer K-1's attention (the last prompt
    token; prompts are left padded). ``attn_min`` orders *both* vision and text pivots lowest first.
  * ``random`` criterion: one generator ``torch.Generator().manual_seed(seed)`` draws the vision scores
    ``torch.rand((B, images, V))`` first, then the text scores ``torch.rand((B, T))`` over the instruction
    slots (T = the longest instruction in the batch; slot t is a sample's t-th instruction token).
  * a budget smaller than ``|vision pivots ∪ protected|`` (or a pivot count larger than V) is rejected
    with ``ValueError`` rather than silently keeping more than ``keep``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # tests/ on sys.path (conftest puts it there), as the test modules import it
    from reference import image_blocks
except ImportError:
    from tests.reference import image_blocks

__all__ = ["dart_select", "dart_image", "random_select", "random_patches", "CRITERIA"]

CRITERIA = ("k_norm", "v_norm", "attn_max", "attn_min", "random")


def _split_budget(r: int, p: int) -> list[int]:
    """Picks per pivot: pivot i takes r // p, plus one for the first r % p pivots."""
    return [r // p + (1 if i < r % p else 0) for i in range(p)]


def dart_image(feats: Tensor, vis_score: Tensor, text_score: Tensor, text_feats: Tensor, keep: int,
               vision_pivots: int, text_pivots: int, protected: Tensor | None = None) -> Tensor:
    """DART on one image; returns the retained positions into the image's V tokens, ascending.

    feats (V, D) normed hidden states of the image's vision tokens; vis_score (V,) / text_score (T,)
    pivot scores, higher = chosen first (``attn_min`` passes negated attention); text_feats (T, D);
    protected (V,) bool or None.
    """
    v = feats.shape[0]
    if text_score.numel() < text_pivots:
        raise ValueError(f"DART needs at least {text_pivots} text tokens, got {text_score.numel()}")
    if vision_pivots > v or keep > v:
        raise ValueError(f"image has {v} vision tokens: cannot take {vision_pivots} pivots / keep {keep}")
    prot = torch.zeros(v, dtype=torch.bool) if protected is None else protected.bool()
    # topk returns indices in descending score order: that is also the pivots' visiting order
    vp = torch.topk(vis_score.float(), vision_pivots).indices
    tp = torch.topk(text_score.float(), text_pivots).indices
    forced = prot.clone()
    forced[vp] = True  # vision pivots ∪ protected: retained outright
    r = keep - int(forced.sum())
    if r < 0:
        raise ValueError(f"keep={keep} is smaller than |vision pivots ∪ protected| = {int(forced.sum())}")
    pool = ~forced  # candidates
    unit = F.normalize(feats.float(), dim=-1)
    pivots = torch.cat([unit[vp], F.normalize(text_feats.float(), dim=-1)[tp]])  # (P, D) in visiting order
    retained = forced.clone()
    for i, n_pick in enumerate(_split_budget(r, pivots.shape[0])):
        if n_pick == 0:
            continue
        neg_cos = -(unit @ pivots[i])  # least similar first
        neg_cos = neg_cos.masked_fill(~pool, float("-inf"))
        pick = torch.topk(neg_cos, n_pick).indices
        retained[pick] = True
        pool[pick] = False
    out = retained.nonzero(as_tuple=True)[0]
    assert out.numel() == keep
    return out


def _pivot_scores(ctx: dict, criterion: str, seed: int, blocks: list[Tensor]) -> Tensor:
    """(B,S) pivot score of every token of the current sequence (higher = chosen first)."""
    b, s = ctx["vision_mask"].shape
    if criterion == "k_norm":
        k = ctx["keys"]  # (B,KV,S,hd): L1 norm over all heads' entries = the heads concatenated
        return k.float().abs().sum(dim=(1, 3))
    if criterion == "v_norm":
        return ctx["values"].float().abs().sum(dim=(1, 3))
    if criterion in ("attn_max", "attn_min"):
        a = ctx["attn"][:, :, -1, :].float().mean(dim=1)  # (B,S): last prompt token's attention
        return a if criterion == "attn_max" else -a
    if criterion == "random":
        g = torch.Generator().manual_seed(seed)
        n_img, v = blocks[0].shape
        u_vis = torch.rand((b, n_img, v), generator=g)
        tm = ctx["text_mask"].bool()
        # text tokens: a second draw (B, T) over the instruction slots, T = the longest instruction
        u_txt = torch.rand((b, int(tm.sum(1).max())), generator=g)
        u = torch.zeros(b, s)
        for bi in range(b):
            u[bi, blocks[bi].reshape(-1)] = u_vis[bi].reshape(-1)
            text = tm[bi].nonzero(as_tuple=True)[0]
            u[bi, text] = u_txt[bi, :text.numel()]
        return u
    raise ValueError(f"unknown DART criterion {criterion!r}; expected one of {CRITERIA}")


def dart_select(keep: int, vision_pivots: int = 4, text_pivots: int = 4, criterion: str = "k_norm",
                seed: int = 0, images: int | None = None):
    """DART select fn for ``lm_generate`` (docs/methods.md, "DART"): keeps exactly ``keep`` vision tokens per
    image (pivots + protected + least-duplicated picks) and every non-vision token."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown DART criterion {criterion!r}; expected one of {CRITERIA}")

    def select(ctx: dict) -> Tensor:
        vm = ctx["vision_mask"].bool()
        tm = ctx["text_mask"].bool()
        prot = ctx["protected"].bool()
        b = vm.shape[0]
        blocks = [image_blocks(vm[bi], images) for bi in range(b)]
        assert len({tuple(x.shape) for x in blocks}) == 1, "samples differ in images / tokens per image"
        score = _pivot_scores(ctx, criterion, seed, blocks)
        feats = ctx["norm"](ctx["hidden"].float())
        rows = []
        for bi in range(b):
            text = tm[bi].nonzero(as_tuple=True)[0]
            kept = [(~vm[bi]).nonzero(as_tuple=True)[0]]
            for blk in blocks[bi]:
                local = dart_image(feats[bi, blk], score[bi, blk], score[bi, text], feats[bi, text], keep,
                                   vision_pivots, text_pivots, prot[bi, blk])
                kept.append(blk[local])
            rows.append(torch.cat(kept).sort().values)
        return torch.stack(rows)

    return select


def random_select(keep: int, seed: int = 0, images: int | None = None):
    """Random baseline in the prefill: per image keep the top ``keep`` of ``u = torch.rand((B, images, V),
    generator=torch.Generator().manual_seed(seed))``, protected tokens at ``+inf``; non-vision tokens kept."""

    def select(ctx: dict) -> Tensor:
        vm = ctx["vision_mask"].bool()
        prot = ctx["protected"].bool()
        b = vm.shape[0]
        blocks = torch.stack([image_blocks(vm[bi], images) for bi in range(b)])  # (B, images, V)
        u = torch.rand(tuple(blocks.shape), generator=torch.Generator().manual_seed(seed))
        p = torch.stack([prot[bi, blocks[bi]] for bi in range(b)])
        u = u.masked_fill(p, float("inf"))
        top = torch.topk(u, keep, dim=-1).indices  # (B, images, keep)
        rows = []
        for bi in range(b):
            chosen = torch.gather(blocks[bi], 1, top[bi]).reshape(-1)
            rows.append(torch.cat([(~vm[bi]).nonzero(as_tuple=True)[0], chosen]).sort().values)
        return torch.stack(rows)

    return select


def random_patches(n_images: int, v: int, keep: int, seed: int = 0, protected: Tensor | None = None) -> Tensor:
    """Random baseline in the vision stage: (n_images, keep) ascending patch indices, the top ``keep`` of
    ``torch.rand((n_images, 1, V), generator=torch.Generator().manual_seed(seed))`` (each image is its own
    sample with one image); ``protected`` (n_images, V) bool patches score ``+inf``."""
    u = torch.rand((n_images, 1, v), generator=torch.Generator().manual_seed(seed))[:, 0]
    if protected is not None:
        u = u.masked_fill(protected.bool(), float("inf"))
    return torch.topk(u, keep, dim=-1).indices.sort(dim=-1).values
