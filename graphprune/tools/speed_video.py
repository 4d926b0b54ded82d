"""`graphprune bench --speed --video`: the speed mode on a video-length prompt.

A random-weight Qwen2.5-VL built from a config (VIDEO_CONFIG: a few LLM layers, a windowed ViT) and
one video of `frames` frames on a `grid` patch grid: after the 2x2 merge, frames / 2 temporal patches
of grid / 4 tokens each, several thousand vision tokens. Each method keeps about a fifth of them:
evs (vLLM's Efficient Video Sampling, before LLM layer 0) prunes a share `rate` of the whole video,
fastv / dart / random keep `keep` tokens of every frame (video_unit="frame") from LLM layer 2.

Per method and lowering of the linear layers: the LLM prefill (the prefill graph alone) against
graphprune's unpruned graph and against plain transformers' (the model's own language model + head
on the same embeddings), each beside the FLOPs-ideal speed-up (graphprune's accountant) and as a
ratio to it; end to end (the whole call: Qwen's vision encoder, which runs eagerly, the prompt
preparation and the prefill) against graphprune's unpruned model and against the model's own
forward. All variants interleaved round-robin; medians (graphprune.tools.timing).
"""
from __future__ import annotations

import statistics

from graphprune.lower.runtime import LINEAR_KINDS
from graphprune.tools.instrument import timed
from graphprune.tools.speed_lengths import transformers_prefill
from graphprune.tools.timing import Progress, interleaved
from graphprune.tools.vqa_model import BenchError

# {keep}: tokens kept per frame (temporal patch); evs's rate keeps the same share of the whole video
VIDEO_METHODS = {"evs": "evs(rate={rate})", "fastv": "fastv(layer=2, keep={keep})",
                 "dart": "dart(layer=2, keep={keep})", "random": "random(layer=2, keep={keep})"}
# LLM 512 x 4 layers (4 heads of 128, 2 KV heads, MLP 5.375 x hidden as Qwen2.5-VL-7B's); ViT 128 x 4
# blocks (8 x 8-patch windows, full attention in the last); 32 frames of 28 x 28 patches: 16 temporal
# patches x 196 tokens = 3136 video tokens; a fifth of them kept
VIDEO_CONFIG = dict(frames=32, grid=(28, 28), hidden=512, layers=4, mlp=2752, vision_hidden=128, vision_layers=4,
                    vision_heads=4, vision_mlp=512, window=112, keep_share=0.2)


def build_video_model(cfg: dict):
    from graphprune.tools import family_zoo
    vision = dict(depth=cfg["vision_layers"], hidden_size=cfg["vision_hidden"], num_heads=cfg["vision_heads"],
                  intermediate_size=cfg["vision_mlp"], window_size=cfg["window"],
                  fullatt_block_indexes=[cfg["vision_layers"] - 1])
    text = dict(intermediate_size=cfg["mlp"])
    return family_zoo.build("qwen2_5_vl", layers=cfg["layers"], hidden=cfg["hidden"], text=text, vision=vision)


def video_specs(methods, cfg: dict) -> dict:
    """{method: pipeline} at the config's budget: `keep_share` of each frame's tokens (at least 1),
    evs's rate 1 - keep_share of the video."""
    h, w = cfg["grid"]
    per_frame = h * w // 4
    keep = max(1, round(cfg["keep_share"] * per_frame))
    rate = round(1 - cfg["keep_share"], 6)
    for m in methods:
        if m not in VIDEO_METHODS:
            raise BenchError(f"unknown video speed-mode method {m!r}; have {', '.join(VIDEO_METHODS)}")
    return {m: VIDEO_METHODS[m].format(keep=keep, rate=rate) for m in methods}


def run_video_speed(methods=None, *, repeats=5, config=None, linear=LINEAR_KINDS, quiet=False, captured=None) -> dict:
    """Rows per (method, lowering): measured vs FLOPs-ideal LLM-prefill speed-up against graphprune's
    unpruned graph and against transformers, end-to-end speed-up (vision encoder included) against both;
    medians of `repeats` interleaved rounds, batch 1, one video. `captured`: (model, its Program) built
    from `config` already (tests share one capture); default: built and captured here."""
    from graphprune import prune
    from graphprune.rewrite.pipeline import Program
    from graphprune.tools import family_zoo
    cfg = {**VIDEO_CONFIG, **(config or {})}
    linear = [linear] if isinstance(linear, str) else list(linear)
    for lin in linear:
        if lin not in LINEAR_KINDS:
            raise BenchError(f"unknown linear lowering {lin!r}; have aten, packed")
    if cfg["frames"] % 2 or any(g % 2 for g in cfg["grid"]):
        raise BenchError(f"frames {cfg['frames']} and grid {cfg['grid']} must be even (2-frame temporal patches, "
                         "2x2 merge)")
    specs = video_specs(list(methods or VIDEO_METHODS), cfg)
    prog = Progress(2 + len(specs) * len(linear) + repeats, "video speed", not quiet)
    model, program = captured or (None, None)
    if model is None:
        model = build_video_model(cfg)
        program = Program.capture(model)              # one capture, every variant rewrites it
    kw = family_zoo.example(model, items=("video",), frames=cfg["frames"], grid=tuple(cfg["grid"])).as_kwargs()
    prog.step("built")
    variants = {}
    for lin in linear:
        variants[("unpruned", lin)] = prune(model, linear=lin, program=program)
        for m, spec in specs.items():
            variants[(m, lin)] = prune(model, spec, linear=lin, program=program)
            prog.step(f"captured {m} ({lin})")
    clocks = {k: timed(pm) for k, pm in variants.items()}
    prefill_s = {k: [] for k in clocks}

    def call(k):
        pm, spent = clocks[k]

        def run():
            spent["prefill"] = 0.0
            pm(**kw)
            prefill_s[k].append(spent["prefill"])
        return run
    fns = {k: call(k) for k in clocks}
    fns["transformers prefill"] = transformers_prefill(variants[("unpruned", linear[0])], kw)
    fns["transformers forward"] = lambda: model(**kw)
    prog.step("warm-up")
    total = interleaved(fns, repeats, prog)
    llm = {k: statistics.median(v[1:]) for k, v in prefill_s.items()}      # v[0]: the warm-up
    hf_llm, hf_e2e = total["transformers prefill"], total["transformers forward"]
    rows = []
    for lin in linear:
        base = clocks[("unpruned", lin)][0]            # the copies that ran hold the reports
        b_llm, b_e2e = llm[("unpruned", lin)], total[("unpruned", lin)]
        rows.append({"method": "unpruned", "linear": lin, "pipeline": "(unpruned)", "flops": base.report.flops,
                     "vision_tokens_in": base.report.vision_tokens_in,
                     "tokens_per_layer": base.report.tokens_per_layer, "llm_prefill_ms": b_llm * 1e3,
                     "e2e_ms": b_e2e * 1e3, "vs_transformers": hf_llm / b_llm, "e2e_vs_transformers": hf_e2e / b_e2e})
        for m in specs:
            real = clocks[(m, lin)][0]
            r_llm, r_e2e = llm[(m, lin)], total[(m, lin)]
            ideal = base.report.flops / real.report.flops
            rows.append({"method": m, "linear": lin, "pipeline": " | ".join(repr(p) for p in real.pipeline),
                         "flops": real.report.flops, "vision_tokens_in": real.report.vision_tokens_in,
                         "tokens_per_layer": real.report.tokens_per_layer,
                         "llm_prefill_ms": r_llm * 1e3, "e2e_ms": r_e2e * 1e3, "ideal_speedup": ideal,
                         "measured_speedup": b_llm / r_llm, "ratio": b_llm / r_llm / ideal,
                         "vs_transformers": hf_llm / r_llm, "ratio_vs_transformers": hf_llm / r_llm / ideal,
                         "e2e_speedup": b_e2e / r_e2e, "e2e_vs_transformers": hf_e2e / r_e2e,
                         "targets": {"measured_ge_0.9_ideal": b_llm / r_llm >= 0.9 * ideal}})
    grid_thw = kw["video_grid_thw"][0].tolist()
    return {"config": cfg, "repeats": repeats, "linear": linear, "prompt_tokens": int(kw["input_ids"].shape[1]),
            "vision_tokens": grid_thw[0] * grid_thw[1] * grid_thw[2] // 4, "video_grid_thw": grid_thw, "rows": rows,
            "transformers_llm_prefill_ms": hf_llm * 1e3, "transformers_forward_ms": hf_e2e * 1e3,
            "method": ("LLM prefill = the prefill graph alone; ideal = its FLOPs ratio (graphprune's accountant); "
                       "measured / ratio against graphprune's unpruned graph of the same linear lowering; vs HF / "
                       "ratio against plain transformers' LLM prefill (the model's own language model + head on "
                       "the same embeddings); e2e = the whole call (Qwen's eager vision encoder, prompt preparation, "
                       "prefill), against graphprune's unpruned model and against the model's own forward (e2e vs "
                       "HF); medians of interleaved rounds (graphprune.tools.timing.interleaved)")}


def format_video_speed(res: dict) -> str:
    c = res["config"]
    t, h, w = res["video_grid_thw"]
    lines = [f"video speed mode: random-weight Qwen2.5-VL, LLM {c['hidden']} x {c['layers']} layers, ViT "
             f"{c['vision_hidden']} x {c['vision_layers']}; one video of {c['frames']} frames ({t} temporal patches x "
             f"{h * w // 4} tokens = {res['vision_tokens']} vision tokens), {res['prompt_tokens']} prompt tokens, "
             f"batch 1; medians of {res['repeats']} interleaved rounds"
             + (f"; allocator: {res['machine']['allocator']}" if "machine" in res else ""), ""]
    head = (f"{'method':<9}{'last':>6}{'LLM ms':>9}{'ideal':>8}{'measured':>10}{'ratio':>7}{'vs HF':>8}{'ratio':>7}"
            f"{'e2e ms':>9}{'e2e':>8}{'e2e HF':>8}  target")
    lines += [head, "-" * len(head)]
    for r in res["rows"]:
        cells = f"{r['method']:<9}{r['tokens_per_layer'][-1]:>6}{r['llm_prefill_ms']:>9.1f}"
        if r["method"] == "unpruned":
            lines.append(f"linear: {r['linear']}")
            lines.append(cells + f"{'':>8}{'':>10}{'':>7}{r['vs_transformers']:>7.2f}x{'':>7}{r['e2e_ms']:>9.1f}"
                         f"{'':>8}{r['e2e_vs_transformers']:>7.2f}x")
            continue
        ok = "ok" if r["targets"]["measured_ge_0.9_ideal"] else "MISS"
        lines.append(cells + f"{r['ideal_speedup']:>7.2f}x{r['measured_speedup']:>9.2f}x{r['ratio']:>7.2f}"
                     f"{r['vs_transformers']:>7.2f}x{r['ratio_vs_transformers']:>7.2f}{r['e2e_ms']:>9.1f}"
                     f"{r['e2e_speedup']:>7.2f}x{r['e2e_vs_transformers']:>7.2f}x  {ok}")
    lines.append(f"transformers (HF): LLM prefill {res['transformers_llm_prefill_ms']:.1f} ms, whole forward "
                 f"{res['transformers_forward_ms']:.1f} ms")
    lines.append("last: tokens in the last LLM layer (evs prunes before layer 0, the others at layer 2); target: "
                 "measured >= 0.9 x ideal")
    lines.append(res["method"])
    return "\n".join(lines)
