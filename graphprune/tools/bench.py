"""`graphprune bench`: accuracy, speed and cost of pruning methods on a VQA model.

Grid mode (default): methods x budgets (192 / 128 / 64 of 576 and each method's own defaults)
on the shipped VQA model and the synthetic test split (or --model / --data). Per cell: accuracy
(greedy first answer token; per question type too) and % of unpruned, prefill and end-to-end
time (medians, variants interleaved round-robin so machine drift hits all alike), speed-up vs
unpruned, prefill FLOPs and KV-cache bytes (graphprune's own report, batch 1).

Speed mode (--speed) is graphprune.tools.speed; the stage-graph instrumentation both use (timing,
selection replay) is graphprune.tools.instrument.
"""
from __future__ import annotations

import math
import statistics

from graphprune.families.base import feature_layers  # noqa: F401  (bench.feature_layers: the grid's vision layers)
from graphprune.tools.timing import Progress, interleaved
from graphprune.tools.vqa_model import BenchError, VQAModel

# method -> (pipeline at a budget, pipeline of the method's own defaults). {layers}: MustDrop's
# filter layers (2, 6, 10, 14) that exist in the model; {half}: VTW's layer 16 of 32 -> L // 2;
# {stages}: PyramidDrop's layers 8, 16, 24 of 32 -> L/4, L/2, 3L/4; {pyramid}: its ratios ending at the
# budget, each stage keeping twice the next (capped at every token); {sparse}: SparseVLM's layers
# 2, 6, 15, 19 of 32 -> L x l / 32 (at most L - 2: the layer after each runs reduced); {tome}: ToMe
# merges after every encoder layer feeding the features (its own default: CLIP ViT-L's 0..22).
METHODS = {
    "fastv": ("fastv(layer=2, keep={keep})", "fastv"),
    "dart": ("dart(layer=2, keep={keep})", "dart"),
    "random": ("random(layer=2, keep={keep})", "random"),
    "cls_topk": ("cls_topk(keep={keep})", "cls_topk"),
    "mustdrop": ("mustdrop(keep={keep}, layers={layers}{thresholds})", "mustdrop(layers={layers})"),
    "visiontrim": ("visiontrim(keep={keep})", "visiontrim"),
    "vtw": (None, "vtw(layer={half})"),
    "visionzip": ("visionzip(keep={keep})", "visionzip"),
    "divprune": ("divprune(keep={keep})", "divprune"),
    "cdpruner": ("cdpruner(keep={keep})", "cdpruner"),
    "vispruner": ("vispruner(keep={keep})", "vispruner"),
    "pyramiddrop": ("pyramiddrop(layers={stages}, ratios={pyramid})", "pyramiddrop(layers={stages})"),
    "sparsevlm": ("sparsevlm(keep={keep}, layers={sparse}{scale_bias})", "sparsevlm(layers={sparse})"),
    "tome": ("tome(keep={keep}{tome})", "tome({tome_default})"),
}


# -- the grid --------------------------------------------------------------------------------------

def grid_specs(methods, budgets, num_layers: int, tokens: int, vision_layers: int | None = None
               ) -> list[tuple[str, str, str]]:
    """[(method, budget label, pipeline)]: every method at every budget, plus its own defaults
    when they differ from every budget cell. vision_layers: encoder layers feeding the features
    (None: each method's default). Raises BenchError for unknown names / bad budgets."""
    layers = tuple(l for l in (2, 6, 10, 14) if l < num_layers)
    stages = tuple(sorted({max(1, num_layers * i // 4) for i in (1, 2, 3)} - {num_layers}))
    sparse = tuple(sorted({min(num_layers - 2, num_layers * l // 32) for l in (2, 6, 15, 19)}))
    tome = "" if vision_layers is None else f"layers={tuple(range(vision_layers))}"
    fill = dict(layers=layers, half=min(16, num_layers // 2), stages=stages, sparse=sparse,
                tome=tome and ", " + tome, tome_default=tome)
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
                pyramid = tuple(min(1.0, b * 2 ** i / tokens) for i in reversed(range(len(stages))))
                cells.append((m, str(b), at.format(keep=b, thresholds=_thresholds(b), pyramid=pyramid,
                                                   scale_bias=_scale_bias(b), **fill)))
    return cells


def _thresholds(keep: int) -> str:
    """MustDrop's filter thresholds exist for 192 / 128 / 64 kept; other budgets use the nearest
    preset's (gamma, alpha), the budget staying the static capacity."""
    from graphprune.passes.mustdrop import FILTER_PRESETS
    if keep in FILTER_PRESETS:
        return ""
    gamma, alpha = FILTER_PRESETS[min(FILTER_PRESETS, key=lambda k: abs(math.log(k / keep)))]
    return f", gamma={gamma}, alpha={alpha}"


def _scale_bias(keep: int) -> str:
    """SparseVLM's (scale, bias) exist for 192 / 128 / 64 kept; other budgets use the nearest preset's,
    the budget staying the static capacity."""
    from graphprune.passes.sparsevlm import PRESETS
    if keep in PRESETS:
        return ""
    scale, bias = PRESETS[min(PRESETS, key=lambda k: abs(math.log(k / keep)))]
    return f", scale={scale}, bias={bias}"


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
    from graphprune import prune
    from graphprune.errors import PassConfigError, PassNotApplicable
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
    from graphprune.tools.visualize import kept_patches
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
