"""`graphprune bench --speed` against plain transformers, and by prompt length.

Plain transformers' LLM prefill is the model's own language model and head (the eager module the
prefill graph was captured from) on the embeddings graphprune's unpruned prefill receives: at batch
1 without padding transformers drops the attention mask and runs SDPA with is_causal=True. The
length sweep puts 1, 2 and 4 test images in one prompt (587 / 1164 / 2318 tokens on the speed
model) and times, interleaved round-robin, transformers, graphprune's unpruned graph and the chosen
methods for each lowering of the linear layers: LLM prefill alone (the vision encoder excluded).
"""
from __future__ import annotations

import statistics
import time

import torch

from graphprune.lower.runtime import StageCall
from graphprune.tools.instrument import timed, with_proxies
from graphprune.tools.vqa_model import BenchError, load_items

IMAGES = (1, 2, 4)            # images per prompt in the length sweep


def prefill_inputs(pruned, kw: dict) -> dict:
    """What the prefill graph of `pruned` receives for the prompt kw, by placeholder name."""
    seen = {}

    def make(name, gm):
        def call(*args):
            if name == "prefill":
                seen.update(zip((n.name for n in gm.graph.find_nodes(op="placeholder")), args))
            return gm(*args)
        return StageCall(gm, call)
    with torch.inference_mode():
        with_proxies(pruned, make)(**kw)
    return seen


def transformers_prefill(unpruned, kw: dict):
    """A call of the model's own language model + head (transformers' code) on the embeddings,
    positions and mask the unpruned prefill graph receives for kw."""
    args = prefill_inputs(unpruned, kw)
    module = unpruned.base.stages["prefill"].module
    return lambda: module(args["inputs_embeds"], args["position_ids"], args["attention_mask"])


def images_prompt(vm, kw: dict, n: int) -> dict:
    """The one-image prompt kw with n test images: the image block repeated after itself, each copy
    behind the token that follows the image (as a multi-image prompt separates its images)."""
    if n == 1:
        return kw
    ids = kw["input_ids"]
    if ids.shape[0] != 1:
        raise BenchError(f"the length sweep runs batch 1, got {ids.shape[0]} prompts")
    image = (ids[0] == vm.model.config.image_token_id).nonzero()[:, 0]
    first, last = int(image[0]), int(image[-1])
    block = torch.cat([ids[0, last + 1:last + 2], ids[0, first:last + 1]])
    row = torch.cat([ids[0, :last + 1], block.repeat(n - 1), ids[0, last + 1:]])[None]
    return dict(input_ids=row, attention_mask=torch.ones_like(row), pixel_values=vm.inputs(load_items(None, n))["pixel_values"])


def run_lengths(variants: dict, vm, kw: dict, methods, images=IMAGES, repeats: int = 5, progress=None) -> list:
    """Rows per prompt length: transformers' LLM prefill, and per lowering graphprune's unpruned and
    each method's, with speed-ups against both and the FLOPs-ideal one. `variants`: (method, linear)
    -> pruned model, the unpruned ones under "unpruned"; medians of `repeats` interleaved rounds."""
    prompts = {n: images_prompt(vm, kw, n) for n in images}
    linear = list(dict.fromkeys(lin for _, lin in variants))
    clocks = {k: timed(pm) for k, pm in variants.items() if k[0] == "unpruned" or k[0] in methods}
    hf = {n: transformers_prefill(variants[("unpruned", linear[0])], prompts[n]) for n in images}
    times = {(k, n): [] for k in [*clocks, "transformers"] for n in images}
    flops = {}
    with torch.inference_mode():
        for n in images:                                            # warm-up; FLOPs of each prompt
            for k, (pm, _) in clocks.items():
                pm(**prompts[n])
                flops[(k, n)] = pm.report.flops
            hf[n]()
        for _ in range(repeats):
            for n in images:
                for k, (pm, spent) in clocks.items():
                    spent["prefill"] = 0.0
                    pm(**prompts[n])
                    times[(k, n)].append(spent["prefill"])
                t = time.perf_counter()
                hf[n]()
                times[("transformers", n)].append(time.perf_counter() - t)
            if progress:
                progress.step("prompt lengths")
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for n in images:
        tokens = int(prompts[n]["input_ids"].shape[1])
        theirs = med[("transformers", n)]
        rows.append({"tokens": tokens, "images": n, "method": "transformers", "linear": None,
                     "llm_prefill_ms": theirs * 1e3})
        for lin in linear:
            base = med[(("unpruned", lin), n)]
            rows.append({"tokens": tokens, "images": n, "method": "unpruned", "linear": lin,
                         "llm_prefill_ms": base * 1e3, "vs_transformers": theirs / base})
            for m in (m for m in methods if (m, lin) in clocks):
                ours = med[((m, lin), n)]
                ideal = flops[(("unpruned", lin), n)] / flops[((m, lin), n)]
                rows.append({"tokens": tokens, "images": n, "method": m, "linear": lin, "llm_prefill_ms": ours * 1e3,
                             "ideal_speedup": ideal, "measured_speedup": base / ours, "ratio": base / ours / ideal,
                             "vs_transformers": theirs / ours, "ratio_vs_transformers": theirs / ours / ideal})
    return rows


def format_lengths(rows: list) -> list[str]:
    head = (f"{'tokens':>6}  {'linear':<7}{'method':<13}{'LLM ms':>9}{'ideal':>8}{'vs unpr':>9}{'ratio':>7}"
            f"{'vs HF':>8}{'ratio':>7}")
    lines = ["LLM prefill by prompt length against plain transformers (HF: the model's own language model + head "
             "on the same embeddings; 'vs' = speed-up, < 1 is slower; ratio = speed-up / ideal)", head, "-" * len(head)]
    for r in rows:
        cells = f"{r['tokens']:>6}  {r['linear'] or '':<7}{r['method']:<13}{r['llm_prefill_ms']:>9.1f}"
        if "ideal_speedup" in r:
            cells += (f"{r['ideal_speedup']:>7.2f}x{r['measured_speedup']:>8.2f}x{r['ratio']:>7.2f}"
                      f"{r['vs_transformers']:>7.2f}x{r['ratio_vs_transformers']:>7.2f}")
        elif "vs_transformers" in r:
            cells += f"{'':>8}{'':>9}{'':>7}{r['vs_transformers']:>7.2f}x"
        lines.append(cells)
    return lines
