"""The `graphprune` command.

    graphprune inspect tiny-llava                         anatomy of a model and its sample prompt
    graphprune inspect --config llava-1.5-7b --method "vtw(layer=16)" --text-tokens 64
                                                          + per-layer cost of a pipeline (meta device)
    graphprune run                                        prune the built-in tiny LLaVA, generate,
                                                          compare with unpruned, print reports
    graphprune export-onnx --pipeline "fastv(layer=2, keep=9)" --out DIR
                                                          ONNX export (vision, prefill, decode)

MODEL is a built-in tiny model (tiny-llava, tiny-qwen2vl), a local directory, or a hub id
already in the local Hugging Face cache (nothing is downloaded). --config NAME|PATH builds the
full-size model of a shipped config (llava-1.5-7b, qwen2-vl-7b, qwen2.5-vl-7b) or of a config.json on the
meta device: no weights, no memory, the graphs and costs are exact.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from graphprune.lower.runtime import LINEAR_KINDS
from graphprune.tools.loading import TINY, load_model, sample_prompt

RUN_DEFAULTS = ("fastv(layer=2, keep=9)", "vtw(layer=2)", "cls_topk(keep=9)")


class _Failure(ValueError):
    """An error to print as `graphprune: error: ...` (exit status 2). A ValueError, so that it is
    caught even when raised by a second copy of this module (`python -m graphprune.cli` runs it
    as __main__ while bench imports graphprune.cli)."""


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from graphprune.errors import GraphpruneError
    try:
        return args.func(args)
    except (GraphpruneError, ValueError, _Failure) as e:
        _fail(str(e))
    except OSError as e:        # a path given on the command line that cannot be read or written
        where = f"{e.filename}: " if e.filename else ""
        _fail(f"{where}{e.strerror or e}")
    except MemoryError:
        _fail("out of memory (use a smaller model, batch, image or --scale)")


def _fail(message: str):
    print(f"graphprune: error: {message}", file=sys.stderr)
    raise SystemExit(2) from None


def _model_loading(parser) -> None:
    parser.add_argument("--trust-remote-code", action="store_true", help="allow running Python code shipped in "
                        "the model's folder (refused by default)")
    parser.add_argument("--allow-pickle-weights", action="store_true", help="allow loading pickle weights "
                        "(pytorch_model.bin; unpickling can run code). Default: safetensors only")


def _loading(args) -> dict:
    return {"trust_remote_code": args.trust_remote_code, "allow_pickle_weights": args.allow_pickle_weights}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphprune", description="Training-free vision-token pruning as graph "
                                "passes over captured VLM graphs.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    i = sub.add_parser("inspect", help="print a model's anatomy, its sample prompt and (with --method) the cost "
                       "of a pruning pipeline", description="Print the anatomy graphprune reads off a model's "
                       "captured graphs, the token spans of a sample prompt, and with --method the per-layer "
                       "tokens, FLOPs and KV-cache size of the pruned prefill.")
    i.add_argument("model", nargs="?", help="tiny-llava | tiny-qwen2vl | local path | hub id in the local HF "
                   "cache (default: tiny-llava, or the --config model)")
    i.add_argument("--config", help="build the model on the meta device from a shipped config "
                   "(llava-1.5-7b, qwen2-vl-7b, qwen2.5-vl-7b) or a config.json path")
    i.add_argument("--method", help='pruning pipeline, e.g. "fastv(layer=2, keep=144)" or '
                   '"cls_topk(keep=144) | fastv(layer=2, keep=0.5)" or a .toml file')
    i.add_argument("--text-tokens", type=int, default=64, help="text tokens of the synthetic prompt "
                   "used for --config and pretrained models (half before the image, half after; default 64); "
                   "the tiny built-ins use their zoo example prompt")
    i.add_argument("--images", type=int, default=1, help="images in the synthetic prompt (default 1)")
    i.add_argument("--image-tokens", type=int, help="vision tokens per image of the synthetic prompt "
                   "(Qwen2-VL; default 144 = a 336x336 image; LLaVA's is fixed by its patch grid)")
    i.add_argument("--dtype", default="float16", help="dtype of meta-device models and their KV cache "
                   "(default float16)")
    i.add_argument("--no-decode", action="store_true", help="skip capturing the decode stage (faster)")
    i.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _model_loading(i)
    i.set_defaults(func=cmd_inspect)

    r = sub.add_parser("run", help="prune a tiny built-in model, generate, compare with the unpruned model",
                       description="Build the model, run it unpruned and pruned on a sample prompt, and print "
                       "the generated tokens side by side, the per-layer reports and prefill timings.")
    r.add_argument("--model", default="tiny-llava", help="tiny-llava (default) | tiny-qwen2vl | local path | "
                   "hub id in the local HF cache (a random-token sample prompt is used)")
    r.add_argument("--method", action="append", help="pruning pipeline (repeatable; default: "
                   + ", ".join(RUN_DEFAULTS) + ")")
    r.add_argument("--max-new-tokens", type=int, default=8, help="tokens to generate (default 8)")
    r.add_argument("--repeats", type=int, default=5, help="prefill runs timed per model (median; default 5)")
    r.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for the tiny built-in models, whose "
                   "ops are too small to gain from threads and whose timings suffer from oversubscribed cores)")
    r.add_argument("--linear", choices=LINEAR_KINDS, default="aten", help=LINEAR_HELP + " (default aten)")
    r.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _model_loading(r)
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("export-onnx", help="prune a model and export its vision, prefill and decode graphs to ONNX",
                       description="Prune a model with a pipeline and write vision.onnx, prefill.onnx, decode.onnx, "
                       "embed_tokens.npy and manifest.json into --out (run them with "
                       "graphprune.targets.ort.OrtPrunedModel). Needs the onnx extra: pip install 'graphprune[onnx]'.")
    e.add_argument("--model", default="tiny-llava", help="tiny-llava (default) | local path | hub id in the local HF "
                   "cache (LLaVA-style models)")
    e.add_argument("--pipeline", required=True, help='pruning pipeline, e.g. "fastv(layer=2, keep=9)" or a .toml file')
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    e.add_argument("--opset", type=int, help="ONNX opset (default: torch.onnx's)")
    _model_loading(e)
    e.set_defaults(func=cmd_export_onnx)
    _vqa_parsers(sub)
    return p


LINEAR_HELP = ("how the linear layers run: aten (the graphs' own) or packed (float32 CPU models: "
               "weights packed once for oneDNN, faster, twice the linear weights' memory; prune(linear='packed'))")
VQA_MODEL_HELP = ("the shipped VQA model (default) | random | random:CONFIG (graphprune.tools.zoo.CONFIGS, random weights) | "
                  "a directory written by examples/train_vqa_model.py | a LLaVA-style local path or hub id in the local "
                  "HF cache (offline, with its processor)")


def _vqa_parsers(sub) -> None:
    b = sub.add_parser("bench", help="accuracy / speed / cost of methods x budgets on a VQA model",
                       description="Grid mode: every method at every budget (192/128/64 of 576 and its own defaults) on "
                       "the shipped VQA model and the synthetic test split: accuracy (and % of unpruned), prefill and "
                       "end-to-end time (medians, variants interleaved), speed-up, FLOPs, KV bytes. --speed: a larger "
                       "random-weight model, each method at 64 of 576 kept after layer 2: measured vs FLOPs-ideal "
                       "LLM-prefill speed-up (against graphprune's unpruned graph and plain transformers), selection "
                       "overhead, decode time per token; then unpruned and FastV against transformers at 1, 2 and 4 "
                       "images per prompt.")
    b.add_argument("--model", help=VQA_MODEL_HELP)
    b.add_argument("--data", help="JSONL file, or folder of them: {\"image\": path relative to the file, \"question\", "
                   "\"answer\", optional \"type\"} per line (default: the synthetic VQA split)")
    b.add_argument("--methods", help="comma-separated (default: every method of the grid, "
                   "graphprune.tools.bench.METHODS)")
    b.add_argument("--budgets", default="192,128,64,default", help="vision tokens kept per image, comma-separated; "
                   "'default' = each method's own defaults (default: 192,128,64,default)")
    b.add_argument("--pipeline", action="append", default=[], help="an extra cell: any pipeline string (repeatable)")
    b.add_argument("--n", type=int, default=200, help="questions (default 200)")
    b.add_argument("--split", default="test", help="synthetic split (default test)")
    b.add_argument("--seed", type=int, default=0, help="synthetic data seed (default 0)")
    b.add_argument("--batch", type=int, default=16, help="questions per call for accuracy (default 16)")
    b.add_argument("--time-batch", type=int, default=8, help="questions in the timed batch (default 8)")
    b.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (median; default 5)")
    b.add_argument("--decode-tokens", type=int, default=2, help="greedy tokens of the end-to-end time (default 2: "
                   "answer + eos)")
    b.add_argument("--speed", action="store_true", help="speed mode on a larger random-weight model")
    b.add_argument("--video", action="store_true", help="with --speed: the video-length case instead (a random-weight "
                   "Qwen2.5-VL, one video of 3136 vision tokens; evs, fastv, dart, random keeping a fifth; LLM-prefill "
                   "and end-to-end speed-ups against graphprune's unpruned model and plain transformers)")
    b.add_argument("--compiled", action="store_true", help="with --speed: the torch.compile backend (Inductor) against "
                   "graphprune's eager lowering, per --linear, and graphprune's decode step against transformers' generate")
    b.add_argument("--decode-steps", type=int, default=16, help="speed mode: decode steps timed (default 16)")
    b.add_argument("--linear", help=LINEAR_HELP + "; --speed takes a comma list and "
                   "times them side by side (default: aten; --speed: aten,packed)")
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    b.add_argument("--json", metavar="PATH", help="write everything (config, machine, cells) as JSON ('-': stdout)")
    b.add_argument("--plot", metavar="PATH.png", help="accuracy vs prefill time per method (needs matplotlib: "
                   "pip install 'graphprune[plot]')")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    _model_loading(b)
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="the shipped VQA model answering test questions unpruned and pruned",
                       description="Answer a few test questions unpruned and with a few pipelines; print answers, "
                       "kept tokens, KV bytes and timings side by side and write images of the kept patches.")
    d.add_argument("--model", help=VQA_MODEL_HELP)
    d.add_argument("--pipeline", action="append", help="pipeline to show (repeatable; default: fastv 64, "
                   "visiontrim 64, mustdrop 64)")
    d.add_argument("--n", type=int, default=6, help="test questions (default 6)")
    d.add_argument("--seed", type=int, default=0, help="synthetic data seed (default 0)")
    d.add_argument("--out", default="graphprune_demo", help="folder for the images (default graphprune_demo)")
    d.add_argument("--no-images", action="store_true", help="do not write images")
    d.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (default 3)")
    d.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    d.add_argument("--linear", choices=LINEAR_KINDS, default="aten", help=LINEAR_HELP + " (default aten)")
    d.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _model_loading(d)
    d.set_defaults(func=cmd_demo)

    v = sub.add_parser("visualize", help="draw an image with the patches a pipeline dropped dimmed",
                       description="Run a question on an image through a pruned model and draw the image with the "
                       "dropped patches dimmed and merged tokens outlined (models with a patch grid).")
    v.add_argument("--image", required=True, help="a PNG (other formats with Pillow), or test:N / val:N for sample N "
                   "of a synthetic split")
    v.add_argument("--question", help="the question (default: the synthetic sample's)")
    v.add_argument("--pipeline", required=True, help='pruning pipeline, e.g. "fastv(layer=2, keep=64)"')
    v.add_argument("--out", required=True, help="output PNG")
    v.add_argument("--model", help=VQA_MODEL_HELP)
    v.add_argument("--scale", type=int, default=1, help="enlarge the drawing by this integer factor (default 1)")
    v.add_argument("--json", action="store_true", help="print what was drawn as JSON")
    _model_loading(v)
    v.set_defaults(func=cmd_visualize)


# -- models --------------------------------------------------------------------------------------

# -- inspect --------------------------------------------------------------------------------------

def cmd_inspect(args) -> int:
    from graphprune.tools import accountant
    if args.model and args.config:
        raise _Failure("give either MODEL or --config, not both")
    for opt in ("text_tokens", "images"):
        if getattr(args, opt) < 1:
            raise _Failure(f"--{opt.replace('_', '-')} must be >= 1")
    if args.method:
        from graphprune.rewrite.pipeline import as_passes
        as_passes(args.method)      # bad options fail before any model is built
    stages = ("vision", "prefill") if args.no_decode else ("vision", "prefill", "decode")
    t0 = time.perf_counter()
    if args.config:
        model, program = accountant.meta_program(args.config, args.dtype, stages)
        name = accountant.config_path(args.config)
        name = args.config if not name.startswith(accountant.CONFIG_DIR) else args.config.removesuffix(".json")
        source, kv_dtype = f"config on the meta device ({accountant.config_path(args.config)})", args.dtype
    else:
        name = args.model or "tiny-llava"
        model, source = load_model(name, **_loading(args))
        program = accountant.capture_stages(model, stages)
        kv_dtype = None
    capture_s = time.perf_counter() - t0
    example, example_src = sample_prompt(model, name)
    if example is not None:
        units = _vision_units(model, example) or [{"units": []}] * example.input_ids.shape[0]
        layouts = accountant.layout_of(units, example.input_ids.shape[1])
        prompt = {"source": example_src, "batch": len(layouts), "samples": [l.to_dict() for l in layouts],
                  "vision_units": units}
        layout = layouts[0]
    else:
        vision = program.anatomy.get("vision")
        if vision is not None and vision.grid:
            if args.image_tokens is not None and args.image_tokens != vision.grid[0] * vision.grid[1]:
                raise _Failure(f"--image-tokens: {type(model).__name__} makes {vision.grid[0] * vision.grid[1]} "
                               f"vision tokens per image ({vision.grid[0]}x{vision.grid[1]} patch grid)")
            per_image = vision.grid[0] * vision.grid[1]
        else:
            per_image = args.image_tokens or accountant.default_image_tokens(model)
        layout = accountant.synthetic_layout(args.text_tokens, args.images, per_image)
        prompt = {"source": f"synthetic: {args.text_tokens} text tokens (half before the image(s)), "
                            f"{args.images} image(s) x {per_image} vision tokens",
                  "batch": 1, "samples": [layout.to_dict()]}
    out = {"model": name, "model_class": type(model).__name__, "source": source,
           "capture_seconds": round(capture_s, 2),
           "stages": _stages(model, program, layout, example), "prompt": prompt}
    if args.method:
        out["cost"] = accountant.account_model(model, args.method, program=program, layout=layout, dtype=kv_dtype)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(_format_inspect(out))
    return 0


def _vision_units(model, example) -> list[dict]:
    """Per sample, the images / video frames the family finds in the prompt (from the processor's
    inputs): each unit's token span and count, and the separator tokens it protects."""
    from graphprune.families import family_of
    inputs = {k: v for k, v in example.as_kwargs().items() if k not in ("input_ids", "attention_mask")}
    layout = family_of(model).vision_layout(example.input_ids, **inputs)
    if layout is None:
        return []
    out = []
    for b in range(example.input_ids.shape[0]):
        units = [{"unit": name, "span": [int(pos.min()), int(pos.max()) + 1], "tokens": int(pos.numel())}
                 for name, pos in zip(layout.units, layout.pos[b])]
        seps = layout.separators[b].nonzero()[:, 0]
        out.append({"units": units, "separators": [[int(i), int(example.input_ids[b, i])] for i in seps]})
    return out


def _stages(model, program, layout, example) -> dict:
    out = {}
    for name in ("vision", "prefill", "decode"):
        st = program.stages.get(name)
        if st is None:
            out[name] = {"captured": False, "reason": "not captured (--no-decode)"}
            continue
        if st.gm is None:
            out[name] = _eager_vision(model, st, layout, example)
            continue
        anat = program.anatomy[name]
        d = {"captured": True, **{k: v for k, v in anat.summary().items() if k != "stage"}}
        if name == "vision":
            d["tokens_per_image"] = d.pop("tokens")
            total = getattr(model.config.vision_config, "num_hidden_layers", None)
            if total is not None and total != anat.num_layers:
                d["encoder_layers"] = total
                d["layers_note"] = (f"{anat.num_layers} of {total} encoder layers feed the features "
                                    f"(vision_feature_layer={model.config.vision_feature_layer})")
        else:
            k = anat.layers[0].kv_write[0].meta.get("val") if anat.layers[0].kv_write else None
            if k is not None:
                d["kv_heads"], d["head_dim"] = int(k.shape[1]), int(k.shape[3])
            d["attention_heads"] = model.config.text_config.num_attention_heads
        out[name] = d
    return out


def _eager_vision(model, st, layout, example) -> dict:
    vc = model.config.vision_config
    cls = any(n.endswith("class_embedding") for n, _ in model.named_parameters())
    merge = getattr(vc, "spatial_merge_size", 1) or 1
    if example is not None and example.image_grid_thw is not None:
        t, h, w = (int(x) for x in example.image_grid_thw[0])
    else:
        side = int(round(layout.tokens_per_image ** 0.5)) * merge
        h = w = side
    d = {"captured": False, "reason": st.eager,
         "layers": getattr(vc, "depth", None) or getattr(vc, "num_hidden_layers", None),
         "attention": f"{getattr(vc, '_attn_implementation', None) or 'eager'} (not captured)", "cls": cls,
         "grid": [h, w], "spatial_merge": merge, "tokens_per_image": (h // merge) * (w // merge)}
    return d


def _format_inspect(out: dict) -> str:
    from graphprune.tools.accountant import format_table
    lines = [f"model: {out['model']}  ({out['model_class']}; {out['source']})",
             f"captured in {out['capture_seconds']:.1f} s", "", "stages:"]
    for name, d in out["stages"].items():
        if name == "vision":
            state = "captured" if d["captured"] else "eager"
            cols = [f"{name:<8}", f"{state:<9}", f"layers {d.get('layers', '?'):>3}",
                    f"attention {d.get('attention', '?')}"]
            if "cls" in d:
                cols += [f"CLS {'yes' if d['cls'] else 'no'}", f"patch grid {d['grid'][0]}x{d['grid'][1]}"
                         + (f" (merged {d['spatial_merge']}x{d['spatial_merge']})" if d.get("spatial_merge", 1) > 1
                            else ""), f"tokens/image {d['tokens_per_image']}"]
            lines.append("  " + "  ".join(cols))
            if d.get("layers_note"):
                lines.append(f"  {'':<8}  {'':<9}  ({d['layers_note']})")
            if not d["captured"]:
                lines.append(f"  {'':<8}  {'':<9}  reason: {d['reason']}")
        else:
            if not d["captured"]:
                lines.append(f"  {name:<8}  {'skipped':<9}  {d['reason']}")
                continue
            lines.append("  " + "  ".join([f"{name:<8}", f"{'captured':<9}", f"layers {d['layers']:>3}",
                                          f"attention {d['attention']}",
                                          f"heads {d.get('attention_heads')}, kv heads {d.get('kv_heads')} "
                                          f"x head dim {d.get('head_dim')}", f"KV cache: {d['kv_cache']}"]))
    p = out["prompt"]
    lines += ["", f"sample prompt ({p['source']}; batch {p['batch']}):"]
    for i, s in enumerate(p["samples"]):
        parts = [f"text {s['text_before']:>4}"]
        for j, (a, b) in enumerate(s["vision"]):
            if j:
                parts.append(f"text {a - s['vision'][j - 1][1]:>4}")
            parts.append(f"vision [{a}, {b}) {b - a}")
        parts.append(f"text {s['text_after']:>4}")
        lines.append(f"  sample {i}: " + " | ".join(parts) + f"   (length {s['length']})")
    for i, s in enumerate(p.get("vision_units", [])):
        units = ", ".join(f"{u['unit']} [{u['span'][0]}, {u['span'][1]}) {u['tokens']} tokens" for u in s["units"])
        lines.append(f"  sample {i} vision units (keep counts per unit): {units}")
        seps = ", ".join(f"{at} (id {tok})" for at, tok in s["separators"]) or "none"
        lines.append(f"  sample {i} protected separators, never dropped nor counted: {seps}")
    if "cost" in out:
        lines += ["", "cost of the pruned prefill (batch 1, the first sample's layout):", format_table(out["cost"])]
    return "\n".join(lines)


# -- export-onnx ----------------------------------------------------------------------------------

def cmd_export_onnx(args) -> int:
    import os

    from graphprune.rewrite.pipeline import as_passes
    as_passes(args.pipeline)        # bad options fail before any model is built
    _writable_folder(args.out, "--out")
    if args.opset is not None:
        from graphprune.targets.onnx import check_opset
        check_opset(args.opset)
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise _Failure(f"{args.out} exists and is not empty; pass --overwrite to replace it")
    try:
        from graphprune.targets.onnx import export_onnx
    except ImportError as e:
        raise _Failure(f"ONNX export needs the onnx extra ({e}): pip install 'graphprune[onnx]'") from None
    from graphprune import prune
    t0 = time.perf_counter()
    model, source = load_model(args.model, **_loading(args))
    pruned = prune(model, args.pipeline)
    # traced on graphprune.tools.zoo.llava_example(model, batch=2, pad=(0, 3)): random tokens, two samples
    manifest = export_onnx(pruned, args.out, overwrite=args.overwrite, opset=args.opset)
    print(f"exported {manifest['pipeline_repr']} on {args.model} ({source}) to {args.out} "
          f"in {time.perf_counter() - t0:.1f} s (opset {manifest['opset']})")
    for name in manifest.files:
        size = os.path.getsize(os.path.join(args.out, name))
        print(f"  {name:<18} {size:>12,} bytes")
    kv = manifest["reference_prompt"]["kv_lengths"]
    print(f"  KV lengths per layer on the reference prompt: {kv}")
    return 0


# -- run ------------------------------------------------------------------------------------------

def cmd_run(args) -> int:
    import torch

    from graphprune.rewrite.pipeline import as_passes
    if args.max_new_tokens < 1:
        raise _Failure("--max-new-tokens must be >= 1")
    if args.repeats < 1:
        raise _Failure("--repeats must be >= 1")
    threads = args.threads if args.threads is not None else (1 if args.model in TINY else torch.get_num_threads())
    if threads < 1:
        raise _Failure("--threads must be >= 1")
    methods = args.method or list(RUN_DEFAULTS)
    for m in methods:            # bad options fail before any model is built
        as_passes(m)
    t0 = time.perf_counter()
    model, source = load_model(args.model, **_loading(args))
    example, _ = sample_prompt(model, args.model, any_model=True)
    if example is None:
        raise _Failure(f"no sample prompt for {type(model).__name__}")
    kw = example.as_kwargs()
    build_s = time.perf_counter() - t0
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = _run_methods(args, model, kw, methods, build_s)
    finally:
        torch.set_num_threads(previous_threads)
    out.update(model=args.model, model_class=type(model).__name__, source=source, threads=threads)
    if args.json:
        print(json.dumps({k: v for k, v in out.items() if not k.startswith("_")}, indent=2))
        return 0
    _print_run(out, args.repeats)
    return 0


def _run_methods(args, model, kw, methods, build_s) -> dict:
    import torch

    from graphprune import prune
    from graphprune.errors import PassNotApplicable
    t0 = time.perf_counter()
    base = prune(model, linear=args.linear)
    capture_s = time.perf_counter() - t0
    rows, reports, skipped = [], [], []

    def record(label, pm):
        ids = pm.generate(**kw, max_new_tokens=args.max_new_tokens)[0, kw["input_ids"].shape[1]:].tolist()
        report = pm.report
        ms = _median_ms(lambda: pm(**kw), args.repeats)
        rows.append({"method": label, "tokens": ids, "prefill_ms": ms})
        reports.append((label, report))

    record("unpruned", base)
    for m in methods:
        try:
            pm = prune(model, m, linear=args.linear)
        except PassNotApplicable as e:
            if args.method:
                raise
            skipped.append({"method": m, "reason": str(e)})
            continue
        record(" | ".join(repr(p) for p in pm.pipeline), pm)
    with torch.no_grad():
        hf_ms = _median_ms(lambda: model(**kw), args.repeats)
        hf = model.generate(**kw, max_new_tokens=args.max_new_tokens, do_sample=False)
    hf_ids = hf[0, kw["input_ids"].shape[1]:].tolist()
    ref = rows[0]["tokens"]
    for r in rows:
        r["matches_unpruned"] = r["tokens"] == ref
        r["first_difference"] = _first_difference(r["tokens"], ref)
    n_img = int((kw["input_ids"] == model.config.image_token_id).sum())
    return {"prompt_tokens": int(kw["input_ids"].shape[1]), "vision_tokens": n_img,
            "build_seconds": round(build_s, 2), "capture_seconds": round(capture_s, 2),
            "hf_prefill_ms": hf_ms, "hf_generate_tokens": hf_ids, "hf_matches_unpruned": hf_ids == ref,
            "results": rows, "skipped": skipped, "reports": {label: rep.to_dict() for label, rep in reports},
            "_tables": {label: rep.table() for label, rep in reports}}


def _first_difference(a, b):
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return i if i is not None or len(a) == len(b) else min(len(a), len(b))


def _print_run(out, repeats) -> None:
    rows = out["results"]
    print(f"model: {out['model']} ({out['model_class']}; {out['source']})")
    print(f"prompt: {out['prompt_tokens']} tokens, {out['vision_tokens']} vision; build {out['build_seconds']:.1f} s, "
          f"capture {out['capture_seconds']:.1f} s; {out['threads']} CPU thread(s)")
    print()
    width = max(len(r["method"]) for r in rows + [{"method": "HF model (reference)"}])
    print(f"{'method':<{width}}  {'prefill ms':>10}  {'same as unpruned':<18}  generated tokens")
    for r in rows:
        same = "-" if r is rows[0] else ("yes" if r["matches_unpruned"] else f"no (from token {r['first_difference']})")
        print(f"{r['method']:<{width}}  {r['prefill_ms']:>10.2f}  {same:<18}  {' '.join(map(str, r['tokens']))}")
    same = "yes" if out["hf_matches_unpruned"] else "no"
    print(f"{'HF model (reference)':<{width}}  {out['hf_prefill_ms']:>10.2f}  {same:<18}  "
          f"{' '.join(map(str, out['hf_generate_tokens']))}")
    print(f"(prefill ms: median of {repeats} runs; graphprune rows include preparing the prompt, the HF row is "
          "model(**inputs); tokens: greedy)")
    for s in out["skipped"]:
        print(f"skipped {s['method']}: {s['reason']}")
    for table in out["_tables"].values():
        print()
        print(table)


def _median_ms(fn, repeats: int) -> float:
    fn()    # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return round(statistics.median(ts) * 1e3, 3)


# -- bench / demo / visualize ---------------------------------------------------------------------

def _positive(args, *names) -> None:
    for n in names:
        if getattr(args, n) < 1:
            raise _Failure(f"--{n.replace('_', '-')} must be >= 1")


def _threads(args) -> None:
    import torch
    if args.threads is not None:
        _positive(args, "threads")
        torch.set_num_threads(args.threads)


def _writable(path: str, what: str) -> None:
    """An output file can be created at `path` (checked before any work)."""
    import os
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise _Failure(f"{what} {path}: folder {folder} does not exist")
    if os.path.isdir(path):
        raise _Failure(f"{what} {path} is a folder; give a file name")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise _Failure(f"{what} {path}: not writable")
    _probe(folder, f"{what} {path}")


def _writable_folder(path: str, what: str) -> None:
    """An output folder exists or can be made at `path`: the nearest existing ancestor is a
    folder where files can be created (checked before any work)."""
    import os
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise _Failure(f"{what} {path} exists and is not a folder")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise _Failure(f"{what} {path}: {probe} is a file, not a folder")
    _probe(probe, f"{what} {path}")


def _probe(folder: str, what: str) -> None:
    # permission bits do not tell (root, /proc, read-only mounts): create and remove a file
    import os
    import tempfile
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".graphprune-probe-")
    except OSError as e:
        raise _Failure(f"{what}: cannot write in {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.remove(name)


def cmd_bench(args) -> int:
    from graphprune.rewrite.pipeline import as_passes
    from graphprune.tools import bench, speed, speed_compiled, speed_video, timing, vqa_model
    _positive(args, "n", "batch", "time_batch", "repeats", "decode_tokens", "decode_steps")
    _threads(args)
    timing.keep_freed_memory()
    for path, what in ((args.json if args.json != "-" else None, "--json"), (args.plot, "--plot")):
        if path:
            _writable(path, what)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise _Failure("--plot needs matplotlib: pip install 'graphprune[plot]'") from None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    for case in ("video", "compiled"):
        if getattr(args, case) and not args.speed:
            raise _Failure(f"--{case} is a case of the speed mode: give --speed --{case}")
    if args.video and args.compiled:
        raise _Failure("--video and --compiled are two cases of the speed mode: give one")
    if args.speed:
        if args.model or args.data or args.pipeline:
            raise _Failure("--speed builds its own random-weight model; --model, --data and --pipeline do not apply")
        linear = [x.strip() for x in (args.linear or "aten,packed").split(",") if x.strip()]
        if args.video:
            res = speed_video.run_video_speed(methods, repeats=args.repeats, linear=linear, quiet=args.quiet)
        elif args.compiled:
            if methods:
                raise _Failure(f"--compiled times {speed_compiled.PIPELINE} only; --methods does not apply")
            res = speed_compiled.run_compiled_speed(repeats=args.repeats, decode_steps=args.decode_steps, linear=linear,
                                                    quiet=args.quiet)
        else:
            res = speed.run_speed(methods, repeats=args.repeats, decode_steps=args.decode_steps, linear=linear,
                                  quiet=args.quiet)
        res["machine"] = timing.machine()
        text = (speed_video.format_video_speed if args.video else speed_compiled.format_compiled_speed
                if args.compiled else speed.format_speed)(res)
    else:
        if args.linear and args.linear not in LINEAR_KINDS:
            raise _Failure(f"--linear {args.linear!r}: the grid runs one lowering, aten or packed")
        budgets = bench.parse_budgets(args.budgets)
        methods = methods or list(bench.METHODS)
        bench.grid_specs(methods, [], 32, 10 ** 9)          # unknown names fail before the model loads
        for p in args.pipeline:
            as_passes(p)
        if args.data and not __import__("os").path.exists(args.data):
            raise _Failure(f"--data {args.data} does not exist")
        vm = vqa_model.load_vqa_model(args.model, **_loading(args))
        cells = bench.grid_specs(methods, budgets, vm.model.config.text_config.num_hidden_layers, vm.tokens_per_image,
                                 bench.feature_layers(vm.model.config))
        cells += [("custom", f"#{i + 1}", p) for i, p in enumerate(args.pipeline)]
        prepared, skipped = bench.prepare(vm, cells, args.linear or "aten")
        items = vqa_model.load_items(args.data, args.n, args.split, args.seed)
        if not items:
            raise _Failure("no questions to run")
        res = bench.run_grid(vm, prepared, items, batch=args.batch, time_batch=args.time_batch, repeats=args.repeats,
                             decode_tokens=args.decode_tokens, quiet=args.quiet)
        res.update(model=vm.name, source=vm.source, machine=timing.machine(),
                   config={k: v for k, v in vars(args).items() if k != "func"}, questions=len(items), skipped=skipped)
        text = f"model: {vm.name} ({vm.source}); {len(items)} questions\n" + bench.format_grid(res)
        text += "".join(f"\nskipped {s['method']} (default: {s['pipeline']}): {s['reason']}" for s in skipped)
        if args.plot:
            bench.plot_grid(res, args.plot, f"{vm.name}: accuracy vs prefill time ({len(items)} questions)")
            text += f"\nplot: {args.plot}"
    if args.json == "-":
        print(json.dumps(res, indent=2))
        return 0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        text += f"\njson: {args.json}"
    print(text)
    return 0


def cmd_demo(args) -> int:
    from graphprune.rewrite.pipeline import as_passes
    from graphprune.tools import demo, vqa_model
    _positive(args, "n", "repeats")
    _threads(args)
    for p in args.pipeline or []:
        as_passes(p)
    if not args.no_images:
        _writable_folder(args.out, "--out")
    vm = vqa_model.load_vqa_model(args.model, **_loading(args))
    pipelines = args.pipeline or demo.default_pipelines(vm.model.config.text_config.num_hidden_layers)
    items = vqa_model.load_items(None, args.n, "test", args.seed)
    res = demo.run_demo(vm, items, pipelines, None if args.no_images else args.out, repeats=args.repeats,
                        linear=args.linear)
    if args.json:
        print(json.dumps({"model": vm.name, "source": vm.source, **res}, indent=2))
        return 0
    print(demo.format_demo(res, f"model: {vm.name} ({vm.source}); {len(items)} test questions, batch {len(items)}"))
    return 0


def cmd_visualize(args) -> int:
    from graphprune.rewrite.pipeline import as_passes
    from graphprune.tools import images, vqa, vqa_model
    from graphprune.tools.visualize import MAX_SCALE, check_image_file, visualize
    as_passes(args.pipeline)
    _positive(args, "scale")
    if args.scale > MAX_SCALE:
        raise _Failure(f"--scale {args.scale}: at most {MAX_SCALE}")
    _writable(args.out, "--out")
    split, _, idx = args.image.partition(":")
    if split in vqa.SPLITS and idx.isdigit():
        s = vqa.sample_at(split, int(idx))
        image, question = s.image, args.question or s.question
    elif not args.question:
        raise _Failure("--question is required for an image file")
    else:
        check_image_file(args.image)
        image, question = images.read_image(args.image), args.question
    vm = vqa_model.load_vqa_model(args.model, **_loading(args))
    res = visualize(vm, image, question, args.pipeline, args.out, scale=args.scale)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['pipeline']}: kept {len(res['kept'])} of {res['patches']} patches ({res['grid'][0]}x{res['grid'][1]} "
          f"grid), {res['dimmed']} dimmed, {len(res['merged'])} merged tokens outlined; KV {res['kv_bytes']:,} bytes"
          + (f"; answer: {res['answer']}" if res["answer"] is not None else "") + f"\nwrote {res['out']} "
          f"({res['size'][0]}x{res['size'][1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
