"""Train graphprune's small LLaVA-architecture VLM from scratch on the synthetic VQA set.

The model is a standard `LlavaForConditionalGeneration` (CLIP-style vision tower with CLS at
336 px / patch 14 -> 576 image tokens, `vision_feature_layer=-2`, strategy "default", GELU MLP
projector, 8-layer Llama LM) over the closed word-level `graphprune.vqa.Vocab`, so it loads
offline with `from_pretrained` and every pruning method runs on it as on LLaVA-1.5.

Training: samples streamed with `vqa.sample_at("train", i, seed)` in a fixed order (step s uses
indices s*B .. s*B+B-1), loss only on the answer token and the `<eos>` after it, AdamW with
linear warm-up + cosine decay, fp32 (optionally bf16 autocast) on CPU, 2 threads.

    python examples/train_vqa_model.py --minutes 90 --out runs/vqa
    python examples/train_vqa_model.py --steps 3000 --batch 16 --lr 1e-3 --out runs/vqa

With only `--minutes`, the number of steps (which fixes the cosine schedule) is calibrated from
the speed of the first steps; pass `--steps` for an exactly reproducible run. `--out DIR` gets
`model.safetensors` + `config.json` (save_pretrained) and `train_meta.json` (vocab, config,
metrics, history).

API: `build_model(cfg, seed)`, `make_batch(samples, vocab)`, `evaluate(model, samples, vocab)`,
`train(cfg=..., steps=..., ...)` -> (model, history dict), `save(model, out, meta)`.
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from graphprune import vqa  # noqa: E402

# Model configs. "default" is the shipped model; "tiny" is for smoke tests (image size is still
# a parameter so tests can use a small grid; the prompt uses (image_size // patch) ** 2 tokens).
CONFIGS = {
    "default": dict(image_size=336, patch=14, vision_hidden=96, vision_layers=4, vision_heads=2,
                    vision_mlp=384, hidden=128, layers=8, heads=4, kv_heads=2, mlp=384,
                    projector_act="gelu"),
    "tiny": dict(image_size=56, patch=14, vision_hidden=32, vision_layers=2, vision_heads=2,
                 vision_mlp=64, hidden=32, layers=8, heads=2, kv_heads=1, mlp=64,
                 projector_act="gelu"),
}


def build_model(cfg: dict, seed: int = 0, vocab: vqa.Vocab | None = None):
    """A fresh LlavaForConditionalGeneration over `vocab` (default `vqa.Vocab()`)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vocab = vocab or vqa.Vocab()
    n_img = (cfg["image_size"] // cfg["patch"]) ** 2
    vc = CLIPVisionConfig(hidden_size=cfg["vision_hidden"], intermediate_size=cfg["vision_mlp"],
                          num_hidden_layers=cfg["vision_layers"], num_attention_heads=cfg["vision_heads"],
                          image_size=cfg["image_size"], patch_size=cfg["patch"],
                          projection_dim=cfg["vision_hidden"], hidden_act="quick_gelu")
    tc = LlamaConfig(hidden_size=cfg["hidden"], intermediate_size=cfg["mlp"],
                     num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                     num_key_value_heads=cfg["kv_heads"], vocab_size=len(vocab),
                     max_position_embeddings=max(1024, n_img + 128), rope_theta=10000.0,
                     pad_token_id=vocab.pad_id, bos_token_id=vocab.bos_id, eos_token_id=vocab.eos_id,
                     tie_word_embeddings=False)
    lc = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=vocab.image_id,
                     vision_feature_layer=-2, vision_feature_select_strategy="default",
                     projector_hidden_act=cfg["projector_act"], image_seq_length=n_img,
                     pad_token_id=vocab.pad_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(lc)
    model.generation_config.pad_token_id = vocab.pad_id
    model.generation_config.bos_token_id = vocab.bos_id
    model.generation_config.eos_token_id = vocab.eos_id
    return model


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
def evaluate(model, samples, vocab: vqa.Vocab, batch_size: int = 32, autocast: bool = False) -> dict:
    """Greedy first-token answer accuracy, overall and per question type."""
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
            hits[s.qtype] += int(p == a)
            tot[s.qtype] += 1
    model.train(was_training)
    out = {q: hits[q] / tot[q] for q in sorted(tot)}
    out["all"] = sum(hits.values()) / max(1, sum(tot.values()))
    return out


def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.05) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: dict | str = "default", *, steps: int | None = None, minutes: float | None = None,
          batch_size: int = 16, lr: float = 1e-3, weight_decay: float = 0.05, warmup: int | None = None,
          seed: int = 0, data_seed: int = 0, samples=None, eval_n: int = 500, eval_every: int = 200,
          log_every: int = 10, threads: int = 2, autocast: bool = False, grad_clip: float = 1.0,
          calib_steps: int = 10, log=print):
    """Train from scratch. `samples` (a list) replaces the train stream (cycled; for tests).

    Stops at `steps` or when `minutes` of training wall time are spent, whichever first; with no
    `steps`, the total for the cosine schedule is calibrated after `calib_steps` steps.
    Returns (model, history)."""
    if isinstance(cfg, str):
        cfg = CONFIGS[cfg]
    if steps is None and minutes is None:
        raise ValueError("give steps and/or minutes")
    torch.set_num_threads(threads)
    seed_everything(seed)
    vocab = vqa.Vocab()
    model = build_model(cfg, seed, vocab).train()
    n_img, size = _image_tokens(model), cfg["image_size"]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-8)
    val = vqa.generate("val", eval_n, seed=data_seed) if eval_n else []
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else nullcontext
    budget = minutes * 60 if minutes is not None else math.inf
    total = steps if steps is not None else 10 ** 9
    warm = warmup if warmup is not None else (max(1, total // 25) if steps is not None else None)
    hist = dict(train=[], val=[], config=dict(cfg), params=n_params(model), batch_size=batch_size,
                lr=lr, weight_decay=weight_decay, seed=seed, data_seed=data_seed, autocast=autocast)
    log(f"params {hist['params']:,} (vision {n_params(model.model.vision_tower):,}, "
        f"lm {n_params(model.model.language_model) + n_params(model.lm_head):,}); "
        f"{n_img} image tokens; batch {batch_size}, lr {lr}")

    train_time = 0.0
    run_loss = run_acc = run_n = 0.0
    t_log = time.perf_counter()
    n_log = 0
    step = 0
    while step < total and train_time < budget:
        if steps is None and step == calib_steps:
            per_step = train_time / calib_steps
            total = max(calib_steps + 1, int(budget * 0.97 / per_step))
            log(f"calibrated: {per_step:.2f} s/step -> {total} steps in {budget / 60:.1f} min")
        if warm is None and step == calib_steps:
            warm = max(1, total // 25)
        t0 = time.perf_counter()
        if samples is not None:
            chunk = [samples[(step * batch_size + b) % len(samples)] for b in range(batch_size)]
        else:
            chunk = [vqa.sample_at("train", step * batch_size + b, seed=data_seed) for b in range(batch_size)]
        batch = make_batch(chunk, vocab, n_img, size)
        cur = lr_at(step, total, lr, warm if warm is not None else max(1, calib_steps * 4))
        for g in opt.param_groups:
            g["lr"] = cur
        with ctx():
            loss, correct = batch_loss(model, batch, vocab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        train_time += time.perf_counter() - t0
        step += 1
        run_loss += loss.item() * len(chunk)
        run_acc += correct.sum().item()
        run_n += len(chunk)
        n_log += len(chunk)
        if step % log_every == 0 or step == total:
            now = time.perf_counter()
            rec = dict(step=step, samples=step * batch_size, loss=run_loss / run_n, acc=run_acc / run_n,
                       lr=cur, sps=n_log / (now - t_log), train_min=train_time / 60)
            hist["train"].append(rec)
            log(f"step {step:5d}  loss {rec['loss']:.4f}  acc {rec['acc']:.3f}  lr {cur:.2e}  "
                f"{rec['sps']:.1f} samples/s  {rec['train_min']:.1f} min")
            run_loss = run_acc = run_n = 0.0
            t_log, n_log = time.perf_counter(), 0
        if val and eval_every and step % eval_every == 0 and step < total:
            _eval(model, val, vocab, step, hist, log, autocast)
            t_log = time.perf_counter()
    hist["steps"] = step
    hist["train_minutes"] = train_time / 60
    if val:
        _eval(model, val, vocab, step, hist, log, autocast)
    model.eval()
    return model, hist


def _eval(model, val, vocab, step, hist, log, autocast):
    t = time.perf_counter()
    acc = evaluate(model, val, vocab, autocast=autocast)
    hist["val"].append(dict(step=step, **acc))
    log(f"  val@{step}: " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items())
        + f"  ({time.perf_counter() - t:.0f} s)")


def save(model, out: str, meta: dict) -> None:
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    vocab = vqa.Vocab()
    meta = dict(meta, vocab=[vocab.decode([i]) for i in range(len(vocab))],
                special=dict(pad=vocab.pad_id, bos=vocab.bos_id, eos=vocab.eos_id, image=vocab.image_id),
                prompt="<bos> USER: <image>*N \\n{question} ASSISTANT:", image_tokens=_image_tokens(model))
    with open(os.path.join(out, "train_meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


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
    a = ap.parse_args(argv)
    if a.steps is None and a.minutes is None:
        ap.error("give --steps and/or --minutes")
    cfg = dict(CONFIGS[a.config])
    for kv in a.set:
        k, v = kv.split("=", 1)
        cfg[k] = int(v) if v.lstrip("-").isdigit() else v
    model, hist = train(cfg, steps=a.steps, minutes=a.minutes, batch_size=a.batch, lr=a.lr,
                        weight_decay=a.weight_decay, warmup=a.warmup, seed=a.seed, data_seed=a.data_seed,
                        eval_n=a.eval_n, eval_every=a.eval_every, threads=a.threads, autocast=a.bf16,
                        log=lambda m: print(m, flush=True))
    if a.out:
        save(model, a.out, hist)
        size = os.path.getsize(os.path.join(a.out, "model.safetensors"))
        print(f"saved {a.out} ({size / 2**20:.2f} MiB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
