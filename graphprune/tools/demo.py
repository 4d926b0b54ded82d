"""`graphprune demo`: the shipped VQA model answers a few test questions unpruned and pruned.

Prints the answers side by side, then per pipeline the vision tokens kept, KV-cache bytes and
prefill time (median of interleaved runs on the whole batch), and writes one PNG per question:
the image as the unpruned model sees it, then as each pipeline leaves it (dropped patches
dimmed, merged tokens outlined; see graphprune.tools.visualize).
"""
from __future__ import annotations

import os

import torch

DEMO_PIPELINES = ("fastv(layer=2, keep=64)", "visiontrim(keep=64)", "mustdrop(keep=64, layers={layers})")


def default_pipelines(num_layers: int) -> list[str]:
    layers = tuple(l for l in (2, 6, 10, 14) if l < num_layers)
    return [p.format(layers=layers) for p in DEMO_PIPELINES]


def run_demo(vm, items, pipelines, out_dir: str | None, *, repeats: int = 3, linear: str = "aten") -> dict:
    from graphprune import prune
    from graphprune.tools.images import write_png
    from graphprune.tools.timing import interleaved
    from graphprune.tools.visualize import draw, kept_patches, merged_patches
    kw = vm.inputs(items)
    ids, img_id = kw["input_ids"], vm.model.config.image_token_id
    variants = [("unpruned", prune(vm.model, linear=linear))] + [(p, prune(vm.model, p, linear=linear))
                                                                 for p in pipelines]
    rows = []
    for label, pm in variants:
        out, merged = merged_patches(pm, kw)
        kept = [s[0] for s in kept_patches(out, ids, img_id)]
        answers = [vm.decode([int(t)]) for t in out.logits[:, -1].argmax(-1)] if vm.vocab is not None else \
            [vm.decode(r) for r in pm.generate(**kw, max_new_tokens=4)[:, ids.shape[1]:]]
        rows.append({"pipeline": label, "answers": answers, "kept": kept, "merged": [m[0] for m in merged],
                     "kv_bytes": out.report.kv_bytes, "tokens_per_layer": out.report.tokens_per_layer,
                     "correct": sum(a.strip().lower() == it.answer.lower() for a, it in zip(answers, items))})
    med = interleaved({label: (lambda pm=pm: pm(**kw)) for label, pm in variants}, repeats)
    for r in rows:
        r["prefill_ms"] = med[r["pipeline"]] * 1e3
    images = []
    if out_dir:
        from graphprune.tools.images import resize
        os.makedirs(out_dir, exist_ok=True)
        gap = torch.full((3, vm.image_size, 6), 255, dtype=torch.uint8)
        for q, it in enumerate(items):
            shown = resize(it.image, vm.image_size)
            panels = []
            for r in rows:
                panels += [draw(shown, vm.grid, set(r["kept"][q]), r["merged"][q]), gap]
            path = os.path.join(out_dir, f"question_{q}.png")
            write_png(path, torch.cat(panels[:-1], 2))
            images.append(path)
    return {"items": [{"question": it.question, "answer": it.answer, "type": it.qtype, "uid": it.uid} for it in items],
            "rows": rows, "images": images, "repeats": repeats}


def format_demo(res: dict, model_line: str) -> str:
    rows, items = res["rows"], res["items"]
    lines = [model_line, ""]
    labels = ["unpruned"] + [f"[{i}]" for i in range(1, len(rows))]
    for i, r in enumerate(rows[1:], 1):
        lines.append(f"[{i}] {r['pipeline']}")
    lines.append("")
    width = max(len(it["question"]) for it in items)
    lines.append(f"{'question':<{width}}  {'gold':<8}" + "".join(f"{l:<10}" for l in labels))
    for q, it in enumerate(items):
        lines.append(f"{it['question']:<{width}}  {it['answer']:<8}" + "".join(f"{r['answers'][q]:<10}" for r in rows))
    lines.append("")
    lines.append(f"{'':<10}{'vision kept':>12}{'KV bytes':>14}{'prefill ms':>12}{'speed-up':>10}{'correct':>9}")
    base = rows[0]["prefill_ms"]
    for l, r in zip(labels, rows):
        kept = sum(len(k) for k in r["kept"]) / len(r["kept"])
        lines.append(f"{l:<10}{kept:>12.0f}{r['kv_bytes']:>14,}{r['prefill_ms']:>12.1f}{base / r['prefill_ms']:>9.2f}x"
                     f"{r['correct']:>5}/{len(items)}")
    lines.append(f"(vision kept: tokens per image in the last layer's KV cache; KV bytes and prefill: the batch of "
                 f"{len(items)}, median of {res['repeats']} interleaved runs)")
    if res["images"]:
        lines.append(f"images (unpruned, then {', '.join(labels[1:])}; dropped patches dimmed, merged tokens "
                     f"outlined): {os.path.dirname(res['images'][0]) or '.'}/question_*.png")
    return "\n".join(lines)
