"""`graphprune bench --speed --compiled`: the torch.compile backend against graphprune's eager
lowering, and graphprune's decode step against transformers' own, on the speed model
(graphprune.tools.speed: a random-weight LLaVA sized for this machine, batch 1).

For each lowering of the linear layers, interleaved in one run:
  forward  one whole forward (vision, merge, pruned prefill, head) of FastV keeping 64 of 576 from
           layer 2: `graphprune.prune(model, ..., linear=lin)` against `torch.compile(model,
           backend="graphprune", options={"pipeline": ..., "linear": lin})` with Inductor
           (compiled / eager: target <= 1, the compiled path is not the slow path);
  decode   a greedy decode step per token, unpruned: graphprune's decode graph (from the prefilled
           cache, `steps` tokens) against transformers' own `generate`, per token as
           (generate of 1 + steps tokens - generate of 1 token) / steps (target <= 1); and against the
           model's own forward looped over its DynamicCache from the prefilled prompt, `steps` greedy
           tokens timed alone (no prefill subtracted: at the speed model's ~1 s prefill, 5% noise in
           it moves the generate difference by ~3 ms a token, the size of the gap it is to show).
"""
from __future__ import annotations

import torch

from graphprune.lower.runtime import LINEAR_KINDS
from graphprune.tools.speed import SPEED_CONFIG, _decoder
from graphprune.tools.timing import Progress, interleaved
from graphprune.tools.vqa_model import BenchError, load_items, wrap_model

PIPELINE = "fastv(layer=2, keep=64)"


def run_compiled_speed(*, repeats=5, decode_steps=16, linear=LINEAR_KINDS, quiet=False, config=None) -> dict:
    """Compiled vs eager forward per linear lowering, and decode per token against transformers."""
    from graphprune import prune
    from graphprune.tools import vqa, zoo
    linear = [linear] if isinstance(linear, str) else list(linear)
    for lin in linear:
        if lin not in LINEAR_KINDS:
            raise BenchError(f"unknown linear lowering {lin!r}; have aten, packed")
    cfg = dict(config or SPEED_CONFIG)
    prog = Progress(1 + len(linear) + 2 * repeats, "compiled", not quiet)
    model = zoo.build_model(cfg, 0).eval()
    vm = wrap_model(model, "speed", "random weights", vocab=vqa.Vocab())
    kw = vm.inputs(load_items(None, 1))
    forward = {}
    torch._dynamo.reset()
    for lin in linear:
        eager = prune(model, PIPELINE, linear=lin)
        compiled = torch.compile(model, backend="graphprune", options={"pipeline": PIPELINE, "linear": lin})
        with torch.no_grad():                     # compiled (captured, rewritten, Inductor) outside the timing
            compiled(**kw)
        forward[("eager", lin)] = lambda e=eager: e(**kw)
        forward[("compiled", lin)] = lambda c=compiled: c(**kw)
        prog.step(f"compiled ({lin})")
    forward_s = interleaved(forward, repeats, prog)
    unpruned = prune(model)

    def generate(tokens):
        return lambda: model.generate(**kw, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    decode_s = interleaved({"graphprune": _decoder(unpruned, kw, decode_steps), "hf": generate(1 + decode_steps),
                            "hf_first": generate(1), "hf_loop": _hf_decoder(model, kw, decode_steps)}, repeats, prog)
    torch._dynamo.reset()
    rows = [{"linear": lin, "eager_ms": forward_s[("eager", lin)] * 1e3, "compiled_ms": forward_s[("compiled", lin)] * 1e3,
             "compiled_vs_eager": forward_s[("compiled", lin)] / forward_s[("eager", lin)]} for lin in linear]
    ours = decode_s["graphprune"] / decode_steps
    theirs = (decode_s["hf"] - decode_s["hf_first"]) / decode_steps
    loop = decode_s["hf_loop"] / decode_steps
    return {"config": cfg, "pipeline": PIPELINE, "repeats": repeats, "decode_steps": decode_steps,
            "prompt_tokens": int(kw["input_ids"].shape[1]), "forward": rows,
            "decode": {"graphprune_ms_per_token": ours * 1e3, "transformers_ms_per_token": theirs * 1e3,
                       "graphprune_vs_transformers": ours / theirs, "transformers_loop_ms_per_token": loop * 1e3,
                       "graphprune_vs_transformers_loop": ours / loop},
            "method": "medians of interleaved rounds; forward = one whole model call, batch 1; decode unpruned, "
                      "graphprune's default (aten) lowering against transformers' generate"}


def _hf_decoder(model, kw, steps):
    """`steps` greedy decode steps of the model's own forward over its DynamicCache, each run from the
    prompt's prefill (done once, outside the timing). Each run starts on a shallow copy of the prompt's
    cache: a DynamicCache layer rebinds its keys / values to a new concatenation each step and never
    writes them, as graphprune's PrunedCache.copy() relies on for its own runs."""
    import copy

    from graphprune.compat import generate_cache_name
    name = generate_cache_name()
    with torch.inference_mode():
        out = model(**kw, use_cache=True, logits_to_keep=1)
    prompt_cache, first = getattr(out, name), out.logits[:, -1:].argmax(-1)

    def fresh():
        cache = copy.copy(prompt_cache)
        cache.layers = [copy.copy(layer) for layer in prompt_cache.layers]
        return cache

    def run():
        cache, token = fresh(), first
        for _ in range(steps):
            step = model(input_ids=token, use_cache=True, logits_to_keep=1, **{name: cache})
            token = step.logits[:, -1:].argmax(-1)
    return run


def format_compiled_speed(res: dict) -> str:
    c = res["config"]
    lines = [f"compiled mode: random-weight LLaVA, LLM {c['hidden']} x {c['layers']} layers, vision "
             f"{c['vision_hidden']} x {c['vision_layers']}; {res['prompt_tokens']} prompt tokens; {res['pipeline']}; "
             f"medians of {res['repeats']} interleaved rounds", ""]
    head = f"{'linear':<8}{'eager ms':>10}{'compiled ms':>13}{'compiled/eager':>16}  target"
    lines += [head, "-" * len(head)]
    for r in res["forward"]:
        ok = "ok" if r["compiled_vs_eager"] <= 1.0 else "MISS"
        lines.append(f"{r['linear']:<8}{r['eager_ms']:>10.1f}{r['compiled_ms']:>13.1f}{r['compiled_vs_eager']:>15.2f}x  {ok}")
    d = res["decode"]
    ok = "ok" if d["graphprune_vs_transformers"] <= 1.0 else "MISS"
    lines += ["", f"decode per token (unpruned): graphprune {d['graphprune_ms_per_token']:.2f} ms, transformers "
                  f"{d['transformers_ms_per_token']:.2f} ms, ratio {d['graphprune_vs_transformers']:.2f}  {ok}",
              f"  against transformers' forward looped over its cache (no prefill subtracted): "
              f"{d['transformers_loop_ms_per_token']:.2f} ms, ratio {d['graphprune_vs_transformers_loop']:.2f}",
              "targets: compiled forward <= eager forward of the same lowering; graphprune decode <= transformers'",
              res["method"]]
    return "\n".join(lines)
