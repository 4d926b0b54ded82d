"""`graphprune bench`: accuracy, speed and cost of pruning methods on a VQA model.

Grid mode (default): methods x budgets (192 / 128 / 64 of 576 and each method's own defaults)
on the shipped VQA model and the synthetic test split (or --model / --data). Per cell: accuracy
(greedy first answer token; per question type too) and % of unpruned, prefill and end-to-end
time (medians, variants interleaved round-robin so machine drift hits all alike), speed-up vs
unpruned, prefill FLOPs and KV-cache bytes (graphprune's own report, batch 1).

Speed mode (--speed): a larger random-weight LLaVA built from a config (SPEED_CONFIG), each
method at 64 of 576 kept after layer 2. Per method: measured LLM-prefill speed-up (the prefill
graph alone), the FLOPs-ideal speed-up, their ratio, the selection overhead (the same pruned
graphs with every scoring/selection node replaced by its recorded output, timed interleaved with
the real ones: overhead = real - fixed, as a share of the pruned vision + LLM prefill time) and
the decode time per token through the shrunk caches.
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

from . import tokenops

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
# speed mode: every method with 64 of 576 vision tokens kept from LLM layer 2 on (VTW keeps none,
# cls_topk selects before the LLM)
SPEED_METHODS = {
    "fastv": "fastv(layer=2, keep=64)", "dart": "dart(layer=2, keep=64)", "random": "random(layer=2, keep=64)",
    "mustdrop": "mustdrop(keep=64, layers=(2, 6))", "visiontrim": "visiontrim(keep=64, stage='llm', layer=2)",
    "vtw": "vtw(layer=2)", "cls_topk": "cls_topk(keep=64)",
}
SPEED_CONFIG = dict(image_size=336, patch=14, vision_hidden=768, vision_layers=6, vision_heads=12, vision_mlp=3072,
                    hidden=1024, layers=8, heads=16, kv_heads=16, mlp=2816, projector_act="gelu")
SELECTION_FNS = (tokenops.select_topk, tokenops.apply_choice, tokenops.withdraw_all, tokenops.protect_topk)


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


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "processor": platform.processor()}


# -- instrumenting the stage graphs ---------------------------------------------------------------

class _StageProxy:
    """Stands in for a stage's GraphModule: same placeholders and output names, another call."""

    def __init__(self, gm, call):
        self.gm, self.call = gm, call
        self.graph, self.meta = gm.graph, gm.meta

    def __call__(self, *args):
        return self.call(*args)


def executed_graphs(pruned) -> dict:
    """{stage: the graph PrunedModel runs} for the vision and prefill stages (None: eager / absent)."""
    return dict(pruned._exec)


def with_proxies(pruned, make) -> object:
    """A shallow copy of a PrunedModel that runs `make(stage_name, gm)` in place of its vision and
    prefill graphs (the original, its program and its reports are untouched)."""
    import copy
    clone = copy.copy(pruned)
    clone._exec = {k: None if gm is None else make(k, gm) for k, gm in executed_graphs(pruned).items()}
    return clone


def timed(pruned) -> tuple[object, dict]:
    """(copy of pruned whose vision / prefill graphs add their run time to the dict, that dict)."""
    spent = {"vision": 0.0, "prefill": 0.0}

    def make(name, gm):
        def call(*args):
            t = time.perf_counter()
            out = gm(*args)
            spent[name] += time.perf_counter() - t
            return out
        return _StageProxy(gm, call)
    return with_proxies(pruned, make), spent


def record_selections(pruned, inputs: dict) -> dict:
    """Run pruned(**inputs) through an fx Interpreter and return {stage: [(node, args, output,
    kwargs of the pass's choose function or None)]} for every selection node (top-k / choose /
    withdraw / protect), in graph order, plus {"output": PrunedOutput}."""
    from torch import fx
    records = {"vision": [], "prefill": []}

    class Rec(fx.Interpreter):
        def __init__(self, gm, name):
            super().__init__(gm, garbage_collect_values=False)
            self.name = name

        def run_node(self, n):
            out = super().run_node(n)
            if n.op == "call_function" and n.target in SELECTION_FNS:
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                choice_kw = None
                if n.target is tokenops.apply_choice and isinstance(n.args[0], fx.Node):
                    choice_kw = self.fetch_args_kwargs_from_env(n.args[0])[1]
                records[self.name].append((n, args, out, choice_kw))
            return out

    clone = with_proxies(pruned, lambda name, gm: _StageProxy(gm, lambda *a, gm=gm, name=name: Rec(gm, name).run(*a)))
    records["output"] = clone(**inputs)
    return records


def fixed_selection(pruned, inputs: dict):
    """A copy of pruned whose selection nodes are replaced by the outputs they produced on
    `inputs` (constants of the same shapes), the scoring / signal nodes feeding only them removed:
    the same pruned computation without the cost of choosing. Valid for these inputs only."""
    from torch import fx
    records = record_selections(pruned, inputs)

    def make(name, gm):
        recs = records[name]
        if not recs:
            return gm
        new = fx.GraphModule(gm, gm.graph.__deepcopy__())
        new.meta.update(gm.meta)
        nodes = {n.name: n for n in new.graph.nodes}
        for i, (old, _, out, _) in enumerate(recs):
            n = nodes[old.name]
            consts = _as_consts(new, f"_fixed_{i}", out, n)
            if isinstance(out, torch.Tensor):
                n.replace_all_uses_with(consts)
            else:
                for user in list(n.users):
                    user.replace_all_uses_with(consts[user.args[1]])
                    new.graph.erase_node(user)
            new.graph.erase_node(n)
        new.graph.eliminate_dead_code()
        new.recompile()
        return new
    return with_proxies(pruned, make)


def _as_consts(gm, prefix, out, node):
    g = gm.graph
    with g.inserting_before(node):
        if isinstance(out, torch.Tensor):
            gm.register_buffer(prefix, out.clone())
            return g.get_attr(prefix)
        consts = []
        for j, t in enumerate(out):
            if isinstance(t, torch.Tensor):
                gm.register_buffer(f"{prefix}_{j}", t.clone())
                consts.append(g.get_attr(f"{prefix}_{j}"))
            else:
                consts.append(t)
        return consts


# -- grid mode -------------------------------------------------------------------------------------

def predict(vm: VQAModel, pruned, inputs: dict, max_new_tokens: int = 8) -> tuple[list[str], object]:
    """(greedy answers, prefill output). VQA vocab: the first answer token; HF processor: the first
    word of a greedy decode."""
    out = pruned(**inputs)
    if vm.vocab is not None:
        return [vm.vocab.decode([int(t)]) for t in out.logits[:, -1].argmax(-1)], out
    ids = pruned.generate(**inputs, max_new_tokens=max_new_tokens)[:, inputs["input_ids"].shape[1]:]
    return [(vm.decode(r).split() or [""])[0].strip(".,!?").lower() for r in ids], out


def prepare(vm: VQAModel, cells) -> tuple[list, list]:
    """Prune the model for every cell (all errors before any data runs): ([(method, budget, spec,
    PrunedModel)] with the unpruned baseline first, [skipped default cells with the reason])."""
    from . import prune
    from .errors import PassConfigError, PassNotApplicable
    out, skipped = [("unpruned", "-", None, prune(vm.model))], []
    for method, budget, spec in cells:
        try:
            out.append((method, budget, spec, prune(vm.model, spec)))
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


# -- speed mode ------------------------------------------------------------------------------------

def run_speed(methods=None, *, repeats=5, decode_steps=16, batch=1, config=None, quiet=False) -> dict:
    """Measured vs FLOPs-ideal LLM-prefill speed-up, selection overhead and decode time per
    token for each method at 64 of 576 kept after layer 2, on a random-weight model."""
    from . import prune, vqa, zoo
    methods = list(methods or SPEED_METHODS)
    for m in methods:
        if m not in SPEED_METHODS:
            raise BenchError(f"unknown speed-mode method {m!r}; have {', '.join(SPEED_METHODS)}")
    cfg = dict(config or SPEED_CONFIG)
    prog = Progress(3 + 2 * len(methods) + 2 * repeats, "speed", not quiet)
    model = zoo.build_model(cfg, 0).eval()
    vm = wrap_model(model, "speed", "random weights", vocab=vqa.Vocab())
    prog.step("captured")
    kw = vm.inputs(load_items(None, batch))
    base = prune(model)
    real = {m: prune(model, SPEED_METHODS[m]) for m in methods}
    fixed = {}
    for m in methods:
        fixed[m] = fixed_selection(real[m], kw)
        prog.step(f"fixed {m}")
    variants = {("unpruned", "real"): base, **{(m, "real"): real[m] for m in methods},
                **{(m, "fixed"): fixed[m] for m in methods}}
    clocks = {k: timed(pm) for k, pm in variants.items()}
    samples = {k: {"vision": [], "prefill": [], "total": []} for k in variants}
    with torch.inference_mode():
        for (pm_t, spent) in clocks.values():
            pm_t(**kw)                                               # warm-up
        prog.step("warm-up")
        for _ in range(repeats):
            for k, (pm_t, spent) in clocks.items():
                spent.update(vision=0.0, prefill=0.0)
                t = time.perf_counter()
                pm_t(**kw)
                samples[k]["total"].append(time.perf_counter() - t)
                samples[k]["vision"].append(spent["vision"])
                samples[k]["prefill"].append(spent["prefill"])
            prog.step("prefill")
    decode = interleaved({k: _decoder(pm, kw, decode_steps) for k, pm in variants.items() if k[1] == "real"},
                         repeats, prog)
    med = {k: {c: statistics.median(v) for c, v in s.items()} for k, s in samples.items()}
    for pm in [base, *real.values()]:
        pm(**kw)
    b = med[("unpruned", "real")]
    rows = [{"method": "unpruned", "pipeline": "(unpruned)", "llm_prefill_ms": b["prefill"] * 1e3,
             "vision_ms": b["vision"] * 1e3, "prefill_ms": b["total"] * 1e3, "flops": base.report.flops,
             "decode_ms_per_token": decode[("unpruned", "real")] / decode_steps * 1e3}]
    for m in methods:
        r, f = med[(m, "real")], med[(m, "fixed")]
        ideal = base.report.flops / real[m].report.flops
        measured = b["prefill"] / r["prefill"]
        overhead = (r["vision"] + r["prefill"]) - (f["vision"] + f["prefill"])
        dec = decode[(m, "real")] / decode_steps * 1e3
        rows.append({"method": m, "pipeline": " | ".join(repr(p) for p in real[m].pipeline),
                     "llm_prefill_ms": r["prefill"] * 1e3, "vision_ms": r["vision"] * 1e3,
                     "prefill_ms": r["total"] * 1e3,
                     "fixed_llm_prefill_ms": f["prefill"] * 1e3, "fixed_vision_ms": f["vision"] * 1e3,
                     "flops": real[m].report.flops, "ideal_speedup": ideal, "measured_speedup": measured,
                     "ratio": measured / ideal, "selection_overhead": overhead / (r["vision"] + r["prefill"]),
                     "decode_ms_per_token": dec, "decode_vs_unpruned": dec / rows[0]["decode_ms_per_token"],
                     "targets": {"measured_ge_0.9_ideal": measured >= 0.9 * ideal,
                                 "overhead_le_2pct": overhead <= 0.02 * (r["vision"] + r["prefill"]),
                                 "decode_le_unpruned": dec <= rows[0]["decode_ms_per_token"]}})
    return {"config": cfg, "batch": batch, "repeats": repeats, "decode_steps": decode_steps,
            "prompt_tokens": int(kw["input_ids"].shape[1]), "vision_tokens": vm.tokens_per_image, "rows": rows,
            "method": ("LLM prefill = the prefill graph alone; ideal = its FLOPs ratio (graphprune's accountant); "
                       "selection overhead = (real - fixed) vision + prefill graph time over the real one, fixed = "
                       "the same graphs with every selection node replaced by its recorded output and the scoring "
                       "nodes feeding only it removed; decode = greedy steps through the per-layer caches; all "
                       "medians, variants interleaved round-robin")}


def _decoder(pm, kw, steps):
    out = pm(**kw)

    def run():
        logits, cache = out.logits[:, -1], out.cache
        pos = out.positions.amax(-1, keepdim=True) + 1
        for s in range(steps):
            logits, cache = pm._step(cache, logits.argmax(-1), pos + s)
    return run


def format_speed(res: dict) -> str:
    c = res["config"]
    lines = [f"speed mode: random-weight LLaVA, LLM {c['hidden']} x {c['layers']} layers, "
             f"vision {c['vision_hidden']} x "
             f"{c['vision_layers']}; batch {res['batch']}, {res['prompt_tokens']} prompt tokens "
             f"({res['vision_tokens']} vision); medians of {res['repeats']} interleaved rounds", ""]
    head = (f"{'method':<11}{'LLM ms':>9}{'ideal':>8}{'measured':>10}{'ratio':>7}{'select %':>10}"
            f"{'decode ms/tok':>15}{'vs unpr':>9}  targets")
    lines += [head, "-" * len(head)]
    for r in res["rows"]:
        if r["method"] == "unpruned":
            lines.append(f"{'unpruned':<11}{r['llm_prefill_ms']:>9.1f}{'':>8}{'':>10}{'':>7}{'':>10}"
                         f"{r['decode_ms_per_token']:>15.2f}")
            continue
        ok = " ".join(("ok" if v else "MISS") for v in r["targets"].values())
        lines.append(f"{r['method']:<11}{r['llm_prefill_ms']:>9.1f}{r['ideal_speedup']:>7.2f}x"
                     f"{r['measured_speedup']:>9.2f}x"
                     f"{r['ratio']:>7.2f}{100 * r['selection_overhead']:>9.1f}%{r['decode_ms_per_token']:>15.2f}"
                     f"{r['decode_vs_unpruned']:>8.2f}x  {ok}")
    lines.append("targets: measured >= 0.9 x ideal, selection <= 2% of pruned prefill, decode/token <= unpruned")
    lines.append(res["method"])
    return "\n".join(lines)
