"""`graphprune bench`: accuracy, speed and cost of pruning methods on a VQA model.

Grid mode (default): methods x budgets (192 / 128 / 64 of 576 and each method's own defaults)
on the shipped VQA model and the synthetic test split (or --model / --data). Per cell: accuracy
(greedy first answer token; per question type too) and % of unpruned, prefill and end-to-end
time (medians, variants interleaved round-robin so machine drift hits all alike), speed-up vs
unpruned, prefill FLOPs and KV-cache bytes (graphprune's own report, batch 1).

Speed mode (--speed) is graphprune.speed; the stage-graph instrumentation both use (timing,
selection replay) is graphprune.instrument.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch


# method -> (pipeline at a budget, pipeline of the method's own defaults). {layers}: MustDrop's
# filter layers (2, 6, 10, 14) that exist in the model; {half}: VTW's layer 16 of 32 -> L // 2.
METHODS = {
    "fastv": ("fastv(layer=2, keep={keep})", "fastv"),
    "dart": ("dart(layer=2, keep={keep})", "dart"),
    "random": ("random(layer=2, keep={keep})", "random"),
    "cls_topk": ("cls_topk(keep={keep})", "cls_topk"),
    "mustdrop": ("mustdrop(keep={keep}, layers={layers}{thresholds})", "mustdrop(layers={layers})"),
    "visiontrim": ("visiontrim(keep={keep})", "visiontrim"),
    "vtw": (None, "vtw(layer={half})"),
}


class BenchError(ValueError):
    """Bad input to bench / demo / visualize (printed as `graphprune: error: ...`)."""


# -- models and data ------------------------------------------------------------------------------

@dataclass
class Item:
    image: torch.Tensor          # (3, H, W) uint8
    question: str
    answer: str
    qtype: str = "all"
    uid: str = ""


@dataclass
class VQAModel:
    """A model and how to turn items into its inputs (a graphprune.vqa.Vocab or an HF processor)."""
    model: object
    name: str
    source: str
    vocab: object = None
    processor: object = None
    grid: tuple = None                     # (rows, cols) of the patch grid

    @property
    def image_size(self) -> int:
        return self.model.config.vision_config.image_size

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    def inputs(self, items: list[Item]) -> dict:
        """Left-padded batch: input_ids, attention_mask, pixel_values."""
        if self.processor is not None:
            prompts = [f"USER: <image>\n{it.question} ASSISTANT:" for it in items]
            self.processor.tokenizer.padding_side = "left"
            return dict(self.processor(images=[it.image.permute(1, 2, 0).numpy() for it in items], text=prompts,
                                       return_tensors="pt", padding=True))
        from . import vqa
        rows = [self.vocab.prompt_ids(it.question, self.tokens_per_image) for it in items]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.vocab.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        images = torch.stack([resize(it.image, self.image_size) for it in items])
        return dict(input_ids=ids, attention_mask=mask, pixel_values=vqa.pixel_values(images))

    def decode(self, ids) -> str:
        if self.vocab is not None:
            return self.vocab.decode(ids, skip_special=True)
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, size, size) (area average down, bilinear up)."""
    if image.shape[-2:] == (size, size):
        return image
    mode = "area" if min(image.shape[-2:]) >= size else "bilinear"
    x = torch.nn.functional.interpolate(image[None].float(), size=(size, size), mode=mode)
    return x[0].round().clamp(0, 255).to(torch.uint8)


_LOADED: dict = {}


def load_vqa_model(spec: str | None) -> VQAModel:
    """A VQAModel, loaded (and captured) once per process. spec None: the shipped model; "random" /
    "random:CONFIG": zoo.build_model(zoo.CONFIGS[CONFIG]) with random weights; a save_pretrained
    directory of a graphprune VQA model; any other local path or hub id in the local Hugging Face
    cache (LLaVA-style, with its processor; offline)."""
    if spec not in _LOADED:
        _LOADED[spec] = _load(spec)
    return _LOADED[spec]


def _load(spec):
    from . import zoo
    if spec is None or spec in ("shipped", "vqa"):
        try:
            model, vocab = zoo.vqa_llava()
        except FileNotFoundError as e:
            raise BenchError(f"{e}\n(or pass --model random for the same architecture with random weights)") from None
        return wrap_model(model, "shipped", "graphprune/weights/vqa_llava (trained)", vocab=vocab)
    if spec == "random" or spec.startswith("random:"):
        cfg = spec.partition(":")[2] or "default"
        if cfg not in zoo.CONFIGS:
            raise BenchError(f"--model {spec}: unknown config {cfg!r} (have {', '.join(zoo.CONFIGS)})")
        from . import vqa
        return wrap_model(zoo.build_model(zoo.CONFIGS[cfg], 0).eval(), spec, f"zoo.CONFIGS[{cfg!r}], random weights",
                     vocab=vqa.Vocab())
    if _is_vqa_dir(spec):
        model, vocab = zoo.vqa_llava(spec)
        return wrap_model(model, spec, "trained VQA model (local directory)", vocab=vocab)
    from .cli import load_model
    model, source = load_model(spec)
    try:
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as e:
        raise BenchError(f"{spec}: no processor in the local files ({str(e).splitlines()[0]}); bench needs one to "
                         "tokenize questions") from None
    return wrap_model(model, spec, source, processor=processor)


def _is_vqa_dir(path: str) -> bool:
    """A save_pretrained directory of a graphprune VQA model (its LLM speaks graphprune.vqa.Vocab)."""
    from . import vqa
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False
    image_id = cfg.get("image_token_id", cfg.get("image_token_index"))       # saved under either name
    return cfg.get("text_config", {}).get("vocab_size") == len(vqa.Vocab()) and image_id == vqa.Vocab().image_id


def wrap_model(model, name, source, **kw) -> VQAModel:
    """A VQAModel for a LLaVA-style model with a captured patch grid (kw: vocab= or processor=)."""
    from . import prune
    anat = prune(model).program.anatomy.get("vision")          # captures once (prune caches it)
    if anat is None or anat.grid is None:
        raise BenchError(f"{name}: {type(model).__name__} has no captured vision stage with a patch grid")
    return VQAModel(model, name, source, grid=tuple(anat.grid), **kw)


def load_items(data: str | None, n: int, split: str = "test", seed: int = 0) -> list[Item]:
    """n items of the synthetic VQA split, or of a JSONL file / folder of them (one object a line:
    image (path relative to the file), question, answer, optional type)."""
    if data is None:
        from . import vqa
        return [Item(s.image, s.question, s.answer, s.qtype, s.uid) for s in vqa.generate(split, n, seed)]
    files = sorted(os.path.join(data, f) for f in os.listdir(data) if f.endswith(".jsonl")) \
        if os.path.isdir(data) else [data]
    if not files or not all(os.path.isfile(f) for f in files):
        raise BenchError(f"--data {data}: no such JSONL file (or folder with *.jsonl)")
    items = []
    for path in files:
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rec = json.loads(line)
                missing = [k for k in ("image", "question", "answer") if k not in rec]
                if missing:
                    raise BenchError(f"{path}:{line_no}: missing {', '.join(missing)}")
                img_path = os.path.join(os.path.dirname(path), rec["image"])
                items.append(Item(read_image(img_path), rec["question"], str(rec["answer"]),
                                  rec.get("type", "all"), f"{os.path.basename(path)}:{line_no}"))
                if len(items) == n:
                    return items
    return items


def read_image(path: str) -> torch.Tensor:
    """uint8 (3, H, W) from a PNG (built-in reader) or any format Pillow reads, if installed."""
    if not os.path.isfile(path):
        raise BenchError(f"image {path} does not exist")
    try:
        from PIL import Image
    except ImportError:
        from .visualize import read_png
        return read_png(path)
    import numpy as np
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).contiguous()
    except OSError as e:
        raise BenchError(f"cannot read image {path}: {e}") from None


# -- the grid --------------------------------------------------------------------------------------

def grid_specs(methods, budgets, num_layers: int, tokens: int) -> list[tuple[str, str, str]]:
    """[(method, budget label, pipeline)]: every method at every budget, plus its own defaults
    when they differ from every budget cell. Raises BenchError for unknown names / bad budgets."""
    layers = tuple(l for l in (2, 6, 10, 14) if l < num_layers)
    fill = dict(layers=layers, half=min(16, num_layers // 2))
    cells = []
    for m in methods:
        if m not in METHODS:
            raise BenchError(f"unknown method {m!r}; bench knows {', '.join(METHODS)} (use --pipeline for others)")
        at, default = METHODS[m]
        for b in budgets:
            if b == "default":
                cells.append((m, "default", default.format(**fill)))
            elif at is not None:
                if not 0 < b <= tokens:
                    raise BenchError(f"budget {b}: must lie in 1..{tokens} (vision tokens per image)")
                cells.append((m, str(b), at.format(keep=b, thresholds=_thresholds(b), **fill)))
    return cells


def _thresholds(keep: int) -> str:
    """MustDrop's filter thresholds exist for 192 / 128 / 64 kept; other budgets use the nearest
    preset's (gamma, alpha), the budget staying the static capacity."""
    from .passes.mustdrop import FILTER_PRESETS
    if keep in FILTER_PRESETS:
        return ""
    gamma, alpha = FILTER_PRESETS[min(FILTER_PRESETS, key=lambda k: abs(math.log(k / keep)))]
    return f", gamma={gamma}, alpha={alpha}"


def parse_budgets(text: str) -> list:
    out = []
    for part in text.split(","):
        part = part.strip()
        if part == "default":
            out.append(part)
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise BenchError(f"--budgets: {part!r} is neither a positive int nor 'default'")
    return out


class Progress:
    """A one-line stderr progress bar."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.done, self.label, self.t0 = max(total, 1), 0, label, time.time()
        self.enabled = enabled and sys.stderr.isatty()

    def step(self, what: str = "", n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {time.time() - self.t0:5.0f}s "
                         f"{what[:40]:<40}")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def interleaved(fns: dict, repeats: int, progress: Progress | None = None) -> dict:
    """{name: median seconds}: one warm-up each, then `repeats` rounds, each timing every fn once
    (under torch.inference_mode)."""
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
            if progress:
                progress.step("timing")
    return {k: statistics.median(v) for k, v in times.items()}


_ALLOCATOR = "default"


def keep_freed_memory() -> str:
    """Have glibc keep freed blocks up to 32 MiB in the heap instead of returning them to the OS.
    By default a large activation is a fresh mmap that page-faults on first touch, every call: a
    cost per byte that is noisy and lands mostly on the unpruned model's big tensors (what
    tcmalloc / jemalloc avoid; PyTorch's CPU tuning guide recommends them). Timing runs only:
    the process keeps more memory. Returns what the allocator is now, for the record."""
    global _ALLOCATOR
    if platform.libc_ver()[0] == "glibc" and _ALLOCATOR == "default":
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        if libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30):
            _ALLOCATOR = "glibc, mmap threshold 32 MiB, trim threshold 1 GiB"
    return _ALLOCATOR


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "processor": platform.processor(),
            "allocator": _ALLOCATOR}


# -- grid mode -------------------------------------------------------------------------------------

def predict(vm: VQAModel, pruned, inputs: dict, max_new_tokens: int = 8) -> tuple[list[str], object]:
    """(greedy answers, prefill output). VQA vocab: the first answer token; HF processor: the first
    word of a greedy decode."""
    out = pruned(**inputs)
    if vm.vocab is not None:
        return [vm.vocab.decode([int(t)]) for t in out.logits[:, -1].argmax(-1)], out
    ids = pruned.generate(**inputs, max_new_tokens=max_new_tokens)[:, inputs["input_ids"].shape[1]:]
    return [(vm.decode(r).split() or [""])[0].strip(".,!?").lower() for r in ids], out


def prepare(vm: VQAModel, cells, linear: str = "aten") -> tuple[list, list]:
    """Prune the model for every cell (all errors before any data runs): ([(method, budget, spec,
    PrunedModel)] with the unpruned baseline first, [skipped default cells with the reason]).
    `linear`: prune(linear=...) for every cell and the baseline."""
    from . import prune
    from .errors import PassConfigError, PassNotApplicable
    out, skipped = [("unpruned", "-", None, prune(vm.model, linear=linear))], []
    for method, budget, spec in cells:
        try:
            out.append((method, budget, spec, prune(vm.model, spec, linear=linear)))
        except (PassConfigError, PassNotApplicable) as e:
            if budget != "default":
                raise
            skipped.append({"method": method, "budget": budget, "pipeline": spec, "reason": str(e)})
    return out, skipped


def run_grid(vm: VQAModel, prepared, items, *, batch=16, time_batch=8, repeats=5, decode_tokens=2,
             quiet=False) -> dict:
    """Accuracy on every item, interleaved timings on the first `time_batch` items, batch-1 costs."""
    from .visualize import kept_patches
    variants = [v[:3] for v in prepared]
    models = [v[3] for v in prepared]
    batches = [items[i:i + batch] for i in range(0, len(items), batch)]
    prog = Progress(len(variants) * (len(batches) + 1) + repeats, "bench", not quiet)
    rows = []
    for (method, budget, spec), pm in zip(variants, models):
        hits, by_type, kept = 0, {}, []
        for bt in batches:
            kw = vm.inputs(bt)
            answers, out = predict(vm, pm, kw)
            kept += [sum(len(p) for p in s) for s in kept_patches(out, kw["input_ids"], vm.model.config.image_token_id)]
            for it, a in zip(bt, answers):
                ok = a == it.answer.lower()
                hits += ok
                t = by_type.setdefault(it.qtype, [0, 0])
                t[0], t[1] = t[0] + ok, t[1] + 1
            prog.step(f"{method} {budget}")
        kw1 = vm.inputs(items[:1])
        pm(**kw1)
        rep = pm.report
        rows.append({"method": method, "budget": budget,
                     "pipeline": " | ".join(repr(p) for p in pm.pipeline) or "(unpruned)", "accuracy": hits / len(items),
                     "accuracy_by_type": {k: v[0] / v[1] for k, v in sorted(by_type.items())},
                     "vision_tokens_kept": statistics.mean(kept), "vision_tokens_into_llm": rep.vision_tokens_in,
                     "tokens_per_layer": rep.tokens_per_layer, "flops": rep.flops, "kv_bytes": rep.kv_bytes})
        prog.step("costs")
    kw = vm.inputs(items[:time_batch])
    fns = {}
    for i, pm in enumerate(models):
        fns[("prefill", i)] = lambda pm=pm: pm(**kw)
        fns[("e2e", i)] = lambda pm=pm: pm.generate(**kw, max_new_tokens=decode_tokens)
    med = interleaved(fns, repeats, prog)
    base = rows[0]
    for i, r in enumerate(rows):
        r["prefill_ms"], r["e2e_ms"] = med[("prefill", i)] * 1e3, med[("e2e", i)] * 1e3
        r["speedup"] = base["prefill_ms"] / r["prefill_ms"] if i else 1.0
        r["e2e_speedup"] = base["e2e_ms"] / r["e2e_ms"] if i else 1.0
        r["pct_of_unpruned"] = 100 * r["accuracy"] / base["accuracy"] if base["accuracy"] else None
        r["flops_ratio"], r["kv_ratio"] = r["flops"] / base["flops"], r["kv_bytes"] / base["kv_bytes"]
    return {"cells": rows, "timing": {"batch": len(items[:time_batch]), "repeats": repeats,
                                      "decode_tokens": decode_tokens,
                                      "note": "medians; variants interleaved round-robin after one warm-up each"},
            "costs_note": "FLOPs and KV bytes of one prefill of the first item (batch 1), from pruned.report"}


def format_grid(res: dict) -> str:
    t = res["timing"]
    head = (f"{'method':<11}{'budget':>8}{'kept':>7}{'acc %':>7}{'% unpr':>8}{'prefill ms':>12}{'e2e ms':>9}"
            f"{'speed-up':>9}{'GFLOPs':>9}{'KV MiB':>9}")
    lines = [head, "-" * len(head)]
    for r in res["cells"]:
        pct = "-" if r["pct_of_unpruned"] is None else f"{r['pct_of_unpruned']:.0f}"
        lines.append(f"{r['method']:<11}{r['budget']:>8}{r['vision_tokens_kept']:>7.0f}{100 * r['accuracy']:>7.1f}"
                     f"{pct:>8}{r['prefill_ms']:>12.1f}{r['e2e_ms']:>9.1f}{r['speedup']:>8.2f}x"
                     f"{r['flops'] / 1e9:>9.3g}{r['kv_bytes'] / 2**20:>9.3g}")
    lines.append(f"kept: vision tokens per sample in the last layer (mean); times: batch {t['batch']}, median of "
                 f"{t['repeats']} interleaved rounds; e2e = prefill + {t['decode_tokens']} greedy tokens; "
                 "GFLOPs / KV: prefill of one sample")
    lines += [f"custom {r['budget']}: {r['pipeline']}" for r in res["cells"] if r["method"] == "custom"]
    return "\n".join(lines)


def plot_grid(res: dict, path: str, title: str) -> None:
    """Accuracy vs prefill time, one line per method (the papers' Pareto view)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    by_method = {}
    for r in res["cells"]:
        by_method.setdefault(r["method"], []).append(r)
    for m, rows in by_method.items():
        rows = sorted(rows, key=lambda r: r["prefill_ms"])
        x, y = [r["prefill_ms"] for r in rows], [100 * r["accuracy"] for r in rows]
        if m == "unpruned":
            ax.scatter(x, y, marker="*", s=160, color="black", label="unpruned", zorder=3)
            continue
        ax.plot(x, y, marker="o", label=m)
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(r["budget"], (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7)
    accs = [100 * r["accuracy"] for r in res["cells"]]
    ax.set_ylim(max(0, min(accs) - 5), min(100, max(accs) + 5)) if max(accs) > min(accs) else ax.set_ylim(0, 100)
    ax.set_xlabel("prefill time per batch (ms, median)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
