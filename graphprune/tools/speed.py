"""`graphprune bench --speed`: a larger random-weight LLaVA built from a config (SPEED_CONFIG), each
method at 64 of 576 kept after layer 2. Per method: measured LLM-prefill speed-up (the prefill
graph alone), the FLOPs-ideal speed-up, their ratio, the selection overhead (the run time of the
nodes that choose: the selection nodes and the scoring nodes feeding only them, timed one by one
inside the real graphs, as a share of the pruned vision + LLM prefill time) and the decode time
per token through the shrunk caches; for each lowering of the linear layers asked for. Every
LLM-prefill time is also set against plain transformers' (graphprune.tools.speed_lengths), at this
prompt and at prompts of 1, 2 and 4 images.
"""
from __future__ import annotations

import statistics
import time

import torch

from graphprune.lower.runtime import LINEAR_KINDS
from graphprune.tools.instrument import choosing_nodes, timed, timed_nodes
from graphprune.tools.speed_lengths import IMAGES, format_lengths, run_lengths, transformers_prefill
from graphprune.tools.timing import Progress, interleaved
from graphprune.tools.vqa_model import BenchError, load_items, wrap_model

# speed mode: every method with 64 of 576 vision tokens kept from LLM layer 2 on (VTW keeps none,
# cls_topk selects before the LLM)
SPEED_METHODS = {
    "fastv": "fastv(layer=2, keep=64)", "dart": "dart(layer=2, keep=64)", "random": "random(layer=2, keep=64)",
    "mustdrop": "mustdrop(keep=64, layers=(2, 6))", "visiontrim": "visiontrim(keep=64, stage='llm', layer=2)",
    "vtw": "vtw(layer=2)", "cls_topk": "cls_topk(keep=64)",
}
SPEED_CONFIG = dict(image_size=336, patch=14, vision_hidden=768, vision_layers=6, vision_heads=12, vision_mlp=3072,
                    hidden=1024, layers=8, heads=16, kv_heads=16, mlp=2816, projector_act="gelu")


def run_speed(methods=None, *, repeats=5, decode_steps=16, batch=1, config=None, linear=LINEAR_KINDS,
              quiet=False, lengths=IMAGES, length_methods=("fastv",)) -> dict:
    """Measured vs FLOPs-ideal LLM-prefill speed-up, selection overhead and decode time per
    token for each method at 64 of 576 kept after layer 2, on a random-weight model, for each
    lowering of the linear layers in `linear` (prune(linear=...)), all interleaved in one run;
    LLM prefill against plain transformers' too, here and at prompts of `lengths` images (batch 1)
    for the unpruned graph and `length_methods` (lengths=(): no sweep)."""
    from graphprune import prune
    from graphprune.tools import vqa, zoo
    methods = list(methods or SPEED_METHODS)
    for m in methods:
        if m not in SPEED_METHODS:
            raise BenchError(f"unknown speed-mode method {m!r}; have {', '.join(SPEED_METHODS)}")
    linear = [linear] if isinstance(linear, str) else list(linear)
    for lin in linear:
        if lin not in LINEAR_KINDS:
            raise BenchError(f"unknown linear lowering {lin!r}; have aten, packed")
    cfg = dict(config or SPEED_CONFIG)
    prog = Progress(2 + len(methods) * len(linear) + (3 if lengths else 2) * repeats, "speed", not quiet)
    model = zoo.build_model(cfg, 0).eval()
    vm = wrap_model(model, "speed", "random weights", vocab=vqa.Vocab())
    prog.step("captured")
    kw = vm.inputs(load_items(None, batch))
    variants, choosing = {}, {}                   # (method, linear) -> pruned model, its choosing-node clock
    for lin in linear:
        variants[("unpruned", lin)] = prune(model, linear=lin)
        for m in methods:
            variants[(m, lin)] = real = prune(model, SPEED_METHODS[m], linear=lin)
            choosing[(m, lin)] = timed_nodes(real, choosing_nodes(real, kw))
            prog.step(f"choosing nodes {m} ({lin})")
    clocks = {k: timed(pm) for k, pm in variants.items()}
    samples = {k: {"vision": [], "prefill": [], "total": []} for k in variants}
    choose_s = {k: [] for k in choosing}
    hf, hf_s = transformers_prefill(variants[("unpruned", linear[0])], kw), []
    with torch.inference_mode():
        for pm_t, _ in [*clocks.values(), *choosing.values()]:
            pm_t(**kw)                                               # warm-up
        hf()
        prog.step("warm-up")
        for _ in range(repeats):
            for k, (pm_t, spent) in clocks.items():
                spent.update(vision=0.0, prefill=0.0)
                t = time.perf_counter()
                pm_t(**kw)
                samples[k]["total"].append(time.perf_counter() - t)
                samples[k]["vision"].append(spent["vision"])
                samples[k]["prefill"].append(spent["prefill"])
                if k in choosing:
                    pm_c, spent_c = choosing[k]
                    spent_c["nodes"] = 0.0
                    pm_c(**kw)
                    choose_s[k].append(spent_c["nodes"])
            t = time.perf_counter()
            hf()
            hf_s.append(time.perf_counter() - t)
            prog.step("prefill")
    # each _decoder runs its model's prefill on kw first: that leaves the reports the rows read
    decode = interleaved({k: _decoder(pm, kw, decode_steps) for k, pm in variants.items()}, repeats, prog)
    med = {k: {c: statistics.median(v) for c, v in s.items()} for k, s in samples.items()}
    theirs = statistics.median(hf_s)
    rows = []
    for lin in linear:
        base = variants[("unpruned", lin)]
        b = med[("unpruned", lin)]
        unpruned_dec = decode[("unpruned", lin)] / decode_steps * 1e3
        rows.append({"method": "unpruned", "linear": lin, "pipeline": "(unpruned)", "llm_prefill_ms": b["prefill"] * 1e3,
                     "vision_ms": b["vision"] * 1e3, "prefill_ms": b["total"] * 1e3, "flops": base.report.flops,
                     "decode_ms_per_token": unpruned_dec, "vs_transformers": theirs / b["prefill"]})
        for m in methods:
            real, r = variants[(m, lin)], med[(m, lin)]
            ideal = base.report.flops / real.report.flops
            measured = b["prefill"] / r["prefill"]
            overhead = statistics.median(choose_s[(m, lin)])
            dec = decode[(m, lin)] / decode_steps * 1e3
            rows.append({"method": m, "linear": lin, "pipeline": " | ".join(repr(p) for p in real.pipeline),
                         "llm_prefill_ms": r["prefill"] * 1e3, "vision_ms": r["vision"] * 1e3,
                         "prefill_ms": r["total"] * 1e3, "choosing_ms": overhead * 1e3,
                         "flops": real.report.flops, "ideal_speedup": ideal, "measured_speedup": measured,
                         "ratio": measured / ideal, "selection_overhead": overhead / (r["vision"] + r["prefill"]),
                         "vs_transformers": theirs / r["prefill"], "ratio_vs_transformers": theirs / r["prefill"] / ideal,
                         "decode_ms_per_token": dec, "decode_vs_unpruned": dec / unpruned_dec,
                         "targets": {"measured_ge_0.9_ideal": measured >= 0.9 * ideal,
                                     "overhead_le_2pct": overhead <= 0.02 * (r["vision"] + r["prefill"]),
                                     "decode_le_unpruned": dec <= unpruned_dec}})
    by_length = []
    if lengths:
        one = kw if batch == 1 else vm.inputs(load_items(None, 1))
        by_length = run_lengths({k: pm for k, pm in variants.items() if k[0] in ("unpruned", *length_methods)}, vm,
                                one, length_methods, lengths, repeats, prog)
    return {"config": cfg, "batch": batch, "repeats": repeats, "decode_steps": decode_steps, "linear": linear,
            "prompt_tokens": int(kw["input_ids"].shape[1]), "vision_tokens": vm.tokens_per_image, "rows": rows,
            "transformers_llm_prefill_ms": theirs * 1e3, "by_length": by_length,
            "method": ("LLM prefill = the prefill graph alone; ideal = its FLOPs ratio (graphprune's accountant); "
                       "selection overhead = run time of the choosing nodes (every selection node and the scoring "
                       "nodes feeding only it), timed node by node inside the real graphs, over the real vision + "
                       "prefill graph time; decode = greedy steps through the per-layer caches; measured / ratio "
                       "against the unpruned model of the same linear lowering (aten: the graphs' own "
                       "linears; packed: oneDNN-packed weights, prune(linear='packed')); vs HF / ratio against "
                       "plain transformers' LLM prefill (the model's own language model + head on the same "
                       "embeddings); all medians, variants of every lowering interleaved round-robin")}


def _decoder(pm, kw, steps):
    out = pm(**kw)

    def run():
        logits, cache = out.logits[:, -1], out.cache.copy()      # every run decodes from the prompt
        pos = out.positions.amax(-1, keepdim=True) + 1
        for s in range(steps):
            logits, cache = pm.decode_step(cache, logits.argmax(-1), pos + s)
    return run


def format_speed(res: dict) -> str:
    c = res["config"]
    lines = [f"speed mode: random-weight LLaVA, LLM {c['hidden']} x {c['layers']} layers, "
             f"vision {c['vision_hidden']} x "
             f"{c['vision_layers']}; batch {res['batch']}, {res['prompt_tokens']} prompt tokens "
             f"({res['vision_tokens']} vision); medians of {res['repeats']} interleaved rounds"
             + (f"; allocator: {res['machine']['allocator']}" if "machine" in res else ""), ""]
    head = (f"{'method':<11}{'LLM ms':>9}{'ideal':>8}{'measured':>10}{'ratio':>7}{'vs HF':>8}{'ratio':>7}"
            f"{'select %':>10}{'decode ms/tok':>15}{'vs unpr':>9}  targets")
    lines += [head, "-" * len(head)]
    for r in res["rows"]:
        if r["method"] == "unpruned":
            lines.append(f"linear: {r.get('linear', 'aten')}")
            lines.append(f"{'unpruned':<11}{r['llm_prefill_ms']:>9.1f}{'':>8}{'':>10}{'':>7}"
                         f"{r['vs_transformers']:>7.2f}x{'':>7}{'':>10}{r['decode_ms_per_token']:>15.2f}")
            continue
        ok = " ".join(("ok" if v else "MISS") for v in r["targets"].values())
        lines.append(f"{r['method']:<11}{r['llm_prefill_ms']:>9.1f}{r['ideal_speedup']:>7.2f}x"
                     f"{r['measured_speedup']:>9.2f}x"
                     f"{r['ratio']:>7.2f}{r['vs_transformers']:>7.2f}x{r['ratio_vs_transformers']:>7.2f}"
                     f"{100 * r['selection_overhead']:>9.1f}%{r['decode_ms_per_token']:>15.2f}"
                     f"{r['decode_vs_unpruned']:>8.2f}x  {ok}")
    lines.append(f"transformers (HF) LLM prefill: {res['transformers_llm_prefill_ms']:.1f} ms")
    lines.append("targets: measured >= 0.9 x ideal, selection <= 2% of pruned prefill, decode/token <= unpruned")
    if res.get("by_length"):
        lines += [""] + format_lengths(res["by_length"])
    lines.append(res["method"])
    return "\n".join(lines)
