"""Capture + rewrite time of full-size models on the meta device (no weights, no memory): what
`graphprune inspect --config` and `prune()` spend before any tensor is computed, per shipped config.

Rounds are interleaved (every config once per round, a fresh model each time) and medians reported,
so configs are compared side by side under the same machine load. Usage (repository root):
    python benchmarks/meta_capture.py [--rounds 3] [--pipeline "fastv(layer=2, keep=64)"] [CONFIG ...]
"""
import argparse
import statistics
import time

from graphprune.rewrite.pipeline import Program, parse_pipeline, run_pipeline
from graphprune.tools.accountant import meta_model, shipped_configs


def one_round(config: str, pipeline: str) -> tuple[float, float]:
    model = meta_model(config)
    t0 = time.perf_counter()
    program = Program.capture(model, stages=("vision", "prefill"))
    t1 = time.perf_counter()
    run_pipeline(program, parse_pipeline(pipeline))
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", default=shipped_configs())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pipeline", default="fastv(layer=2, keep=64)")
    args = ap.parse_args()
    times = {c: [] for c in args.configs}
    for _ in range(args.rounds):
        for c in args.configs:
            times[c].append(one_round(c, args.pipeline))
    print(f"| config | capture s (median of {args.rounds}) | rewrite s | total s |\n|---|---|---|---|")
    for c, ts in times.items():
        cap, rw = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        print(f"| {c} | {cap:.2f} | {rw:.2f} | {cap + rw:.2f} |")


if __name__ == "__main__":
    main()
