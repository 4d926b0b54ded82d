"""vLLM offline throughput and time to first token, unpruned vs graphprune's vision-stage pruning.

    . .venv-vllm/bin/activate && python benchmarks/vllm_bench.py [--questions 300] [--pipeline "cls_topk(keep=64)"]

One engine per configuration (each in a child process: the plugin reads GRAPHPRUNE_VLLM_PIPELINE once
per process), max_num_seqs = the largest concurrency. At concurrency c the questions go to
`LLM.generate` in waves of c (all c arrive together; the next wave starts when the last finishes):
requests/s = questions / wall time of all waves; TTFT = vLLM's own first-token latency per request
(arrival to first token, RequestOutput.metrics). Greedy, answer + <eos> (at most 4 tokens).
Writes benchmarks/results/vllm.json and prints a table.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONCURRENCY = (1, 4, 16)


def child(model_dir: str, n: int, concurrency: list[int]) -> dict:
    from PIL import Image
    from vllm import LLM, SamplingParams

    from graphprune.tools import vqa
    from graphprune.tools.vqa_model import load_items

    vocab = vqa.Vocab()
    items = load_items(None, n)
    prompts = [{"prompt_token_ids": vocab.prompt_ids(it.question, 1),
                "multi_modal_data": {"image": Image.fromarray(it.image.permute(1, 2, 0).numpy())}} for it in items]
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_num_seqs=max(concurrency),
              max_model_len=1024, limit_mm_per_prompt={"image": 1}, seed=0, disable_log_stats=False,
              mm_processor_cache_gb=0)
    params = SamplingParams(temperature=0.0, max_tokens=4)
    llm.generate(prompts[:max(concurrency)], params, use_tqdm=False)             # warm-up
    rows = {}
    for c in concurrency:
        ttft, correct = [], 0
        start = time.perf_counter()
        for i in range(0, n, c):
            for it, o in zip(items[i:i + c], llm.generate(prompts[i:i + c], params, use_tqdm=False)):
                ttft.append(o.metrics.first_token_latency)
                correct += vocab.decode(o.outputs[0].token_ids, skip_special=True).strip() == it.answer
        wall = time.perf_counter() - start
        rows[c] = {"requests_per_s": n / wall, "ttft_ms_median": 1e3 * statistics.median(ttft),
                   "ttft_ms_p90": 1e3 * statistics.quantiles(ttft, n=10)[-1], "accuracy": correct / n}
    return {"rows": rows}


def run(model_dir, n, concurrency, pipeline):
    env = {k: v for k, v in os.environ.items() if k != "GRAPHPRUNE_VLLM_PIPELINE"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if pipeline:
        env["GRAPHPRUNE_VLLM_PIPELINE"] = pipeline
    cmd = [sys.executable, __file__, "--child", "--model-dir", model_dir, "--questions", str(n),
           "--concurrency", *map(str, concurrency)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])["rows"]
    sys.exit(f"vLLM run {pipeline or 'unpruned'} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=".venv-vllm/models/vqa_llava")
    ap.add_argument("--questions", type=int, default=300)
    ap.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    ap.add_argument("--pipeline", default="cls_topk(keep=64)")
    ap.add_argument("--out", default="benchmarks/results/vllm.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.model_dir, a.questions, a.concurrency)), flush=True)
        return
    results = {"questions": a.questions, "pipeline": a.pipeline, "configs": {}}
    for name, pipeline in (("unpruned", None), (a.pipeline, a.pipeline)):
        results["configs"][name] = run(a.model_dir, a.questions, a.concurrency, pipeline)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"{'config':<20} {'conc':>4} {'req/s':>8} {'TTFT med ms':>12} {'TTFT p90 ms':>12} {'acc %':>6}")
    for name, rows in results["configs"].items():
        for c, r in rows.items():
            print(f"{name:<20} {c:>4} {r['requests_per_s']:>8.2f} {r['ttft_ms_median']:>12.1f} "
                  f"{r['ttft_ms_p90']:>12.1f} {100 * r['accuracy']:>6.1f}")


if __name__ == "__main__":
    main()
