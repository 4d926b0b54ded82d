"""Train graphprune's small LLaVA-architecture VLM from scratch on the synthetic VQA set.

The model is a standard `LlavaForConditionalGeneration` (CLIP-style vision tower with CLS at
336 px / patch 14 -> 576 image tokens, `vision_feature_layer=-2`, strategy "default", GELU MLP
projector, 8-layer Llama LM) over the closed word-level `graphprune.tools.vqa.Vocab`, so it loads
offline with `from_pretrained` and every pruning method runs on it as on LLaVA-1.5. The configs
and `build_model` live in `graphprune.tools.zoo` (`zoo.CONFIGS`, `zoo.build_model`); the shipped
weights (`graphprune/tools/weights/vqa_llava/`, loaded by `graphprune.tools.zoo.vqa_llava()`) come from:

    python examples/train_vqa_model.py --steps 4300 --minutes 88 --vision-steps 4500 \\
        --vision-minutes 22 --vision-batch 32 --vision-lr 6e-3 --vision-keep 160 --pos-init sincos \\
        --proj-steps 400 --proj-aux-weight 1 --freeze-vision --lm-keep 128 --qk-std 0.125 \\
        --balance-types --type-share position=2 --type-share count=1.5 --attn-weight 1 --attn-layer 3 \\
        --batch 8 --questions 24 --lr 2e-3 --eval-n 250 --eval-every 500 \\
        --test-n 1000 --seed 0 --data-seed 0 --threads 2 --out graphprune/tools/weights/vqa_llava

(87.6 training minutes on 2 idle CPU cores, no time cap cut in, so the run is reproducible from
its seeds: phase 1 20.4 min, 144k images at ~118 images/s; phase 1b 3.3 min; phase 2 63.9 min,
34k images x 24 questions at ~9.0 images/s. 90.5% on 1000 test questions, seed 0 -- color 100%,
count 73%, exist 99%, position 89%, read 92%; validation 0.61 at step 500, 0.78 at 1000, 0.84 at
2000, 0.90 at 3000, 0.92 at 4000, 0.93 at 4300. See train_meta.json for the history.)

Recipe (all on the CPU, fp32, 2 threads, data streamed with `vqa.sample_at("train", i, seed)`
in a fixed order, so a run is reproducible from its seeds and `--steps`):

* Phase 1, `--vision-steps`: the vision tower alone (only up to its feature layer: LLaVA never
  uses the last layer) learns dense per-patch labels from the scene graph (`patch_labels`: what
  owns the patch: background / shape kind / number / word; its colour; which digit or word; the
  patch holding an object's centre; the object's centre x, y) through a throwaway linear
  `AuxHead` that is not saved. With `--vision-keep K` (patch dropout) the tower runs on K of the
  576 patches per image, every object patch and its neighbours first (`dropout_patches`), at
  ~130 images/s instead of ~40 (the full model: ~7). `--pos-init sincos` starts the learned
  position embeddings from 2-D sin-cos values. The tower's per-patch shape recognition is slow to
  start and then jumps (around 15-20k images: 0.4 -> 0.8); glyph identity comes last (80% of
  text patches after 144k images), which is why phase 1 needs >100k images.
* Phase 1b, `--proj-steps`: the projector alone (tower frozen; LLaVA's stage 1) learns the same
  per-patch labels through a fresh `AuxHead(norm=False)` on its output, i.e. in the LM's input
  space. Without it the projector kept the shape kind but lost the colour (a linear probe on its
  output: 40% colour, on the tower's features 99.9%): the tower's features have norm ~110, mostly
  one common direction, and a fresh GELU projector trained only through the LM squashed the rest.
  `--proj-aux-weight W` keeps that head and its loss (x W) on the projector's output through
  phase 2: without it the projector dropped the objects' positions, which the LM had not yet
  learned to use (a probe of the earlier shipped model: object x from the tower's features to
  rmse 0.035, from the projector's output 0.20 of std 0.24), and left/right stayed at chance.
* Phase 2, `--steps`: the LM (and projector; `--freeze-vision` keeps the tower fixed) answers
  questions, `--questions` per image: the sample's own question plus others about the same
  scene, answered from its scene graph with the generator's templates and rules
  (`scene_questions`). `packed_forward` runs the LM over the image prefix once and each question
  on top of a copy of its KV cache, which is exactly the single-prompt computation, so one
  image's ~600-token LM pass trains many questions. `--lm-keep K`: each step the LM sees a random
  number in [K, 576] of the image tokens, objects first, at their original positions
  (`lm_patches`), so attention learns to pick out one object among fewer distractors and a step
  is cheaper. `--qk-std` re-draws the LM's query/key projections (`init_attention`: at
  Hugging Face's 0.02, q.k starts so small that attention stays uniform for thousands of steps,
  and the LM learned only what pooling gives: count and exist). `--attn-weight W` adds W x
  `attention_loss`: at the answer position, three heads of LM layer `--attn-layer` are told by the
  scene graph where to look -- head 0 at the object the question names first, head H/2 at the
  second one of a position question, head H-1 evenly at `<bos>` and each counted instance's centre
  patch (its `<bos>` share is then 1 / (count + 1)) -- the supervision the per-patch labels give
  the tower, given to the LM's retrieval. Loss: answer token (with
  `--balance-types`, every question type the same share: a scene has at most one text, so "read"
  was ~2% of the questions; `--type-share position=2` tilts the shares toward the types learned
  last) + 0.25 x `<eos>`, plus `--aux-weight` x the per-patch loss on the tower's features.
* AdamW, linear warm-up + cosine decay per phase; `--minutes` caps the total wall time
  (then the schedule is cut short); `--ckpt DIR` keeps the best model by val accuracy.

    python examples/train_vqa_model.py --minutes 90 --out runs/vqa
    python examples/train_vqa_model.py --eval-only runs/vqa --test-n 1000      # test accuracy

With only `--minutes`, the number of phase-2 steps (which fixes the cosine schedule) is
calibrated from the speed of the first steps; pass `--steps` for an exactly reproducible run.
`--out DIR` gets `model.safetensors` + `config.json` (save_pretrained) and `train_meta.json`
(vocab, config, command, metrics, history, and with `--test-n` the test accuracy per type).

API: `build_model(cfg, seed)`, `make_batch(samples, vocab)`, `evaluate(model, samples, vocab)`,
`train(cfg=..., steps=..., ...)` -> (model, history dict), `save(model, out, meta)`,
`patch_labels(scene)`, `scene_questions(scene, rng)`, `make_packed_batch(...)`,
`packed_forward(model, batch, patches)`, `lm_patches(labels, k, grid)`, `init_attention(model, std)`,
`packed_loss(..., balance_types, proj_head, proj_aux_weight)`, `test_accuracy(model, n, seed)`
(per type and per `question_form`: position template, count answer).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections import defaultdict
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import rotate_half

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from graphprune.tools import vqa  # noqa: E402
from graphprune.tools.zoo import CONFIGS, build_model  # noqa: E402,F401  (re-exported: the documented API)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _image_tokens(model) -> int:
    vc = model.config.vision_config
    return (vc.image_size // vc.patch_size) ** 2


def _pixels(sample, size: int) -> torch.Tensor:
    px = vqa.pixel_values(sample.image)
    if size != px.shape[-1]:             # tiny test configs: shrink the 336-px image
        px = F.interpolate(px[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return px


def make_batch(samples, vocab: vqa.Vocab, image_tokens: int = vqa.NUM_PATCHES,
               image_size: int = vqa.IMAGE_SIZE, with_target: bool = True) -> dict:
    """Left-padded batch. with_target: prompt + [answer, eos] (the last 3 positions predict
    answer, eos); else the prompt only (the last position predicts the answer)."""
    rows = []
    for s in samples:
        ids = vocab.prompt_ids(s.question, image_tokens)
        if with_target:
            ids = ids + vocab.target_ids(s.answer)
        rows.append(ids)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), vocab.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    position_ids = (mask.cumsum(1) - 1).clamp_(min=0)
    return dict(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                pixel_values=torch.stack([_pixels(s, image_size) for s in samples]),
                answers=torch.tensor([vocab.answer_id(s.answer) for s in samples]))


def _forward(model, batch: dict, keep: int):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"], pixel_values=batch["pixel_values"],
                 logits_to_keep=keep, use_cache=False).logits.float()


def batch_loss(model, batch: dict, vocab: vqa.Vocab):
    """Cross-entropy on the answer token and the <eos> after it; returns (loss, answer_correct)."""
    logits = _forward(model, batch, keep=3)          # positions predicting answer, eos, (past eos)
    ans = batch["answers"]
    eos = torch.full_like(ans, vocab.eos_id)
    loss = (F.cross_entropy(logits[:, 0], ans) + F.cross_entropy(logits[:, 1], eos)) / 2
    correct = (logits[:, 0].argmax(-1) == ans)
    return loss, correct


@torch.no_grad()
def answer_hits(model, samples, vocab: vqa.Vocab, key=lambda s: s.qtype, batch_size: int = 32,
                autocast: bool = False) -> tuple[dict, dict]:
    """Greedy first-token answers: (hits, totals) per `key(sample)`."""
    was_training = model.training
    model.eval()
    hits, tot = defaultdict(int), defaultdict(int)
    vc = model.config.vision_config
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        b = make_batch(chunk, vocab, _image_tokens(model), vc.image_size, with_target=False)
        with ctx:
            pred = _forward(model, b, keep=1)[:, -1].argmax(-1)
        for s, p, a in zip(chunk, pred.tolist(), b["answers"].tolist()):
            hits[key(s)] += int(p == a)
            tot[key(s)] += 1
    model.train(was_training)
    return hits, tot


def evaluate(model, samples, vocab: vqa.Vocab, batch_size: int = 32, autocast: bool = False) -> dict:
    """Greedy first-token answer accuracy, overall and per question type."""
    hits, tot = answer_hits(model, samples, vocab, batch_size=batch_size, autocast=autocast)
    out = {q: hits[q] / tot[q] for q in sorted(tot)}
    out["all"] = sum(hits.values()) / max(1, sum(tot.values()))
    return out


def question_form(sample: vqa.Sample) -> str:
    """A finer question type for error analysis: the position template ("position/which",
    "position/horizontal", "position/vertical") and the count answer ("count/3")."""
    if sample.qtype == "count":
        return f"count/{sample.answer}"
    if sample.qtype == "position":
        for form in ("which", "horizontal", "vertical"):
            head = vqa.TEMPLATES[form].split("{")[0]
            tail = vqa.TEMPLATES[form].split("}")[1].split("{")[0]     # " left or right of the "
            if sample.question.startswith(head) and tail in sample.question:
                return f"position/{form}"
    return sample.qtype


def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.05) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- dense patch labels
TEXT_CONTENTS = (*vqa.DIGITS, *vqa.WORDS)
AUX_HEADS = dict(kind=1 + len(vqa.KINDS) + 2,        # background, 4 shape kinds, number, word
                 color=1 + len(vqa.COLOR_NAMES),     # none (background / text), 7 colours
                 content=1 + len(TEXT_CONTENTS),     # none, 10 digits, 12 words
                 centre=1 + len(vqa.KINDS) + 1)      # none, patch holding a shape's / the text's centre
AUX_XY = 2                                           # object centre (x, y) / image size, regressed
BACKGROUND_WEIGHT = dict(kind=0.3, color=0.3, centre=0.05)   # most patches are background


def patch_owner(scene: vqa.Scene, grid: int = vqa.GRID) -> torch.Tensor:
    """(grid*grid,) long: 1 + the index in [*scene.shapes, *scene.texts] of the object with the
    most pixels in each patch (objects never overlap), 0 for background."""
    ps = vqa.IMAGE_SIZE // grid
    objs = [*scene.shapes, *scene.texts]
    counts = torch.zeros(len(objs) + 1, grid * grid)
    counts[0] = 0.5                                   # any object pixel beats background
    full = torch.zeros(vqa.IMAGE_SIZE, vqa.IMAGE_SIZE)
    for k, obj in enumerate(objs):
        full.zero_()
        x0, y0, x1, y1 = obj.bbox
        full[y0:y1, x0:x1] = vqa._object_mask(obj).float()
        counts[k + 1] = full.view(grid, ps, grid, ps).sum((1, 3)).flatten()
    return counts.argmax(0)


def centre_patch(obj, grid: int = vqa.GRID) -> int:
    """Row-major id of the patch holding the object's bbox centre."""
    ps = vqa.IMAGE_SIZE // grid
    cx, cy = (obj.bbox[0] + obj.bbox[2]) / 2, (obj.bbox[1] + obj.bbox[3]) / 2
    return min(grid - 1, int(cy) // ps) * grid + min(grid - 1, int(cx) // ps)


def patch_labels(scene: vqa.Scene, grid: int = vqa.GRID, owner: torch.Tensor | None = None) -> dict:
    """Per-patch labels of a scene on a grid x grid patch grid (row-major, like the vision tokens).

    A patch belongs to the object with the most pixels in it (objects never overlap; `owner`:
    `patch_owner`'s answer when the caller has it already). Returns LongTensors (grid*grid,)
    `kind`, `color`, `content`, `centre` and float `xy` (grid*grid, 2) with the owning object's
    centre / image size (0 for background)."""
    n = grid * grid
    objs = [*scene.shapes, *scene.texts]
    owner = patch_owner(scene, grid) if owner is None else owner
    kind = torch.zeros(n, dtype=torch.long)
    color = torch.zeros(n, dtype=torch.long)
    content = torch.zeros(n, dtype=torch.long)
    centre = torch.zeros(n, dtype=torch.long)
    xy = torch.zeros(n, 2)
    for k, obj in enumerate(objs):
        sel = owner == k + 1
        cx, cy = (obj.bbox[0] + obj.bbox[2]) / 2, (obj.bbox[1] + obj.bbox[3]) / 2
        xy[sel] = torch.tensor([cx / vqa.IMAGE_SIZE, cy / vqa.IMAGE_SIZE])
        c = centre_patch(obj, grid)
        if isinstance(obj, vqa.Shape):
            kind[sel] = 1 + vqa.KINDS.index(obj.kind)
            color[sel] = 1 + vqa.COLOR_NAMES.index(obj.color)
            centre[c] = 1 + vqa.KINDS.index(obj.kind)
        else:
            kind[sel] = 1 + len(vqa.KINDS) + (0 if obj.kind == "number" else 1)
            content[sel] = 1 + TEXT_CONTENTS.index(obj.content)
            centre[c] = 1 + len(vqa.KINDS)
    return dict(kind=kind, color=color, content=content, centre=centre, xy=xy)


class AuxHead(torch.nn.Module):
    """Throwaway per-patch classifier (not part of the saved model): on the vision feature layer
    (with a LayerNorm), or with `norm=False` straight on the projector's output, so what it reads
    is linearly there in the LM's input space."""

    def __init__(self, dim: int, norm: bool = True):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim) if norm else torch.nn.Identity()
        self.out = torch.nn.Linear(dim, sum(AUX_HEADS.values()) + AUX_XY)

    def forward(self, feats):                           # (B, N, D) -> dict of (B, N, C)
        y = self.out(self.norm(feats))
        out, i = {}, 0
        for k, c in (*AUX_HEADS.items(), ("xy", AUX_XY)):
            out[k] = y[..., i:i + c]
            i += c
        return out


def aux_loss(pred: dict, labels: dict) -> tuple[torch.Tensor, dict]:
    """Sum of the per-patch losses; returns (loss, {head: accuracy on its non-trivial patches})."""
    loss, acc = 0.0, {}
    for k in AUX_HEADS:
        p, y = pred[k].flatten(0, 1), labels[k].flatten()
        if k == "content":                              # only text patches carry a content label
            m = y > 0
            if m.any():
                loss = loss + F.cross_entropy(p[m], y[m])
        else:                                           # background / "none" (class 0) down-weighted
            w = torch.ones(p.shape[-1], dtype=p.dtype, device=p.device)
            w[0] = BACKGROUND_WEIGHT[k]
            loss = loss + F.cross_entropy(p, y, weight=w)
        m = y > 0
        acc[k] = (p[m].argmax(-1) == y[m]).float().mean().item() if m.any() else float("nan")
    m = labels["kind"].flatten() > 0
    if m.any():
        loss = loss + 10.0 * F.mse_loss(pred["xy"].flatten(0, 1)[m].float(), labels["xy"].flatten(0, 1)[m])
    return loss, acc


def stack_labels(samples, grid: int, owners: list | None = None) -> dict:
    labs = [patch_labels(s.scene, grid, None if owners is None else owners[i]) for i, s in enumerate(samples)]
    return {k: torch.stack([lab[k] for lab in labs]) for k in labs[0]}


def take_patches(x: torch.Tensor | dict, patches: torch.Tensor) -> torch.Tensor | dict:
    """x (B, N) or (B, N, C) per patch -> the rows `patches` (B, K) picks, in that order; a dict of
    them (per-patch labels) -> the same dict of picked rows."""
    if isinstance(x, dict):
        return {k: take_patches(v, patches) for k, v in x.items()}
    return x.gather(1, patches if x.dim() == 2 else patches[..., None].expand(-1, -1, x.shape[-1]))


def vision_features(model, pixel_values, patches=None):
    """(B, N, D) vision features exactly as LLaVA takes them (hidden state of the feature layer,
    CLS dropped), computing only the vision layers up to the feature layer (the later ones are
    never used by LLaVA). `patches` (B, K) runs the tower on those K patches only (with their own
    position embeddings; phase 1's patch dropout) and returns (B, K, D) in that order."""
    vt = model.model.vision_tower
    vt = getattr(vt, "vision_model", vt)
    layers = vt.encoder.layers
    fl = model.config.vision_feature_layer
    keep = len(layers) + 1 + fl if fl < 0 else fl      # hidden_states[fl] is after `keep` layers
    if patches is None:
        h = vt.embeddings(pixel_values)
    else:                                              # CLIPVisionEmbeddings, on a subset of patches
        emb = vt.embeddings
        pos = emb.position_embedding.weight
        x = emb.patch_embedding(pixel_values.to(pos.dtype)).flatten(2).transpose(1, 2) + pos[1:]
        x = take_patches(x, patches)
        h = torch.cat([(emb.class_embedding + pos[0]).expand(x.shape[0], 1, -1), x], 1)
    h = vt.pre_layrnorm(h)
    for layer in list(layers)[:keep]:
        h = layer(h, None)
    if model.config.vision_feature_select_strategy == "default":
        h = h[:, 1:]
    return h


def dropout_patches(labels: dict, k: int, grid: int) -> torch.Tensor:
    """(B, k) patch ids for phase 1's patch dropout: every patch of an object or next to one
    (random ones first if that is more than k), then random background patches. Objects cover
    ~15-30% of an image, so k ~ 160 of 576 keeps what the labels are about and makes a step ~3.5x
    cheaper; the tower still sees all 576 patches in phase 2."""
    obj = (labels["kind"] > 0).float().view(-1, 1, grid, grid)
    near = F.max_pool2d(obj, 3, 1, 1).flatten(1)
    return (near + torch.rand_like(near)).topk(k, 1).indices


def sincos_positions(model) -> None:
    """Initialise the vision tower's (learned) position embeddings with 2-D sin-cos values (CLS: 0),
    which lets attention find neighbouring patches from the first step."""
    vt = model.model.vision_tower
    w = getattr(vt, "vision_model", vt).embeddings.position_embedding.weight
    d, g = w.shape[1], math.isqrt(w.shape[0] - 1)
    y, x = torch.meshgrid(torch.arange(g, dtype=torch.float32), torch.arange(g, dtype=torch.float32), indexing="ij")
    freq = 1.0 / 100 ** (torch.arange(d // 4) / (d // 4))
    x, y = x.flatten()[:, None] * freq, y.flatten()[:, None] * freq
    with torch.no_grad():
        w.zero_()
        w[1:, :4 * (d // 4)] = 0.5 * torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], 1)


def init_attention(model, std: float, seed: int = 0) -> None:
    """Re-draw the LM's query and key projections with `std` (e.g. 1/sqrt(hidden)). Hugging Face's
    0.02 suits wide models; at hidden 64 it makes q.k tiny, and as the gradient of each factor is
    proportional to the other, attention then stays near uniform for thousands of steps: the LM
    learns what pooling can do (count, exist) and never finds the one object a question names."""
    g = torch.Generator().manual_seed(seed)
    for name, w in model.model.language_model.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            with torch.no_grad():
                w.copy_(torch.randn(w.shape, generator=g) * std)


def lm_patches(labels: dict, k: int, grid: int) -> torch.Tensor | None:
    """Phase 2's image-token dropout: ascending ids of the k patches the LM sees (objects and their
    neighbours first, like `dropout_patches`), or None for all of them."""
    if k >= grid * grid:
        return None
    return dropout_patches(labels, k, grid).sort(1).values


# --------------------------------------------------------------------------- more questions per scene
def scene_questions(scene: vqa.Scene, rng: random.Random) -> dict:
    """Every question the benchmark's templates can ask about `scene`, answered from its scene
    graph, by type: {qtype: [(question, answer, focus), ...]} (exist: {"exist_yes": .., "exist_no": ..}).

    `focus` = (first, second, counted): indices into [*scene.shapes, *scene.texts] of the object(s)
    the question names first (the shape asked about, the reference, the "A" of "A left or right of
    B", the text), second (the other one of a position question) and, for count, the instances
    counted: what `attention_loss` asks three heads to look at."""
    shapes = scene.shapes
    out = defaultdict(list)
    kinds_present = {s.kind for s in shapes}
    for kind in vqa.KINDS:
        idx = vqa._indices(scene, kind)
        if len(idx) == 1:
            out["color"].append((vqa.TEMPLATES["color"].format(kind=kind), shapes[idx[0]].color,
                                 ((idx[0],), (), ())))
        if len(idx) <= vqa.MAX_COUNT:
            out["count"].append((vqa.TEMPLATES["count"].format(plural=vqa.PLURALS[kind]), str(len(idx)),
                                 ((), (), tuple(idx))))
        art = "an" if kind[0] in "aeiou" else "a"
        out["exist_yes" if idx else "exist_no"].append(
            (vqa.TEMPLATES["exist"].format(article=art, thing=kind), "yes" if idx else "no", (tuple(idx), (), ())))
    colors_present = {s.color for s in shapes}
    for kind in vqa.KINDS:
        for color in vqa.COLOR_NAMES:
            if not (kind in kinds_present or color in colors_present):
                continue                                  # keep the "no" cases hard negatives
            idx = tuple(vqa._indices(scene, kind, color))
            thing = f"{color} {kind}"
            art = "an" if thing[0] in "aeiou" else "a"
            out["exist_yes" if idx else "exist_no"].append(
                (vqa.TEMPLATES["exist"].format(article=art, thing=thing), "yes" if idx else "no", (idx, (), ())))
    refs = vqa._references(scene, rng)
    for r, ref in refs.items():                           # "what shape is left of the {ref}?"
        rx = shapes[r].center[0]
        for direction in vqa.DIRECTIONS:
            sign = -1 if direction == "left" else 1
            there = [j for j in range(len(shapes)) if j != r and
                     (vqa._left_of(shapes[j], shapes[r]) if direction == "left" else vqa._left_of(shapes[r], shapes[j]))]
            rest_ok = all(sign * (shapes[j].center[0] - rx) < 0 for j in range(len(shapes))
                          if j != r and j not in there)
            if len(there) == 1 and rest_ok:
                out["position"].append((vqa.TEMPLATES["which"].format(direction=direction, ref=ref),
                                        shapes[there[0]].kind, ((r,), (there[0],), ())))
    for a, ref_a in refs.items():                         # "is the A left or right of the B?"
        for b, ref_b in refs.items():
            if a == b:
                continue
            sa, sb = shapes[a], shapes[b]
            if vqa._left_of(sa, sb) or vqa._left_of(sb, sa):
                out["position"].append((vqa.TEMPLATES["horizontal"].format(a=ref_a, b=ref_b),
                                        "left" if vqa._left_of(sa, sb) else "right", ((a,), (b,), ())))
            if vqa._above(sa, sb) or vqa._above(sb, sa):
                out["position"].append((vqa.TEMPLATES["vertical"].format(a=ref_a, b=ref_b),
                                        "above" if vqa._above(sa, sb) else "below", ((a,), (b,), ())))
    for j, t in enumerate(scene.texts):
        out["read"].append((vqa.TEMPLATES["read_number" if t.kind == "number" else "read_word"], t.content,
                            ((len(shapes) + j,), (), ())))
    return dict(out)


def sample_focus(sample: vqa.Sample) -> tuple:
    """The generator's `Sample.focus` as `scene_questions`' (first, second, counted) object indices."""
    idx = tuple(i if what == "shape" else len(sample.scene.shapes) + i for what, i in sample.focus)
    if sample.qtype == "count":
        return (), (), idx
    if sample.qtype == "position":
        return idx[:1], idx[1:], ()
    return idx, (), ()


def questions_for(sample: vqa.Sample, k: int, seed: int = 0) -> list[tuple[str, str, str, tuple]]:
    """The sample's own question plus up to k-1 more about its scene (types drawn uniformly among
    those available, yes/no balanced, no repeats): [(question, answer, qtype, focus), ...]."""
    out = [(sample.question, sample.answer, sample.qtype, sample_focus(sample))]
    if k <= 1:
        return out
    rng = random.Random(f"{sample.uid}|{seed}|extra")
    pool = scene_questions(sample.scene, rng)
    seen = {sample.question}
    for _ in range(8 * k):
        if len(out) >= k:
            break
        types = sorted({"exist" if t.startswith("exist") else t for t in pool if pool[t]})
        if not types:
            break
        t = rng.choice(types)
        if t == "exist":
            t = rng.choice([x for x in ("exist_yes", "exist_no") if pool.get(x)])
        q, a, focus = pool[t].pop(rng.randrange(len(pool[t])))
        if q not in seen:
            seen.add(q)
            out.append((q, a, "exist" if t.startswith("exist") else t, focus))
    return out


def make_packed_batch(samples, vocab: vqa.Vocab, questions_per_image: int = 1, seed: int = 0,
                      image_tokens: int = vqa.NUM_PATCHES, image_size: int = vqa.IMAGE_SIZE,
                      grid: int | None = None) -> dict:
    """Several questions per image: `prefix_ids` (B, P) is `<bos> USER: <image>*N` once per image;
    `seg_ids` (Q, S) holds one right-padded segment `\\n{question} ASSISTANT: {answer} <eos>` per
    question, `img_of` (Q,) its image. `packed_forward` runs the prefix once and every segment on
    top of its image's prefix KV cache, so each question is computed exactly as its single prompt
    would be. `ans_pos` (Q,) is the segment position that predicts the answer (the `:`).

    With `grid`: per-patch `labels` (`stack_labels`), and for `attention_loss` `focus` (Q, 3, N)
    bool -- the patches owned by the question's first and second objects, and the centre patches
    of the instances it counts -- and `is_count` (Q,)."""
    prefix = [vocab.bos_id] + vocab.encode(vqa.PROMPT_USER) + [vocab.image_id] * image_tokens
    segs, img_of, ans_pos, answers, qtypes, focus = [], [], [], [], [], []
    owners = [patch_owner(s.scene, grid) for s in samples] if grid else None    # focus and labels share them
    for b, s in enumerate(samples):
        objs = [*s.scene.shapes, *s.scene.texts]
        for q, a, qt, (first, second, counted) in questions_for(s, questions_per_image, seed):
            body = vocab.encode("\n" + q) + vocab.encode(vqa.PROMPT_ASSISTANT)
            segs.append(body + [vocab.answer_id(a), vocab.eos_id])
            img_of.append(b), ans_pos.append(len(body) - 1), answers.append(vocab.answer_id(a)), qtypes.append(qt)
            if grid:
                f = torch.zeros(3, grid * grid, dtype=torch.bool)
                for slot, ids in enumerate((first, second)):
                    f[slot] = torch.isin(owners[b], torch.tensor([i + 1 for i in ids], dtype=torch.long))
                f[2, [centre_patch(objs[i], grid) for i in counted]] = True
                focus.append(f)
    S = max(map(len, segs))
    seg_ids = torch.full((len(segs), S), vocab.pad_id, dtype=torch.long)
    seg_len = torch.tensor([len(x) for x in segs])
    for i, x in enumerate(segs):
        seg_ids[i, :len(x)] = torch.tensor(x)
    out = dict(prefix_ids=torch.tensor([prefix] * len(samples)), seg_ids=seg_ids, seg_len=seg_len,
               img_of=torch.tensor(img_of), ans_pos=torch.tensor(ans_pos), answers=torch.tensor(answers),
               qtypes=qtypes, pixel_values=torch.stack([_pixels(s, image_size) for s in samples]))
    if grid:
        out["labels"] = stack_labels(samples, grid, owners)
        out["focus"] = torch.stack(focus)
        out["is_count"] = torch.tensor([qt == "count" for qt in qtypes])
    return out


def packed_forward(model, batch: dict, patches: torch.Tensor | None = None, attn_layer: int | None = None):
    """Returns (logits (Q, 2, V) at the answer and <eos> positions, vision features (B, N, D),
    image embeddings (B, K, H): the projector's output for the image tokens the LM sees, and with
    `attn_layer` the attention of that LM layer's heads from the answer position over all keys,
    (Q, heads, P' + S) with P' = text + K image tokens first; else None).

    `patches` (B, K), ascending patch ids: the LM sees only those K image tokens, each at its
    original position (phase 2's image-token dropout; the prompt positions are unchanged), which is
    the unpruned computation when K = N."""
    feats = vision_features(model, batch["pixel_values"])
    embed = model.model.get_input_embeddings()
    lm = model.model.language_model
    ids = batch["prefix_ids"]
    B, P = ids.shape
    n_img = feats.shape[1]
    t = P - n_img                                                        # text before the image
    image = feats if patches is None else take_patches(feats, patches)
    idx = torch.arange(n_img).expand(B, -1) if patches is None else patches
    image = model.model.multi_modal_projector(image).to(embed.weight.dtype)
    emb = torch.cat([embed(ids[:, :t]), image], 1)
    pos = torch.cat([torch.arange(t).expand(B, -1), t + idx], 1)
    cache = lm(inputs_embeds=emb, position_ids=pos, use_cache=True).past_key_values   # causal prefix
    img_of = batch["img_of"]
    for layer in cache.layers:                                           # one prefix copy per question
        layer.keys, layer.values = layer.keys[img_of], layer.values[img_of]
    seg = batch["seg_ids"]
    Q, S = seg.shape
    i = torch.arange(S)
    causal = (i[None, :] <= i[:, None])[None].expand(Q, S, S)
    mask = torch.cat([torch.ones(Q, S, emb.shape[1], dtype=torch.bool), causal], -1)[:, None]
    probe = {}
    hook = None if attn_layer is None else lm.layers[attn_layer].self_attn.q_proj.register_forward_hook(
        lambda mod, args, out: probe.update(q=out))
    try:
        h = lm(inputs_embeds=embed(seg), attention_mask=mask, position_ids=(P + i).expand(Q, S),
               past_key_values=cache, use_cache=True).last_hidden_state
    finally:
        if hook is not None:
            hook.remove()
    q = torch.arange(Q)
    ap = batch["ans_pos"]
    logits = model.lm_head(torch.stack([h[q, ap], h[q, ap + 1]], 1)).float()
    attn = None
    if attn_layer is not None:
        attn = answer_attention(lm, probe["q"][q, ap], P + ap, cache.layers[attn_layer].keys,
                                emb.shape[1] + ap)
    return logits, feats, image, attn


def answer_attention(lm, q_proj_out: torch.Tensor, position: torch.Tensor, keys: torch.Tensor,
                     last_key: torch.Tensor) -> torch.Tensor:
    """Softmax attention of one query row per question, recomputed from its q_proj output (Q, H*d)
    at `position` (Q,) against the layer's cached, already rotated keys (Q, Hkv, L, d), keys after
    `last_key` (Q,) masked (causal): (Q, H, L) probabilities."""
    cfg = lm.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = keys.shape[-1]
    qv = q_proj_out.view(-1, H, d)
    cos, sin = lm.rotary_emb(qv, position[:, None])                  # (Q, 1, d)
    qv = qv * cos + rotate_half(qv) * sin                             # RoPE, as the layer applies it
    k = keys.repeat_interleave(H // Hkv, 1)
    scores = torch.einsum("qhd,qhkd->qhk", qv, k) * d ** -0.5
    future = torch.arange(k.shape[2])[None, :] > last_key[:, None]
    return scores.masked_fill(future[:, None], float("-inf")).softmax(-1)


def packed_loss(model, batch: dict, vocab: vqa.Vocab, aux_head=None, aux_weight: float = 0.0,
                patches: torch.Tensor | None = None, balance_types: bool | dict = False,
                proj_head=None, proj_aux_weight: float = 0.0, attn_layer: int | None = None,
                attn_weight: float = 0.0):
    """Answer (+ 0.25 x <eos>) cross-entropy over all packed questions (+ aux_weight x per-patch
    loss on the vision features, + proj_aux_weight x per-patch loss read by `proj_head` from the
    projector's output on the image tokens the LM sees). `balance_types`: every question type
    present gets the same share of the answer loss (a scene has at most one text item, so "read"
    is at most one of an image's questions and, unbalanced, ~2% of the loss: too rare to learn
    its 22 answers); a dict {qtype: relative share} (missing types: 1) tilts the shares toward
    the types still being learned. `attn_weight` x `attention_loss` at LM layer `attn_layer`.
    Returns (loss, answer_correct (Q,), per-patch accuracies -- the projector head's when it is
    on, else the vision head's -- and the attention heads' mass on their targets)."""
    use_attn = attn_weight > 0 and attn_layer is not None
    logits, feats, image, attn = packed_forward(model, batch, patches, attn_layer if use_attn else None)
    ans = batch["answers"]
    answer_ce = F.cross_entropy(logits[:, 0], ans, reduction="none")
    if balance_types:
        qtypes = batch["qtypes"]
        share = balance_types if isinstance(balance_types, dict) else {}
        per_type = {t: qtypes.count(t) for t in set(qtypes)}
        total = sum(share.get(t, 1.0) for t in per_type)
        w = torch.tensor([share.get(t, 1.0) / (total * per_type[t]) for t in qtypes], dtype=answer_ce.dtype)
        answer_loss = (answer_ce * w).sum()
    else:
        answer_loss = answer_ce.mean()
    loss = answer_loss + 0.25 * F.cross_entropy(logits[:, 1], torch.full_like(ans, vocab.eos_id))
    correct = logits[:, 0].argmax(-1) == ans
    accs = {}
    if aux_head is not None and aux_weight > 0:
        al, accs = aux_loss(aux_head(feats), batch["labels"])
        loss = loss + aux_weight * al
    if proj_head is not None and proj_aux_weight > 0:
        labels = batch["labels"] if patches is None else take_patches(batch["labels"], patches)
        al, accs = aux_loss(proj_head(image), labels)
        loss = loss + proj_aux_weight * al
    if use_attn:
        al, mass = attention_loss(attn, batch, patches)
        loss = loss + attn_weight * al
        accs = dict(accs, **mass)
    return loss, correct, accs


def attention_loss(attn: torch.Tensor, batch: dict, patches: torch.Tensor | None = None):
    """Attention supervision from the scene graph (training only; the model stays a plain LLaVA).

    At the answer position, three heads of one layer are shown where to look: head 0 at the
    object the question names first, head H/2 (the other key/value group) at the second one of a
    position question -- so "is A left or right of B" becomes "read x from two heads and compare"
    instead of a search the answer loss alone did not find in 4500 steps (left/right stayed at
    55%; with this loss the shipped run answers 100% of them) -- and head H-1, for a count,
    spreads evenly over `<bos>` and the centre patch of every instance counted, so its `<bos>`
    share is 1 / (n + 1) and n can be read off (the answer loss alone undercounted 3 and 4; this
    head reaches ~0.86 of its target mass, and 3 and 4 are still undercounted: 52%, 30%).
    Losses: -log(mass on the object's patches) for the first two,
    cross-entropy against the uniform target for the count head. `attn` (Q, H, L) from
    `packed_forward`; `batch` from `make_packed_batch(grid=...)`. Returns (loss, mean masses)."""
    focus = batch["focus"]
    if patches is not None:
        focus = focus.gather(2, patches[batch["img_of"]][:, None].expand(-1, 3, -1))
    t, K, H = batch["prefix_ids"].shape[1] - batch["focus"].shape[2], focus.shape[2], attn.shape[1]
    image = attn[:, :, t:t + K]
    loss, mass = attn.new_zeros(()), {}
    for name, slot, head in (("attn_first", 0, 0), ("attn_second", 1, H // 2)):
        on = focus[:, slot].any(-1)
        if on.any():
            m = (image[on, head] * focus[on, slot]).sum(-1)
            loss = loss - m.clamp_min(1e-6).log().mean()
            mass[name] = m.mean().item()
    on = batch["is_count"]
    if on.any():
        target = torch.zeros_like(attn[on, 0])
        target[:, 0] = 1.0                                                  # <bos>: the sink
        target[:, t:t + K] = focus[on, 2].to(target.dtype)
        target = target / target.sum(-1, keepdim=True)
        p = attn[on, H - 1]
        loss = loss - (target * p.clamp_min(1e-6).log()).sum(-1).mean()
        mass["attn_count"] = (p * (target > 0)).sum(-1).mean().item()
    return loss, mass


def optimizer_step(opt, loss, params, grad_clip: float) -> None:
    """Backward, clip the global gradient norm of `params` ((name, tensor) pairs, in this order:
    the norm's summation order is part of a run's reproducibility) if grad_clip, step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for _, p in params], grad_clip)
    opt.step()


def _param_groups(params, weight_decay):
    params = list(params)
    decay = [p for n, p in params if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in params if not (p.dim() >= 2 and "embed" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(cfg: dict | str = "default", *, steps: int | None = None, minutes: float | None = None,
          batch_size: int = 16, lr: float = 1e-3, weight_decay: float = 0.05, warmup: int | None = None,
          seed: int = 0, data_seed: int = 0, samples=None, eval_n: int = 500, eval_every: int = 200,
          log_every: int = 10, threads: int = 2, autocast: bool = False, grad_clip: float = 1.0,
          calib_steps: int = 10, questions: int = 1, aux_weight: float = 0.0,
          vision_steps: int = 0, vision_batch: int = 32, vision_lr: float | None = None,
          vision_minutes: float | None = None, vision_keep: int = 0, pos_init: str = "default",
          proj_steps: int = 0, freeze_vision: bool = False, lm_keep: int = 0, qk_std: float = 0.0,
          balance_types: bool | dict = False, proj_aux_weight: float = 0.0, attn_weight: float = 0.0,
          attn_layer: int = 3, ckpt_dir: str | None = None, log=print):
    """Train from scratch. `samples` (a list) replaces the train stream (cycled; for tests).

    Phase 1 (`vision_steps` > 0): the vision tower alone (up to its feature layer) learns the dense
    per-patch labels (`patch_labels`) through a throwaway `AuxHead`, `vision_batch` images a step
    (train-stream images after the ones phase 2 uses). Phase 2: the whole model learns to answer,
    `questions` questions per image packed into one row (`make_packed_batch`), plus
    `aux_weight` x the per-patch loss. Stops at `steps` (phase 2) or when `minutes` of training
    wall time (all phases) are spent, whichever first; with no `steps`, the phase-2 total for the
    cosine schedule is calibrated after `calib_steps` steps. `ckpt_dir`: keep the best model by
    val accuracy there (save_pretrained + train_meta.json) at each evaluation.

    Between them, `proj_steps` align the projector alone (tower frozen, LLaVA's stage 1): a fresh
    `AuxHead(norm=False)` reads the same per-patch labels from the projector's output, so colour and
    glyph identity reach the LM's input space linearly (without it the projector keeps the kind but
    loses most of the colour: 40% by a linear probe, the tower's features 99.9%). `freeze_vision`
    keeps the tower fixed in phase 2; `lm_keep` K > 0 shows the LM a random number in [K, N] of
    the N image tokens per step (`lm_patches`, original positions), so attention that picks out
    one object is learned among fewer distractors and a step is cheaper; `qk_std` re-draws the
    LM's query/key projections (`init_attention`); `balance_types` gives each question type the
    same share of the answer loss, or the relative shares a dict names (`packed_loss`);
    `proj_aux_weight` keeps phase 1b's head on the projector's output in phase 2 (on the image
    tokens the LM sees): without it the projector, trained only through an LM that has not yet
    learned to use an object's position, drops it (a linear probe of the previous shipped run's
    projector: x rmse 0.20 of std 0.24, the tower's 0.035), and "left or right" stays at chance;
    `attn_weight` x `attention_loss` shows three heads of LM layer `attn_layer` where to look.

    Time caps (`vision_minutes` for phase 1, what is left of `minutes` for phase 2) also drive
    each phase's schedule: its progress is max(step / steps, time / time cap), so a slow (e.g.
    shared) CPU still anneals the learning rate and ends the phase on time; an uncapped run is
    purely step-based and reproducible. `history["capped"]` records whether a cap cut in.
    Returns (model, history)."""
    if isinstance(cfg, str):
        cfg = CONFIGS[cfg]
    if steps is None and minutes is None:
        raise ValueError("give steps and/or minutes")
    if attn_weight and not 0 <= attn_layer < cfg["layers"]:
        raise ValueError(f"attn_layer {attn_layer} is not a layer of the {cfg['layers']}-layer LM")
    if proj_aux_weight and not proj_steps:
        raise ValueError("proj_aux_weight keeps phase 1b's projector head in phase 2: give proj_steps > 0 too")
    torch.set_num_threads(threads)
    seed_everything(seed)
    vocab = vqa.Vocab()
    model = build_model(cfg, seed, vocab).train()
    if pos_init == "sincos":
        sincos_positions(model)
    if qk_std:
        init_attention(model, qk_std, seed)
    n_img, size = _image_tokens(model), cfg["image_size"]
    grid = size // cfg["patch"]
    aux_head = AuxHead(cfg["vision_hidden"]) if (aux_weight > 0 or vision_steps > 0) else None
    val = vqa.generate("val", eval_n, seed=data_seed) if eval_n else []
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else nullcontext
    budget = minutes * 60 if minutes is not None else math.inf
    hist = dict(train=[], val=[], vision=[], projector=[], config=dict(cfg), params=n_params(model), batch_size=batch_size,
                lr=lr, weight_decay=weight_decay, seed=seed, data_seed=data_seed, autocast=autocast,
                questions=questions, aux_weight=aux_weight, vision_steps=vision_steps, proj_steps=proj_steps,
                freeze_vision=freeze_vision, lm_keep=lm_keep, qk_std=qk_std, balance_types=balance_types,
                proj_aux_weight=proj_aux_weight, attn_weight=attn_weight, attn_layer=attn_layer,
                vision_batch=vision_batch, vision_lr=vision_lr or lr, vision_minutes=vision_minutes,
                vision_keep=vision_keep, pos_init=pos_init,
                minutes=minutes, grad_clip=grad_clip, capped={})
    log(f"params {hist['params']:,} (vision {n_params(model.model.vision_tower):,}, "
        f"lm {n_params(model.model.language_model) + n_params(model.lm_head):,}); "
        f"{n_img} image tokens; batch {batch_size} x {questions} questions, lr {lr}, aux {aux_weight}")
    train_time = 0.0
    best = dict(acc=-1.0, step=None)

    def stream(i):
        return samples[i % len(samples)] if samples is not None else vqa.sample_at("train", i, seed=data_seed)

    # ---- phase 1: vision tower + aux head on dense patch labels
    if vision_steps:
        vparams = [(n, p) for n, p in model.model.vision_tower.named_parameters()] + \
                  [(n, p) for n, p in aux_head.named_parameters()]
        vopt = torch.optim.AdamW(_param_groups(vparams, weight_decay), lr=vision_lr or lr, betas=(0.9, 0.98))
        vwarm = max(1, vision_steps // 20)
        offset = 10 ** 8                              # images phase 2 never reaches
        t_log, acc_l, run = time.perf_counter(), defaultdict(float), 0
        vbudget = min(budget, vision_minutes * 60 if vision_minutes else math.inf)
        for vs in range(vision_steps):
            veff = max(vs, vision_steps * train_time / vbudget)
            if veff >= vision_steps:
                hist["capped"]["vision"] = vs
                break
            t0 = time.perf_counter()
            chunk = [stream(offset + vs * vision_batch + b) for b in range(vision_batch)]
            px = torch.stack([_pixels(s, size) for s in chunk])
            labels = stack_labels(chunk, grid)
            patches = None
            if vision_keep and vision_keep < grid * grid:
                patches = dropout_patches(labels, vision_keep, grid)
                labels = take_patches(labels, patches)
            for g in vopt.param_groups:
                g["lr"] = lr_at(veff, vision_steps, vision_lr or lr, vwarm)
            with ctx():
                loss, accs = aux_loss(aux_head(vision_features(model, px, patches)), labels)
            optimizer_step(vopt, loss, vparams, grad_clip)
            train_time += time.perf_counter() - t0
            acc_l["loss"] += loss.item()
            for k, v in accs.items():
                acc_l[k] += 0.0 if v != v else v
            run += 1
            if (vs + 1) % log_every == 0 or vs + 1 == vision_steps:
                now = time.perf_counter()
                rec = dict(step=vs + 1, **{k: v / run for k, v in acc_l.items()},
                           ips=run * vision_batch / (now - t_log), train_min=train_time / 60)
                hist["vision"].append(rec)
                log(f"vision {vs + 1:5d}  " + "  ".join(f"{k} {v:.3f}" for k, v in rec.items() if k != "step")
                    + " img/s" * 0)
                acc_l, run, t_log = defaultdict(float), 0, time.perf_counter()
        hist["vision_minutes"] = train_time / 60
        del vopt

    # ---- phase 1b: the projector alone maps the (frozen) tower's features into the LM's input space
    phead = None
    if proj_steps:
        proj = model.model.multi_modal_projector
        phead = AuxHead(cfg["hidden"], norm=False)
        pparams = list(proj.named_parameters()) + list(phead.named_parameters())
        popt = torch.optim.AdamW(_param_groups(pparams, weight_decay), lr=lr, betas=(0.9, 0.98))
        offset = 2 * 10 ** 8
        for ps in range(proj_steps):
            t0 = time.perf_counter()
            chunk = [stream(offset + ps * vision_batch + b) for b in range(vision_batch)]
            px = torch.stack([_pixels(s, size) for s in chunk])
            labels = stack_labels(chunk, grid)
            patches = dropout_patches(labels, min(vision_keep or grid * grid, grid * grid), grid)
            labels = take_patches(labels, patches)
            with torch.no_grad():
                feats = take_patches(vision_features(model, px), patches)
            for g in popt.param_groups:
                g["lr"] = lr_at(ps, proj_steps, lr, max(1, proj_steps // 15))
            with ctx():
                loss, accs = aux_loss(phead(proj(feats)), labels)
            optimizer_step(popt, loss, pparams, grad_clip)
            train_time += time.perf_counter() - t0
            if (ps + 1) % log_every == 0 or ps + 1 == proj_steps:
                rec = dict(step=ps + 1, loss=loss.item(), **accs, train_min=train_time / 60)
                hist["projector"].append(rec)
                log(f"projector {ps + 1:4d}  " + "  ".join(f"{k} {v:.3f}" for k, v in rec.items() if k != "step"))
        del popt
    if freeze_vision:
        model.model.vision_tower.requires_grad_(False)

    # ---- phase 2: full VQA
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad] + \
             (list(aux_head.named_parameters()) if aux_weight > 0 else []) + \
             (list(phead.named_parameters()) if proj_aux_weight > 0 else [])
    opt = torch.optim.AdamW(_param_groups(params, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-8)
    total = steps if steps is not None else 10 ** 9
    warm = warmup if warmup is not None else (max(1, total // 25) if steps is not None else None)
    t_phase2 = train_time
    run_loss = run_acc = run_n = 0.0
    t_log = time.perf_counter()
    n_log = 0
    n_q_total = 0
    step = 0
    needs_labels = aux_weight > 0 or lm_keep or proj_aux_weight > 0 or attn_weight > 0   # per-patch labels
    run_mass = defaultdict(list)                 # attention masses per log window (not every batch has a count)
    while step < total:
        eff = step if (budget == math.inf or steps is None) else max(step, total * (train_time - t_phase2) / max(1e-9, budget - t_phase2))
        if eff >= total or train_time >= budget:
            hist["capped"]["vqa"] = step
            break
        if steps is None and step == calib_steps:
            per_step = (train_time - t_phase2) / calib_steps
            total = max(calib_steps + 1, int((budget - train_time) * 0.97 / per_step) + calib_steps)
            log(f"calibrated: {per_step:.2f} s/step -> {total} steps")
        if warm is None and step == calib_steps:
            warm = max(1, total // 25)
        t0 = time.perf_counter()
        chunk = [stream(step * batch_size + b) for b in range(batch_size)]
        if questions > 1 or needs_labels:
            batch = make_packed_batch(chunk, vocab, questions, data_seed, n_img, size, grid if needs_labels else None)
        else:
            batch = make_batch(chunk, vocab, n_img, size)
        cur = lr_at(eff if steps is not None else step, total, lr,
                    warm if warm is not None else max(1, calib_steps * 4))
        for g in opt.param_groups:
            g["lr"] = cur
        with ctx():
            if "seg_ids" in batch:
                patches = None
                if lm_keep:
                    k = random.Random(f"{seed}|{step}|lm_keep").randint(min(lm_keep, n_img), n_img)
                    patches = lm_patches(batch["labels"], k, grid)
                loss, correct, accs = packed_loss(model, batch, vocab, aux_head, aux_weight, patches, balance_types,
                                                  phead, proj_aux_weight, attn_layer, attn_weight)
                for k, v in accs.items():
                    if k.startswith("attn_"):
                        run_mass[k].append(v)
            else:
                loss, correct = batch_loss(model, batch, vocab)
        optimizer_step(opt, loss, params, grad_clip)
        train_time += time.perf_counter() - t0
        step += 1
        run_loss += loss.item() * len(correct)
        run_acc += correct.sum().item()
        run_n += len(correct)
        n_q_total += len(correct)
        n_log += len(chunk)
        if step % log_every == 0 or step == total:
            now = time.perf_counter()
            mass = {k: sum(v) / len(v) for k, v in run_mass.items()}
            rec = dict(step=step, samples=step * batch_size, loss=run_loss / run_n, acc=run_acc / run_n,
                       lr=cur, sps=n_log / (now - t_log), qps=run_n / (now - t_log), train_min=train_time / 60,
                       **mass)
            hist["train"].append(rec)
            log(f"step {step:5d}  loss {rec['loss']:.4f}  acc {rec['acc']:.3f}  lr {cur:.2e}  "
                f"{rec['sps']:.1f} images/s  {rec['qps']:.1f} q/s  {rec['train_min']:.1f} min"
                + "".join(f"  {k} {v:.2f}" for k, v in mass.items()))
            run_loss = run_acc = run_n = 0.0
            run_mass = defaultdict(list)
            t_log, n_log = time.perf_counter(), 0
        if val and eval_every and step % eval_every == 0 and step < total:
            _eval(model, val, vocab, step, hist, log, autocast, best, ckpt_dir)
            t_log = time.perf_counter()
    hist["steps"] = step
    hist["train_minutes"] = train_time / 60
    p2 = max(1e-9, train_time - t_phase2)
    hist["images_per_s"] = step * batch_size / p2                # phase 2 (questions x this = q/s)
    hist["questions_per_s"] = n_q_total / p2
    hist["vision_images_per_s"] = (vision_steps * vision_batch / (t_phase2 or 1e-9)) if vision_steps else None
    if val:
        _eval(model, val, vocab, step, hist, log, autocast, best, ckpt_dir)
    hist["best"] = best
    model.eval()
    return model, hist


def _eval(model, val, vocab, step, hist, log, autocast, best=None, ckpt_dir=None):
    t = time.perf_counter()
    acc = evaluate(model, val, vocab, autocast=autocast)
    hist["val"].append(dict(step=step, **acc))
    log(f"  val@{step}: " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items())
        + f"  ({time.perf_counter() - t:.0f} s)")
    if best is not None and acc["all"] > best["acc"]:
        best.update(acc=acc["all"], step=step)
        if ckpt_dir:
            save(model, ckpt_dir, dict(hist, best=dict(best), checkpoint_step=step))
            log(f"  saved best (val {acc['all']:.3f}) to {ckpt_dir}")


def save(model, out: str, meta: dict) -> None:
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    vocab = vqa.Vocab()
    meta = dict(meta, vocab=[vocab.decode([i]) for i in range(len(vocab))],
                special=dict(pad=vocab.pad_id, bos=vocab.bos_id, eos=vocab.eos_id, image=vocab.image_id),
                prompt="<bos> USER: <image>*N \\n{question} ASSISTANT:", image_tokens=_image_tokens(model))
    with open(os.path.join(out, "train_meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def test_accuracy(model, n: int = 1000, seed: int = 0) -> dict:
    """Greedy first-token accuracy on test questions 0..n-1 of `seed`: overall, per type, and per
    `question_form` (position template, count answer)."""
    samples = vqa.generate("test", n, seed=seed)
    hits, tot = answer_hits(model, samples, vqa.Vocab(), key=question_form)
    per_type_hits, per_type_n = defaultdict(int), defaultdict(int)
    for form in tot:
        per_type_hits[form.split("/")[0]] += hits[form]
        per_type_n[form.split("/")[0]] += tot[form]
    return dict(split="test", n=n, seed=seed, all=sum(hits.values()) / max(1, n),
                per_type={q: per_type_hits[q] / per_type_n[q] for q in sorted(per_type_n)},
                per_type_n=dict(sorted(per_type_n.items())),
                per_form={f: hits[f] / tot[f] for f in sorted(tot)}, per_form_n=dict(sorted(tot.items())))


def _eval_only(path: str, n: int, seed: int, threads: int) -> int:
    from graphprune.tools import zoo

    torch.set_num_threads(threads)
    model, _ = zoo.vqa_llava(path)
    res = test_accuracy(model, n, seed)
    print("test: " + json.dumps(res), flush=True)
    meta_path = os.path.join(path, "train_meta.json")
    meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {}
    meta["test"] = res
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=None, help="training wall-time budget")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (fixes the schedule)")
    ap.add_argument("--out", default=None, help="save_pretrained directory")
    ap.add_argument("--seed", type=int, default=0, help="init seed")
    ap.add_argument("--data-seed", type=int, default=0, help="vqa stream seed (train and val)")
    ap.add_argument("--eval-n", type=int, default=500, help="val samples for periodic eval")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--config", default="default", choices=sorted(CONFIGS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=INT",
                    help="override a config entry, e.g. --set vision_hidden=128")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--questions", type=int, default=1, help="questions packed per image (phase 2)")
    ap.add_argument("--aux-weight", type=float, default=0.0, help="per-patch loss weight in phase 2")
    ap.add_argument("--vision-steps", type=int, default=0, help="phase-1 steps (vision tower + patch labels)")
    ap.add_argument("--vision-batch", type=int, default=32)
    ap.add_argument("--vision-lr", type=float, default=None)
    ap.add_argument("--vision-minutes", type=float, default=None, help="phase-1 wall-time cap")
    ap.add_argument("--vision-keep", type=int, default=0,
                    help="phase-1 patch dropout: run the tower on this many patches per image (objects first)")
    ap.add_argument("--pos-init", default="default", choices=("default", "sincos"),
                    help="vision position-embedding init")
    ap.add_argument("--proj-steps", type=int, default=0,
                    help="phase 1b: projector-alone steps on the per-patch labels (tower frozen)")
    ap.add_argument("--freeze-vision", action="store_true", help="keep the vision tower fixed in phase 2")
    ap.add_argument("--lm-keep", type=int, default=0,
                    help="phase 2 image-token dropout: the LM sees a random number in [K, all] of them per step")
    ap.add_argument("--balance-types", action="store_true",
                    help="phase 2: each question type gets the same share of the answer loss")
    ap.add_argument("--type-share", action="append", default=[], metavar="QTYPE=X",
                    help="with --balance-types: relative loss share of a question type (default 1)")
    ap.add_argument("--qk-std", type=float, default=0.0, help="re-draw the LM's q/k projections with this std")
    ap.add_argument("--proj-aux-weight", type=float, default=0.0,
                    help="phase 2: keep phase 1b's per-patch loss on the projector's output at this weight")
    ap.add_argument("--attn-weight", type=float, default=0.0,
                    help="phase 2: weight of the attention supervision (attention_loss) at --attn-layer")
    ap.add_argument("--attn-layer", type=int, default=3, help="LM layer whose heads --attn-weight supervises")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--ckpt", default=None, help="keep the best model by val accuracy here")
    ap.add_argument("--test-n", type=int, default=0, help="after training: accuracy on this many test questions")
    ap.add_argument("--test-seed", type=int, default=0, help="seed of the test stream")
    ap.add_argument("--eval-only", default=None, metavar="DIR",
                    help="no training: test accuracy of a saved model, written into DIR/train_meta.json")
    a = ap.parse_args(argv)
    if a.eval_only:
        return _eval_only(a.eval_only, a.test_n or 1000, a.test_seed, a.threads)
    if a.steps is None and a.minutes is None:
        ap.error("give --steps and/or --minutes")
    shares = {}
    for kv in a.type_share:
        t, _, x = kv.partition("=")
        if t not in vqa.QTYPES or not x.replace(".", "", 1).isdigit():
            ap.error(f"--type-share wants QTYPE=X with QTYPE in {vqa.QTYPES} and X a number, got {kv!r}")
        shares[t] = float(x)
    if shares and not a.balance_types:
        ap.error("--type-share tilts --balance-types: give both")
    cfg = dict(CONFIGS[a.config])
    for kv in a.set:
        k, v = kv.split("=", 1)
        cfg[k] = int(v) if v.lstrip("-").isdigit() else v
    if a.attn_weight and not 0 <= a.attn_layer < cfg["layers"]:
        ap.error(f"--attn-layer {a.attn_layer}: the LM has layers 0..{cfg['layers'] - 1}")
    model, hist = train(cfg, steps=a.steps, minutes=a.minutes, batch_size=a.batch, lr=a.lr,
                        weight_decay=a.weight_decay, warmup=a.warmup, seed=a.seed, data_seed=a.data_seed,
                        eval_n=a.eval_n, eval_every=a.eval_every, threads=a.threads, autocast=a.bf16,
                        questions=a.questions, aux_weight=a.aux_weight, vision_steps=a.vision_steps,
                        vision_batch=a.vision_batch, vision_lr=a.vision_lr, log_every=a.log_every,
                        vision_minutes=a.vision_minutes, vision_keep=a.vision_keep, pos_init=a.pos_init,
                        proj_steps=a.proj_steps, freeze_vision=a.freeze_vision, lm_keep=a.lm_keep,
                        qk_std=a.qk_std, balance_types=shares or a.balance_types, proj_aux_weight=a.proj_aux_weight,
                        attn_weight=a.attn_weight, attn_layer=a.attn_layer, ckpt_dir=a.ckpt,
                        log=lambda m: print(m, flush=True))
    hist["command"] = "python examples/train_vqa_model.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if a.test_n:
        hist["test"] = test_accuracy(model, a.test_n, a.test_seed)
        print("test: " + json.dumps(hist["test"]), flush=True)
    if a.out:
        save(model, a.out, hist)
        size = os.path.getsize(os.path.join(a.out, "model.safetensors"))
        print(f"saved {a.out} ({size / 2**20:.2f} MiB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
