"""Run graphprune's GPU paths end to end and print parity and timings (for whoever has a GPU).

    python examples/gpu_check.py [--method "fastv(layer=2, keep=64)"] [--steps 32]

On a random-weight LLaVA-1.5-architecture model sized like the benchmark's speed mode (LLM
1024 x 8 layers, CLIP 768 x 6, 576 vision tokens), it checks on CUDA:
  1. eager pruned generate vs the static-cache decode compiled with mode="reduce-overhead"
     (CUDA graphs): identical greedy tokens, and per-token decode time of each;
  2. ONNX export + ONNX Runtime with the CUDA execution provider (when onnxruntime-gpu really
     loads it): identical greedy tokens and prefill time;
  3. flash-attn as the layers' attention (attention="flash", bf16) against SDPA: kept tokens,
     logits, greedy tokens and prefill time.
Every step prints a reason instead of failing when its requirement is missing.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def _timed(fn, repeats=5):
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="fastv(layer=2, keep=64)")
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check (the CPU paths are covered by the test suite)")
        return 0
    import graphprune as gp
    from graphprune.tools.zoo import llava_example, tiny_llava

    model = tiny_llava(layers=8, hidden=1024, vision_hidden=768, vision_layers=6, image_size=336).cuda()
    ex = llava_example(model, batch=1)
    kw = {k: v.cuda() for k, v in ex.as_kwargs().items()}
    pruned = gp.prune(model, args.method)
    gen = dict(max_new_tokens=args.steps, eos_token_id=[])

    eager, t_eager = _timed(lambda: pruned.generate(**kw, **gen), 3)
    pruned.compile_decode(mode="reduce-overhead")
    pruned.generate(**kw, **gen, static_cache=True)                       # record the CUDA graphs
    graphs, t_graphs = _timed(lambda: pruned.generate(**kw, **gen, static_cache=True), 3)
    print(f"[1] reduce-overhead static decode: tokens identical: {torch.equal(eager, graphs)}; "
          f"generate {t_eager * 1e3:.1f} ms eager vs {t_graphs * 1e3:.1f} ms CUDA graphs "
          f"({args.steps} tokens, medians of 3)")

    try:
        from graphprune.targets.ort import OrtPrunedModel
        with tempfile.TemporaryDirectory() as d:
            gp.export_onnx(pruned, d + "/export")
            ort_model = OrtPrunedModel(d + "/export", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            cpu_kw = ex.as_kwargs()
            ids = ort_model.generate(**cpu_kw, **gen)
            _, t_pre = _timed(lambda: ort_model(**cpu_kw), 5)
            print(f"[2] ONNX Runtime on {ort_model.provider}: tokens identical: {torch.equal(ids, eager.cpu())}; "
                  f"prefill {t_pre * 1e3:.1f} ms")
    except Exception as e:  # report, do not hide: this is a diagnostic script
        print(f"[2] ONNX Runtime path unavailable: {type(e).__name__}: {e}")

    from graphprune.targets.flash import flash_kernel
    if flash_kernel() is None:
        print("[3] flash-attn not importable (pip install 'graphprune[gpu]'): the layers use SDPA")
    else:
        half = model.to(torch.bfloat16)            # flash-attn takes fp16/bf16
        kwh = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in kw.items()}
        sdpa, fl = gp.prune(half, args.method, attention="sdpa"), gp.prune(half, args.method, attention="flash")
        (a, t_sdpa), (b, t_flash) = _timed(lambda: sdpa(**kwh), 5), _timed(lambda: fl(**kwh), 5)
        diff = (a.logits.float() - b.logits.float()).abs().max().item()
        same = torch.equal(sdpa.generate(**kwh, **gen), fl.generate(**kwh, **gen))
        print(f"[3] flash-attn layers (bf16): kept tokens identical: {torch.equal(a.kept, b.kept)}; max |logit diff| "
              f"{diff:.3g}; greedy tokens identical: {same}; prefill {t_sdpa * 1e3:.1f} ms SDPA vs "
              f"{t_flash * 1e3:.1f} ms flash-attn")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
