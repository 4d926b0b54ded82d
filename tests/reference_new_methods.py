"""Independent references of VisionZip, DivPrune, CDPruner, VisPruner and PyramidDrop on tiny LLaVA.

Plain PyTorch written from each paper's equations and from what its authors' released code does
(read, not copied: one image at a time, loops where their code loops). The vision tower, projector
and language model run by hand through tests/reference.py; nothing here calls graphprune or a
Hugging Face module's forward, except where the vision encoder runs inside the model (Qwen2.5-VL,
LLaVA-NeXT: choose_on_input_embeds takes the projected tokens from the model's own get_image_features /
get_video_features through reference_families, the selection and the language model being under test).
Where graphprune departs from the authors by design (documented in docs/methods.md), the reference says
so next to the line.
"""
from __future__ import annotations

import reference as R
import reference_families as RF
import torch
from torch import Tensor

# ----------------------------------------------------------------------------------- vision pieces

@torch.no_grad()
def vision_parts(model, pixel_values: Tensor) -> dict:
    """The feature layer's pieces per image: ``pre`` (n, V, d) patch features entering the projector,
    ``cls_attn`` (n, V) head-averaged CLS attention, ``keys`` (n, V, H, hd) that layer's patch keys,
    and ``features`` (n, V, D) the projector's output."""
    vc = model.config.vision_config
    hs_index = model.config.vision_feature_layer % (vc.num_hidden_layers + 1)
    assert hs_index >= 2, "the keys are recomputed from the input of the feature layer"
    seen = {}

    def grab(h, ctx):
        seen["h"] = h
        return h

    out = R.llava_vision(model, pixel_values, after_layer={hs_index - 2: grab})
    w = R._weights(model)
    p = "model.vision_tower."
    if p + "embeddings.class_embedding" not in w:
        p = "model.vision_tower.vision_model."
    lp = f"{p}encoder.layers.{hs_index - 1}."
    y = R._layer_norm(seen["h"], w[lp + "layer_norm1.weight"], w[lp + "layer_norm1.bias"], vc.layer_norm_eps)
    k = R._linear(y, w, lp + "self_attn.k_proj")[:, 1:]
    n, v, _ = k.shape
    out["keys"] = k.view(n, v, vc.num_attention_heads, -1)
    return out


def project(model, pre: Tensor) -> Tensor:
    """LLaVA's two-layer projector, by hand."""
    w = R._weights(model)
    act = R._act(model.config.projector_hidden_act)
    return R._linear(act(R._linear(pre, w, "model.multi_modal_projector.linear_1")), w,
                     "model.multi_modal_projector.linear_2")


def instruction_embeds(model, example) -> list[Tensor]:
    """Per sample, the LLM input embeddings of the real tokens after the last image token."""
    w = R._weights(model)["model.language_model.embed_tokens.weight"]
    img = example.input_ids == model.config.image_token_id
    mask = example.attention_mask if example.attention_mask is not None else torch.ones_like(example.input_ids)
    rows = []
    for b in range(example.input_ids.shape[0]):
        after = int(img[b].nonzero().max()) + 1
        ids = example.input_ids[b, after:][mask[b, after:].bool()]
        rows.append(w[ids])
    return rows


def _per_image(example, n_images: int) -> list[int]:
    """Sample of each image (images go to samples in order)."""
    b = example.input_ids.shape[0]
    return [i // (n_images // b) for i in range(n_images)]


# ------------------------------------------------------------------------------------------ VisionZip

@torch.no_grad()
def visionzip(model, example, keep: int, contextual: int | None = None, heads_mean: bool = False,
              authors_order: bool = True) -> dict:
    """VisionZip (Yang et al. 2024) per image, as the authors' CLIP tower does it.

    dominant: top (keep - contextual) patches by head-summed CLS attention of the feature layer, kept in
    raster order (the authors also keep the CLS token itself as one of them; graphprune keeps patches only).
    contextual: the rest in raster order; targets = every (R // c)-th of them, the first c; every other
    token joins the target its key is most cosine-similar to (keys averaged over heads with
    ``heads_mean``, else heads concatenated); contextual token = target features + mean of its members.
    Returns ``features`` (n, keep, D) in the LLM's order and ``patch_index`` (n, keep) ascending slots.
    """
    parts = vision_parts(model, example.pixel_values)
    pre, cls, keys = parts["pre_features"], parts["cls_attn"], parts["keys"]
    c = round(keep * 5 / 32) if contextual is None else contextual
    feats, slots, doms, tgts = [], [], [], []
    for i in range(pre.shape[0]):
        v = pre.shape[1]
        dom = torch.topk(cls[i], keep - c).indices.sort().values
        rest = torch.tensor([j for j in range(v) if j not in set(dom.tolist())])
        metric = keys[i].mean(1) if heads_mean else keys[i].reshape(v, -1)
        metric = metric[rest]
        metric = metric / metric.norm(dim=-1, keepdim=True)
        step = max(1, len(rest) // c)
        target = list(range(0, len(rest), step))[:c]
        others = [j for j in range(len(rest)) if j not in target]
        sim = metric[others] @ metric[target].t()
        best = sim.argmax(1)
        ctx = []
        for t in range(c):
            members = [others[m] for m in range(len(others)) if int(best[m]) == t]
            mean = pre[i, rest[members]].mean(0) if members else torch.zeros(pre.shape[-1])
            ctx.append(pre[i, rest[target[t]]] + mean)
        tokens = torch.cat([pre[i, dom], torch.stack(ctx)]) if c else pre[i, dom]
        slot = torch.cat([dom, rest[target]]) if c else dom
        if authors_order:
            slot = slot.sort().values          # the LLM reads [dominant, contextual] in this order
        else:
            order = slot.argsort()
            slot, tokens = slot[order], tokens[order]
        feats.append(project(model, tokens))
        slots.append(slot)
        doms.append(dom)
        tgts.append(rest[target])
    return {"features": torch.stack(feats), "patch_index": torch.stack(slots), "dominant": torch.stack(doms),
            "targets": torch.stack(tgts)}


# ------------------------------------------------------------------------------------------- DivPrune

def divprune_indices(x: Tensor, count: int) -> Tensor:
    """The authors' greedy max-min selection on one image's tokens x (V, D): chosen indices in pick order.

    Distance = 1 - cosine similarity. Step 0 scores each token by the second-smallest entry of its column
    (its nearest other token); step i > 0 by the smallest entry of its column over the chosen rows.
    """
    xn = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - xn @ xn.t()
    chosen = []
    for i in range(count):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1, :]
        else:
            scores = dist[torch.tensor(chosen)].min(dim=0).values
        chosen.append(int(torch.argmax(scores)))
    return torch.tensor(chosen)


@torch.no_grad()
def divprune(model, example, keep: int | float) -> dict:
    """DivPrune on the projected vision tokens of each image; ``features`` / ``patch_index`` in raster order."""
    feats = vision_parts(model, example.pixel_values)["features"]
    v = feats.shape[1]
    count = keep if isinstance(keep, int) else int(round(keep * v))
    idx = torch.stack([divprune_indices(f, count).sort().values for f in feats])
    return {"features": feats.gather(1, idx[..., None].expand(-1, -1, feats.shape[-1])), "patch_index": idx}


# ------------------------------------------------------------------------------------------- CDPruner

def dpp_greedy(kernel: Tensor, count: int) -> list[int]:
    """Fast greedy MAP inference of a DPP (Chen et al. 2018), as the authors run it on one image's kernel
    L (N, N): incremental Cholesky rows c_i, marginal gains d_j^2; pick argmax d^2, then
    e = (L[j] - c[:i, j] @ c[:i]) / sqrt(d_j^2), d^2 -= e^2, d_j^2 = -inf."""
    n = kernel.shape[0]
    cis = torch.zeros(count, n)
    di2s = torch.diagonal(kernel).clone()
    chosen = []
    for i in range(count):
        j = int(torch.argmax(di2s))
        chosen.append(j)
        eis = (kernel[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(di2s[j])
        cis[i] = eis
        di2s = di2s - eis ** 2
        di2s[j] = -float("inf")
    return chosen


def cdpruner_indices(f: Tensor, text: Tensor, count: int) -> list[int]:
    """CDPruner's choice on one image's projected tokens f (V, D) given its instruction embeddings text
    (T, D): relevance = -mean_m cos(f_i, text_m), min-max normalised (+1e-6 in the numerator); kernel
    L = r_i cos(f_i, f_j) r_j; the DPP's greedy picks, ascending."""
    fn = f / f.norm(dim=-1, keepdim=True)
    similarity = fn @ fn.t()
    t = text / text.norm(dim=-1, keepdim=True)
    relevance = (-(fn @ t.t())).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance[:, None] * similarity * relevance[None, :]
    return sorted(dpp_greedy(kernel, count))


@torch.no_grad()
def cdpruner(model, example, keep: int | float) -> dict:
    """CDPruner (conditional DPP) per image, with the LLM's input embeddings of the instruction standing
    in for CLIP text features and the projected vision tokens for CLIP image embeds (graphprune's choice:
    LLaVA has no CLIP text tower). relevance = -mean_m cos(image_i, text_m), min-max normalised over the
    image's tokens (+1e-6 in the numerator); kernel L = r_i cos(f_i, f_j) r_j on the projected features."""
    feats = vision_parts(model, example.pixel_values)["features"]
    texts = instruction_embeds(model, example)
    owner = _per_image(example, feats.shape[0])
    v = feats.shape[1]
    count = keep if isinstance(keep, int) else int(round(keep * v))
    idx = torch.stack([torch.tensor(cdpruner_indices(f, texts[owner[i]], count)) for i, f in enumerate(feats)])
    return {"features": feats.gather(1, idx[..., None].expand(-1, -1, feats.shape[-1])), "patch_index": idx}


# ------------------------------------------------- projected-token methods on the LLM's input embeddings

@torch.no_grad()
def choose_on_input_embeds(model, example, units: int, pick) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A projected-token method where the vision encoder runs in the model (Qwen2.5-VL, LLaVA-NeXT): the
    projected tokens are the LLM's input embeddings at the prunable vision positions
    (reference_families.family_inputs). Per sample, its vision tokens split into `units` equal blocks in
    prompt order (images, video frames); pick(block embeddings (V, D), instruction embeddings (T, D)) gives
    each block's kept local indices; every other token stays. Returns keep (B, S') prompt indices and the
    embeddings, attention mask and (original) positions there."""
    emb, am, pos, vm = RF.family_inputs(model, example)
    text = RF.instruction_mask(model, example)     # after each image's last slot (LLaVA-NeXT: its closing newline)
    rows = []
    for b in range(emb.shape[0]):
        blocks = vm[b].nonzero(as_tuple=True)[0].view(units, -1)
        chosen = [blk[torch.as_tensor(pick(emb[b, blk], emb[b, text[b]]))] for blk in blocks]
        rows.append(torch.cat([(~vm[b]).nonzero(as_tuple=True)[0], *chosen]).sort().values)
    keep = torch.stack(rows)
    kept_pos = pos.gather(-1, keep if pos.dim() == 2 else keep[None].expand(pos.shape[0], -1, -1))
    return keep, emb.gather(1, keep[..., None].expand(-1, -1, emb.shape[-1])), am.gather(1, keep), kept_pos


# ------------------------------------------------------------------------------------------ VisPruner

@torch.no_grad()
def vispruner(model, example, keep: int, important_ratio: float = 0.5) -> dict:
    """VisPruner per image, as the authors' encode_images: important = top int(keep * ratio) by
    head-averaged CLS attention of the feature layer; the rest (in descending attention) lose up to 8
    duplicates per round: even places A, odd places B, A's best cosine match in B, A's highest-matching
    tokens go, survivors (in descending match order after the dropped ones) then B."""
    parts = vision_parts(model, example.pixel_values)
    pre, cls = parts["pre_features"], parts["cls_attn"]
    n_imp = int(keep * important_ratio)
    n_div = keep - n_imp
    rows = []
    for i in range(pre.shape[0]):
        order = cls[i].argsort(descending=True)
        important, residual = order[:n_imp], order[n_imp:]
        x = pre[i] / pre[i].norm(dim=-1, keepdim=True)
        while n_div > 0:
            r = min(8, len(residual) - n_div)
            if r <= 0:
                break
            a, b = residual[::2], residual[1::2]
            scores = (x[a] @ x[b].t()).max(dim=-1).values
            distinct = scores.argsort(descending=True)[r:]
            residual = torch.cat([a[distinct], b])
        chosen = torch.cat([important, residual]) if n_div > 0 else important
        rows.append(chosen.sort().values)
    idx = torch.stack(rows)
    feats = parts["features"]
    return {"features": feats.gather(1, idx[..., None].expand(-1, -1, feats.shape[-1])), "patch_index": idx}


# ---------------------------------------------------------------------------------------- PyramidDrop

def pyramiddrop_selects(layers, ratios, v: int, images: int = 1) -> dict:
    """PyramidDrop's stage boundaries for R.lm_generate: {layer: select}. At each boundary every image
    keeps its int(v * ratio) tokens most attended by the last instruction token (head-averaged softmax
    row; graphprune reads the row of the layer before the boundary, the authors that of the boundary
    layer), in prompt order; text tokens stay."""
    selects = {}
    for layer, ratio in zip(layers, ratios):
        count = int(v * ratio)

        def select(ctx, count=count):
            row = ctx["attn"][:, :, -1, :].mean(dim=1)                    # (B, S)
            vm = ctx["vision_mask"].bool()
            rows = []
            for b in range(row.shape[0]):
                keep = [(~vm[b]).nonzero()[:, 0]]
                for block in R.image_blocks(vm[b], images):
                    keep.append(block[row[b, block].topk(count).indices])
                rows.append(torch.cat(keep).sort().values)
            return torch.stack(rows)

        selects[layer] = select
    return selects


# ------------------------------------------------------------------------------------------ SparseVLM

def sparsevlm_raters(vision: Tensor, text: Tensor) -> Tensor:
    """The authors' text raters of one image: vision (V, D) and instruction (T, D) input embeddings;
    m = softmax over the instruction of v . t, averaged over the vision tokens; raters: m > mean(m)
    (all instruction tokens when none is above: graphprune's rule for a tie)."""
    m = (vision @ text.t()).softmax(1).mean(0)
    idx = torch.where(m > m.mean())[0]
    return idx if idx.numel() else torch.arange(text.shape[0])


def density_peaks_merge(x: Tensor, clusters: int) -> Tensor:
    """The authors' cluster_and_merge on one image's recycled tokens x (M, D), without their random
    tie-break noise: (clusters, D) tokens, in the order of the centres' scores. Ties are common (the two
    tokens of a mutual-nearest pair have equal density); the authors' noise breaks them at random, here
    (graphprune's documented rule) the lower index goes first."""
    dist = (x[:, None, :] - x[None, :, :]).norm(dim=-1, p=2) / x.shape[1] ** 0.5
    nearest = torch.topk(dist, k=clusters, dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    denser = (density[None, :] > density[:, None]).float()
    parent = (dist * denser + dist.max() * (1 - denser)).min(dim=-1).values
    centres = torch.sort(parent * density, descending=True, stable=True).indices[:clusters]
    assign = dist[centres].argmin(dim=0)
    assign[centres] = torch.arange(clusters)
    out = torch.zeros(clusters, x.shape[1])
    for c in range(clusters):
        members = assign == c
        out[c] = (x[members] * (1.0 / (members.sum() + 1e-6))).sum(0)
    return out


def sparsevlm_layer(rows: Tensor, hidden: Tensor, scale: float, bias: float, capacity: int | None,
                    recycle: bool = True) -> dict:
    """One sparsification of one image, as the authors' attn_postprocess_rank + recycling: rows (R, V)
    the raters' head-averaged attention to the current vision tokens, hidden (V, D) the layer's output.
    Returns ``kept`` (ascending), ``recycled`` (the tokens clustered) and ``tokens``: [kept, clusters].
    ``capacity``: graphprune's static cap (kept dropped, lowest relation first, until kept + clusters fit)."""
    v = rows.shape[1]
    rank = int(torch.linalg.matrix_rank(rows.float()))
    relation = rows.mean(0)
    count = v if v - rank == 0 else min(int(rank * scale + bias), v - 1)

    def clusters_of(deleted):
        return 0 if deleted == 0 or not recycle else int((int(deleted * 0.3) + 1) / 10) + 1

    if capacity is not None:
        while count > 0 and count + clusters_of(v - count) > capacity:
            count -= 1
    kept = torch.topk(relation, count).indices.sort().values if count else torch.zeros(0, dtype=torch.long)
    tokens, recycled = hidden[kept], torch.zeros(0, dtype=torch.long)
    if count < v and recycle:
        deleted = torch.tensor([j for j in range(v) if j not in set(kept.tolist())])
        m = int(deleted.numel() * 0.3) + 1
        recycled = deleted[relation[deleted].topk(m).indices]
        n_clusters = int(m / 10) + 1
        if capacity is not None:
            n_clusters = min(n_clusters, capacity - count)
        tokens = torch.cat([tokens, density_peaks_merge(hidden[recycled], n_clusters)])
    return {"kept": kept, "recycled": recycled, "tokens": tokens}


def sparsevlm_selects(inputs_embeds: Tensor, vision_mask: Tensor, attention_mask: Tensor, layers, scale: float,
                      bias: float, capacity: int, images: int = 1, recycle: bool = True, log: list | None = None,
                      in_place: bool = False) -> dict:
    """SparseVLM's sparsification layers for R.lm_generate(positions="compact"): {L + 1: select}. Raters come
    from the input embeddings; at each layer every image's block becomes [kept, clusters] followed by
    unused (masked) slots up to the static capacity, so the language model sees the authors' sequence.
    ``in_place`` (graphprune's positions="keep", no recycling; for R.lm_generate(positions="keep")): the kept
    tokens stay in their own slots, the block's lowest other slots fill the capacity, masked.
    Each decision is appended to ``log`` (sample, image, layer, sparsevlm_layer's dict)."""
    text = R.text_after_image(vision_mask, attention_mask)
    raters = []
    for b in range(inputs_embeds.shape[0]):
        t = inputs_embeds[b, text[b]]
        raters.append([sparsevlm_raters(inputs_embeds[b, blk], t) for blk in R.image_blocks(vision_mask[b], images)])
    selects = {}
    for layer in layers:

        def select(ctx, layer=layer):
            attn = ctx["attn"].mean(1)                                       # (B, S, S) head-averaged
            keep_rows, hidden_rows, valid_rows = [], [], []
            for b in range(attn.shape[0]):
                blocks = R.image_blocks(ctx["vision_mask"][b], images)
                cap = min(capacity, blocks.shape[1])
                text_rows = ctx["text_mask"][b].nonzero()[:, 0]
                keep = [(~ctx["vision_mask"][b].bool()).nonzero()[:, 0]]
                h = ctx["hidden"][b].clone()
                valid = torch.ones(h.shape[0], dtype=torch.bool)
                for i, blk in enumerate(blocks):
                    cur = blk[ctx["attention_mask"][b, blk].bool()]             # the block's tokens in use
                    rows = attn[b][text_rows[raters[b][i]]][:, cur]
                    out = sparsevlm_layer(rows, ctx["hidden"][b, cur], scale, bias, cap, recycle)
                    if log is not None:
                        log.append((b, i, layer, out))
                    n = out["tokens"].shape[0]
                    if in_place:
                        kept = set(cur[out["kept"]].tolist())
                        unused = torch.tensor([j for j in blk.tolist() if j not in kept][:cap - n], dtype=torch.long)
                        valid[unused] = False
                        keep.append(torch.cat([cur[out["kept"]], unused]))
                        continue
                    h[blk[:n]] = out["tokens"]
                    valid[blk[n:cap]] = False
                    keep.append(blk[:cap])
                k_idx = torch.cat(keep).sort().values
                keep_rows.append(k_idx)
                hidden_rows.append(h[k_idx])
                valid_rows.append(valid[k_idx])
            return {"keep": torch.stack(keep_rows), "hidden": torch.stack(hidden_rows), "valid": torch.stack(valid_rows)}

        selects[layer + 1] = select
    return selects


# ----------------------------------------------------------------------------------------------- ToMe

def tome_match(metric: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """The authors' bipartite_soft_matching on one image's sequence metric (t, c), CLS at row 0 (class_token):
    A = even rows, B = odd rows, cosine scores, CLS's row -inf; A rows ranked by their best score
    (descending; ties to the lower row, where the authors' argsort is unstable); the first r merge.
    Returns (unmerged A places ascending, merged A places, their B places)."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[::2], metric[1::2]
    scores = a @ b.t()
    scores[0, :] = -float("inf")
    node_max, node_idx = scores.max(dim=-1)
    edge = torch.sort(node_max, descending=True, stable=True).indices
    src = edge[:r]
    return edge[r:].sort().values, src, node_idx[src]


@torch.no_grad()
def tome_vision(model, pixel_values: Tensor, layers, r: int | None = None, keep: int | None = None,
                heads_mean: bool = False, proportional: bool = True) -> dict:
    """CLIP vision tower by hand with ToMe merges after each of ``layers`` (graphprune's placement: after the
    block, with that block's keys; the authors merge between its attention and MLP), the authors'
    merge_wavg (x = sum(size x) / sum(size), sizes summed; unmerged tokens (x size) / size), order
    [unmerged A, B] and, with ``proportional``, the authors' proportional attention (log(size) of each key
    added to the logits of every later layer). Per layer r, or ceil((V - keep) / layers left), at most
    V // 2. Returns ``features`` (n, V', D) in the merged order, ``patch_index`` (n, V') the first V' slots
    (the LLM reads them in that order), ``representative`` (n, V') the original patch whose slot each token
    holds, ``sources`` (per image, per token, the sorted original patches it merges) and ``sizes``."""
    vc = model.config.vision_config
    w = R._weights(model)
    p = "model.vision_tower."
    if p + "embeddings.class_embedding" not in w:
        p = "model.vision_tower.vision_model."
    eps, n_heads, d = vc.layer_norm_eps, vc.num_attention_heads, vc.hidden_size
    hd = d // n_heads
    act = R._act(vc.hidden_act)
    hs_index = model.config.vision_feature_layer % (vc.num_hidden_layers + 1)
    x = pixel_values.float()
    patches = torch.nn.functional.conv2d(x, w[p + "embeddings.patch_embedding.weight"], stride=vc.patch_size)
    patches = patches.flatten(2).transpose(1, 2)
    n, v = patches.shape[:2]
    h = torch.cat([w[p + "embeddings.class_embedding"].expand(n, 1, d), patches], 1)
    h = h + w[p + "embeddings.position_embedding.weight"][None]
    h = R._layer_norm(h, w[p + "pre_layrnorm.weight"], w[p + "pre_layrnorm.bias"], eps)
    out_feats, out_rep, out_src, out_size = [], [], [], []
    for img in range(n):
        x = h[img]
        size = torch.ones(v + 1, 1)
        rep = list(range(-1, v))                         # CLS = -1
        src = [[j] for j in rep]
        for i in range(hs_index):
            lp = f"{p}encoder.layers.{i}."
            y = R._layer_norm(x, w[lp + "layer_norm1.weight"], w[lp + "layer_norm1.bias"], eps)
            t = y.shape[0]
            q = R._linear(y, w, lp + "self_attn.q_proj").view(t, n_heads, hd).transpose(0, 1)
            k = R._linear(y, w, lp + "self_attn.k_proj").view(t, n_heads, hd).transpose(0, 1)
            val = R._linear(y, w, lp + "self_attn.v_proj").view(t, n_heads, hd).transpose(0, 1)
            logits = (q @ k.transpose(-1, -2)) * hd ** -0.5
            if proportional:
                logits = logits + size.log()[None, None, :, 0]
            o = logits.softmax(-1) @ val
            x = x + R._linear(o.transpose(0, 1).reshape(t, d), w, lp + "self_attn.out_proj")
            y = R._layer_norm(x, w[lp + "layer_norm2.weight"], w[lp + "layer_norm2.bias"], eps)
            x = x + R._linear(act(R._linear(y, w, lp + "mlp.fc1")), w, lp + "mlp.fc2")
            if i not in layers:
                continue
            patches_now = t - 1
            want = r if r is not None else -(-max(patches_now - keep, 0) // (len(layers) - list(layers).index(i)))
            count = min(want, patches_now // 2)
            if count == 0:
                continue
            metric = k.mean(0) if heads_mean else k.transpose(0, 1).reshape(t, -1)
            unm, merged, dst = tome_match(metric, count)
            xs = x * size
            a_x, b_x = xs[::2], xs[1::2].clone()
            a_s, b_s = size[::2], size[1::2].clone()
            b_x.index_add_(0, dst, a_x[merged])
            b_s.index_add_(0, dst, a_s[merged])
            a_rep, b_rep = rep[::2], rep[1::2]
            a_src, b_src = src[::2], [list(s) for s in src[1::2]]
            for m_, d_ in zip(merged.tolist(), dst.tolist()):
                b_src[d_] = sorted(b_src[d_] + a_src[m_])
            size = torch.cat([a_s[unm], b_s])
            x = torch.cat([a_x[unm], b_x]) / size
            rep = [a_rep[j] for j in unm.tolist()] + b_rep
            src = [a_src[j] for j in unm.tolist()] + b_src
        out_feats.append(project(model, x[1:]))
        out_rep.append(torch.tensor(rep[1:]))
        out_src.append(src[1:])
        out_size.append(size[1:, 0])
    feats = torch.stack(out_feats)
    return {"features": feats, "patch_index": torch.arange(feats.shape[1]).expand(n, -1),
            "representative": torch.stack(out_rep), "sources": out_src, "sizes": torch.stack(out_size)}
