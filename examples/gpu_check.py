"""Run graphprune's GPU paths end to end and print parity and timings (for whoever has a GPU).

    python examples/gpu_check.py [--method "fastv(layer=2, keep=64)"] [--steps 32] [--skip speed]

Sections (each prints a reason or the error instead of stopping the others):
  parity     on a random-weight LLaVA-1.5-architecture model sized like the benchmark's speed mode
             (LLM 1024 x 8 layers, CLIP 768 x 6, 576 vision tokens), fp32 on CUDA: keep-everything
             logits against the model's own forward, and the pruned model's greedy tokens;
  graphs     the static-cache decode compiled with mode="reduce-overhead" (CUDA graphs): identical
             greedy tokens, generate time of each;
  onnx       ONNX export + ONNX Runtime (CUDA execution provider when onnxruntime-gpu loads it):
             identical greedy tokens and prefill time;
  flash      flash-attn as the layers' attention (attention="flash", bf16) against SDPA;
  speed      a 7B-width LLaVA (LLM 4096 x 8 layers, 32 heads; CLIP-L 1024 x 24 at 336 px) in bf16:
             plain transformers vs graphprune unpruned vs each method, end-to-end prefill (vision +
             LLM) and 32-token generate, one image (576 vision tokens), four (2304) and batch 8, medians of
             interleaved rounds with CUDA synchronisation; ideal = the LLM prefill FLOPs ratio.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import traceback

import torch

SECTIONS = ("parity", "devices", "graphs", "onnx", "flash", "speed")
# every method on the tiny LLaVA-1.5 (4 layers, 6 x 6 patches), the LLM-stage ones on the other families
LLAVA_SPECS = ("fastv(layer=2, keep=9)", "dart(layer=2, keep=8)", "random(layer=1, keep=4)", "vtw(layer=2)",
               "cls_topk(keep=8)", "visiontrim(keep=8)", "visiontrim(keep=8, stage='llm', layer=2)",
               "mustdrop(keep=12, layers=(1, 2), gamma=0.0278, alpha=0.0235)", "visionzip(keep=8, contextual=2)",
               "divprune(keep=8)", "cdpruner(keep=8)", "vispruner(keep=8)",
               "pyramiddrop(layers=(1, 3), ratios=(0.5, 0.25))",
               "sparsevlm(keep=8, layers=(0, 2), scale=2.0, bias=2.0, capacity=20)", "tome(keep=10, layers=(0, 1))")
FAMILY_SPECS = ("fastv(layer=2, keep=0.25)", "dart(layer=2, keep=0.25)", "random(layer=1, keep=0.5)", "vtw(layer=2)")
SPEED_METHODS = ("fastv(layer=2, keep=64)", "dart(layer=2, keep=64)", "vtw(layer=2)", "cls_topk(keep=64)")
WIDE_7B = dict(image_size=336, patch=14, vision_hidden=1024, vision_layers=24, vision_heads=16, vision_mlp=4096,
               hidden=4096, layers=8, heads=32, kv_heads=32, mlp=11008, projector_act="gelu")


DEVICE = "cuda"                 # --dry-run: "cpu", to check the script itself on a machine without a GPU


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _sync_time(fn):
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - t


def _timed(fn, repeats=5):
    runs = [_sync_time(fn) for _ in range(repeats)]
    return runs[-1][0], statistics.median(t for _, t in runs)


def _interleaved(fns: dict, repeats: int) -> dict:
    """{name: median seconds}: one warm-up each, then `repeats` round-robin rounds."""
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            _sync_time(fn)
        for _ in range(repeats):
            for k, fn in fns.items():
                times[k].append(_sync_time(fn)[1])
    return {k: statistics.median(v) for k, v in times.items()}


def _section(name, skip, fn, *args):
    if name in skip:
        return None
    t = time.perf_counter()
    try:
        out = fn(*args)
    except Exception:  # a diagnostic script: report every failure, run the other sections
        print(f"[{name}] FAILED:\n{traceback.format_exc()}", flush=True)
        out = None
    print(f"[{name}] ({time.perf_counter() - t:.0f} s)", flush=True)
    return out


def parity(ctx):
    import graphprune as gp
    from graphprune.tools.zoo import llava_example, tiny_llava

    model = tiny_llava(layers=8, hidden=1024, vision_hidden=768, vision_layers=6, image_size=336).to(DEVICE)
    ex = llava_example(model, batch=2, pad=(0, 3))
    kw = {k: v.to(DEVICE) for k, v in ex.as_kwargs().items()}
    with torch.inference_mode():
        ref = model(**kw).logits
        keep_all = gp.prune(model)(**kw).logits
    mask = kw["attention_mask"].bool()
    diff = (ref[mask] - keep_all[mask]).abs().max().item()
    print(f"[parity] keep-everything logits vs the model's own forward, batch 2 left-padded, fp32 {DEVICE}: "
          f"max |diff| {diff:.2e}")
    pruned = gp.prune(model, ctx["method"])
    gen = dict(max_new_tokens=ctx["steps"], eos_token_id=[])
    one = {k: v[:1] for k, v in kw.items() if k != "pixel_values"} | {"pixel_values": kw["pixel_values"][:1]}
    eager = pruned.generate(**one, **gen)
    cpu_model = tiny_llava(layers=8, hidden=1024, vision_hidden=768, vision_layers=6, image_size=336)
    cpu_ids = gp.prune(cpu_model, ctx["method"]).generate(**{k: v.cpu() for k, v in one.items()}, **gen)
    print(f"[parity] {ctx['method']}: {ctx['steps']} greedy tokens CUDA == CPU: {torch.equal(eager.cpu(), cpu_ids)}")
    ctx.update(model=model, pruned=pruned, one=one, gen=gen, eager=eager)


def _where(exc: BaseException) -> str:
    """The innermost graphprune frame of a traceback: where a device bug sits."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "graphprune" in f.filename]
    f = (frames or traceback.extract_tb(exc.__traceback__))[-1]
    return f"{f.filename.split('site/')[-1]}:{f.lineno} {f.line}"


def _margin_llava():
    """Tiny LLaVA with the projector's last layer and the embeddings scaled by 40 (as tests/test_visiontrim.py):
    random tiny weights leave VisionTrim's cluster assignments near ties, which CPU and GPU rounding break
    differently; the scaling gives margins of ~1e-3."""
    from graphprune.tools.zoo import tiny_llava
    model = tiny_llava()
    with torch.no_grad():
        for t in (model.model.multi_modal_projector.linear_2.weight, model.model.multi_modal_projector.linear_2.bias,
                  model.model.language_model.embed_tokens.weight):
            t.mul_(40)
    return model


def devices(ctx):
    """Each method on DEVICE against the same model on the CPU: kept tokens, prefill logits at the real
    tokens, 8 greedy tokens (tiny random-weight models, fp32, TF32 off)."""
    import graphprune as gp
    from graphprune.tools import family_zoo, zoo

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cases = [("llava", _margin_llava, lambda m: zoo.llava_example(m, batch=2, pad=(0, 3)), LLAVA_SPECS),
             ("qwen2_vl", zoo.tiny_qwen2vl, lambda m: zoo.qwen2vl_example(m, batch=2, pad=(0, 3)), FAMILY_SPECS)]
    cases += [(f, lambda f=f: family_zoo.build(f), lambda m: family_zoo.example(m, batch=2, pad=(0, 3)), FAMILY_SPECS)
              for f in ("llava_next", "llava_onevision", "qwen2_5_vl")]
    bad = 0
    for name, build, example, specs in cases:
        cpu, dev = build().eval(), build().eval().to(DEVICE)             # same seed: the same weights
        kw_cpu = example(cpu).as_kwargs()
        kw_dev = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw_cpu.items()}
        for spec in (None, *specs):
            try:
                a, b = gp.prune(cpu, spec), gp.prune(dev, spec)
                with torch.inference_mode():
                    oa, ob = a(**kw_cpu), b(**kw_dev)
                real = oa.cache[-1].mask.bool()
                diff = (oa.logits[real] - ob.logits.cpu()[real]).abs().max().item()
                kept = oa.kept is None or torch.equal(oa.kept, ob.kept.cpu())
                gen = dict(max_new_tokens=8, eos_token_id=[])
                greedy = torch.equal(a.generate(**kw_cpu, **gen), b.generate(**kw_dev, **gen).cpu())
                ok = kept and greedy and diff < 1e-3
                bad += not ok
                print(f"[devices] {'ok ' if ok else 'BAD'} {name} {spec or 'unpruned'}: kept equal {kept}, "
                      f"max |logit diff| {diff:.1e}, 8 greedy tokens equal {greedy}", flush=True)
            except Exception as e:  # report and go on: one run should show every device bug
                bad += 1
                print(f"[devices] BAD {name} {spec or 'unpruned'}: {type(e).__name__}: {str(e)[:300]} at {_where(e)}",
                      flush=True)
    print(f"[devices] {bad} of {sum(len(c[3]) + 1 for c in cases)} runs differ from the CPU or fail")


def graphs(ctx):
    pruned, one, gen = ctx["pruned"], ctx["one"], ctx["gen"]
    eager, t_eager = _timed(lambda: pruned.generate(**one, **gen), 3)
    pruned.compile_decode(mode="reduce-overhead")
    pruned.generate(**one, **gen, static_cache=True)                       # record the CUDA graphs
    cg, t_graphs = _timed(lambda: pruned.generate(**one, **gen, static_cache=True), 3)
    print(f"[graphs] reduce-overhead static decode: tokens identical: {torch.equal(eager, cg)}; "
          f"generate {t_eager * 1e3:.1f} ms eager vs {t_graphs * 1e3:.1f} ms CUDA graphs "
          f"({ctx['steps']} tokens, medians of 3)")


def onnx(ctx):
    import graphprune as gp
    from graphprune.targets.ort import OrtPrunedModel

    gen = ctx["gen"]
    with tempfile.TemporaryDirectory() as d:
        cpu_model = ctx["model"].cpu()
        try:
            gp.export_onnx(gp.prune(cpu_model, ctx["method"]), d + "/export")
        finally:
            ctx["model"].to(DEVICE)
        ort_model = OrtPrunedModel(d + "/export", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        cpu_kw = {k: v.cpu() for k, v in ctx["one"].items()}
        ids = ort_model.generate(**cpu_kw, **gen)
        _, t_pre = _timed(lambda: ort_model(**cpu_kw), 5)
        print(f"[onnx] ONNX Runtime on {ort_model.provider}: tokens identical to eager CUDA: "
              f"{torch.equal(ids, ctx['eager'].cpu())}; prefill {t_pre * 1e3:.1f} ms")


def flash(ctx):
    import graphprune as gp
    from graphprune.targets.flash import flash_kernel

    if flash_kernel() is None:
        print("[flash] flash-attn not importable (pip install 'graphprune[gpu]'): the layers use SDPA")
        return
    half = ctx["model"].to(torch.bfloat16)            # flash-attn takes fp16/bf16
    kwh = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in ctx["one"].items()}
    sdpa, fl = gp.prune(half, ctx["method"], attention="sdpa"), gp.prune(half, ctx["method"], attention="flash")
    (a, t_sdpa), (b, t_flash) = _timed(lambda: sdpa(**kwh), 5), _timed(lambda: fl(**kwh), 5)
    diff = (a.logits.float() - b.logits.float()).abs().max().item()
    same = torch.equal(sdpa.generate(**kwh, **ctx["gen"]), fl.generate(**kwh, **ctx["gen"]))
    print(f"[flash] flash-attn layers (bf16): kept tokens identical: {torch.equal(a.kept, b.kept)}; max |logit "
          f"diff| {diff:.3g}; greedy tokens identical: {same}; prefill {t_sdpa * 1e3:.1f} ms SDPA vs "
          f"{t_flash * 1e3:.1f} ms flash-attn")


def _speed_prompt(vocab, images: int, size: int, batch: int = 1):
    ids = [vocab.bos_id] + vocab.encode("USER:")
    for _ in range(images):
        ids += [vocab.image_id] * 576 + vocab.encode("\n")
    ids += vocab.encode("what color is the large object on the left ? ASSISTANT:")
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch * images, 3, size, size, generator=g)
    return dict(input_ids=torch.tensor([ids] * batch).to(DEVICE),
                attention_mask=torch.ones(batch, len(ids), dtype=torch.long).to(DEVICE),
                pixel_values=pixels.to(DEVICE).to(torch.bfloat16))


def speed(ctx):
    import graphprune as gp
    from graphprune.tools import vqa, zoo

    vocab = vqa.Vocab()
    with torch.device(DEVICE):
        model = zoo.build_model(WIDE_7B, 0, vocab).to(torch.bfloat16).eval()
    gen = dict(max_new_tokens=32, eos_token_id=[], do_sample=False)
    for images, batch in ((1, 1), (4, 1), (1, 8)):
        kw = _speed_prompt(vocab, images, WIDE_7B["image_size"], batch)
        variants = {"unpruned": gp.prune(model)} | {m: gp.prune(model, m) for m in SPEED_METHODS}
        with torch.inference_mode():
            ref = model(**kw).logits[:, -1].float()
            got = variants["unpruned"](**kw).logits[:, -1].float()
        print(f"[speed] batch {batch} x {images} image(s), {kw['input_ids'].shape[1]} prompt tokens; unpruned "
              f"graphprune vs transformers last-token logits (bf16): max |diff| {(ref - got).abs().max().item():.3g}", flush=True)
        prefill = _interleaved({"transformers": lambda: model(**kw), **{k: (lambda p=p: p(**kw))
                                                                          for k, p in variants.items()}}, 10)
        flops = {k: p.report.flops for k, p in variants.items()}        # reports of the last prefill
        decode = _interleaved({"transformers": lambda: model.generate(**kw, **gen),
                               **{k: (lambda p=p: p.generate(**kw, **gen)) for k, p in variants.items()}}, 3)
        print(f"{'':>26}{'prefill ms':>11}{'vs HF':>8}{'vs unpr':>9}{'ideal LLM':>10}{'generate ms':>13}{'vs HF':>8}")
        for k in prefill:
            ideal = flops["unpruned"] / flops[k] if k in flops else float("nan")
            print(f"{k[:26]:<26}{prefill[k] * 1e3:>11.1f}{prefill['transformers'] / prefill[k]:>7.2f}x"
                  f"{prefill['unpruned'] / prefill[k]:>8.2f}x{ideal:>9.2f}x{decode[k] * 1e3:>13.1f}"
                  f"{decode['transformers'] / decode[k]:>7.2f}x", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="fastv(layer=2, keep=64)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--skip", nargs="*", default=(), choices=SECTIONS)
    ap.add_argument("--dry-run", action="store_true", help="run every section on the CPU at a small size")
    args = ap.parse_args(argv)
    global DEVICE
    if args.dry_run:
        DEVICE = "cpu"
        WIDE_7B.update(vision_hidden=64, vision_layers=2, vision_heads=4, vision_mlp=128, hidden=128, layers=4,
                       heads=4, kv_heads=4, mlp=256)
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to check (the CPU paths are covered by the test suite)")
        return 0
    import transformers
    where = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU dry run"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {where}", flush=True)
    ctx = {"method": args.method, "steps": args.steps}
    _section("parity", args.skip, parity, ctx)
    _section("devices", args.skip, devices, ctx)
    _section("speed", args.skip, speed, ctx)
    for name, fn in (("graphs", graphs), ("onnx", onnx), ("flash", flash)):
        if "pruned" not in ctx:
            print(f"[{name}] skipped: the parity section did not build the model")
            continue
        _section(name, args.skip, fn, ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
