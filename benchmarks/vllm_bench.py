"""vLLM offline requests/s and time to first token, unpruned vs graphprune's vision-stage plugin, in one run.

    . .venv-vllm/bin/activate
    nice -n 5 python benchmarks/vllm_bench.py --model lm_heavy --questions 200 --rounds 3 \
        --concurrency 1,4,16 --pipeline cls_topk:64

Two engines, each in its own process and kept alive for the whole run (the plugin reads
GRAPHPRUNE_VLLM_PIPELINE once per process): vLLM unpruned, and vLLM with the plugin. Each round gives
both engines one turn per concurrency c, interleaved (unpruned, pruned; the order flips every round so
drift on this shared machine hits both alike). A turn is one `LLM.generate` over the N questions with
the scheduler's max_num_seqs set to c, so c requests run at once and the rest queue:
requests/s = N / wall time of the call; TTFT = vLLM's own per-request arrival-to-first-token latency
(`RequestOutput.metrics`, queueing included, as a client of a busy server sees it) and, apart,
scheduled-to-first-token (the prefill itself). Every request is greedy with exactly 2 output tokens
(ignore_eos); prefix caching and the multimodal processor cache are off and every image carries a
fresh multi_modal_uuid per turn, so no turn reuses another's encoder output or KV blocks.
Numbers are medians over rounds; the machine's load average is recorded per turn.

Models: `shipped` is graphprune's trained VQA LLaVA (its LM is small: heads widened to 32 for vLLM's CPU
attention, see targets/vllm_checkpoint.py), so the vision encoder is a large share of a request;
`lm_heavy` is a random-weight LLaVA-1.5-shaped model (CLIP 336 px, 24 x 24 = 576 patches, width 32,
2 layers; Llama width 256, 6 layers, head dim 32) whose language model takes the share of a request's
FLOPs the real LLaVA-1.5-7B's does (see `request_flops`). Its answers are meaningless; only speed counts.
Writes benchmarks/results/vllm_{model}.json and .txt.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODELS_DIR = os.path.join(ROOT, ".venv-vllm", "models")
OUTPUT_TOKENS = 2
# random-weight LLaVA-1.5 shape with the LM's share of FLOPs near LLaVA-1.5-7B's (graphprune.tools.zoo.build_model keys)
LM_HEAVY = dict(image_size=336, patch=14, vision_hidden=32, vision_layers=2, vision_heads=2, vision_mlp=128,
                hidden=256, layers=6, heads=8, kv_heads=8, mlp=688, projector_act="gelu")
# LLaVA-1.5-7B (CLIP ViT-L/14-336, Vicuna-7B), for the LM share quoted next to the measured models
LLAVA_7B = {"vision_config": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, image_size=336,
                                  patch_size=14),
            "text_config": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=32, head_dim=128, vocab_size=32064),
            "vision_feature_layer": -2}


# ---------------------------------------------------------------- model folders

def model_dir(model: str) -> str:
    """The folder vLLM serves for `model` (shipped | lm_heavy), written once under .venv-vllm/models."""
    from graphprune.targets.vllm_checkpoint import write_vllm_checkpoint

    out = os.path.join(MODELS_DIR, {"shipped": "vqa_llava", "lm_heavy": "lm_heavy_llava"}[model])
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    if model == "shipped":
        return write_vllm_checkpoint(out)
    from graphprune.tools import zoo
    source = out + ".hf"
    zoo.build_model(LM_HEAVY, seed=0).save_pretrained(source)
    return write_vllm_checkpoint(out, source)


# ---------------------------------------------------------------- FLOPs

def request_flops(cfg: dict, text_tokens: int, image_tokens: int, output_tokens: int = OUTPUT_TOKENS) -> dict:
    """FLOPs (2 x multiply-adds of the matmuls and attention products) of one request of `text_tokens` text
    tokens and one image whose `image_tokens` tokens reach the LM: CLIP tower up to the feature layer (all
    patches + CLS), projector on the tokens the LM gets, LM prefill (causal attention) and output_tokens - 1
    decode steps, logits for one position per step as vLLM computes them."""
    vc, tc = cfg["vision_config"], cfg["text_config"]
    dv, iv = vc["hidden_size"], vc["intermediate_size"]
    patches = (vc["image_size"] // vc["patch_size"]) ** 2
    n = patches + 1
    layers_v = vc["num_hidden_layers"] + 1 + cfg["vision_feature_layer"] if cfg["vision_feature_layer"] < 0 \
        else cfg["vision_feature_layer"]
    vision = patches * 3 * vc["patch_size"] ** 2 * dv + layers_v * (n * (4 * dv * dv + 2 * dv * iv) + 2 * n * n * dv)
    d, i_lm = tc["hidden_size"], tc["intermediate_size"]
    hd = tc.get("head_dim") or d // tc["num_attention_heads"]
    q_width, kv_width = tc["num_attention_heads"] * hd, tc["num_key_value_heads"] * hd
    projector = image_tokens * (dv * d + d * d)
    per_token_linear = tc["num_hidden_layers"] * (2 * d * q_width + 2 * d * kv_width + 3 * d * i_lm)
    s = text_tokens + image_tokens
    lm = s * per_token_linear + tc["num_hidden_layers"] * 2 * q_width * s * (s + 1) // 2
    for t in range(1, output_tokens):       # decode step t attends over s + t positions
        lm += per_token_linear + tc["num_hidden_layers"] * 2 * q_width * (s + t)
    lm += output_tokens * d * tc["vocab_size"]
    macs = {"vision": vision, "projector": projector, "lm": lm}
    out = {k: 2 * v for k, v in macs.items()}
    out["total"] = sum(out.values())
    return out


def flops_summary(cfg: dict, text_tokens: int, kept: int) -> dict:
    vc = cfg["vision_config"]
    full = (vc["image_size"] // vc["patch_size"]) ** 2
    unpruned, pruned = request_flops(cfg, text_tokens, full), request_flops(cfg, text_tokens, kept)
    return {"unpruned": unpruned, "pruned": pruned, "lm_share_unpruned": unpruned["lm"] / unpruned["total"],
            "ideal_speedup": unpruned["total"] / pruned["total"]}


# ---------------------------------------------------------------- engine process

def scheduler_of(llm):
    """The running scheduler (engine core in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def engine(folder: str, n: int, max_concurrency: int) -> None:
    """Child: start one vLLM engine, then answer turns read from stdin ({"turn", "concurrency"}) with
    `RESULT {json}` lines on stdout until stdin closes."""
    from PIL import Image
    from vllm import LLM, SamplingParams

    from graphprune.tools import vqa
    from graphprune.tools.vqa_model import load_items

    vocab = vqa.Vocab()
    items = load_items(None, n)
    images = [Image.fromarray(it.image.permute(1, 2, 0).numpy()) for it in items]
    llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_num_seqs=max_concurrency, max_model_len=1024,
              limit_mm_per_prompt={"image": 1}, seed=0, enable_prefix_caching=False, mm_processor_cache_gb=0,
              disable_log_stats=False)
    scheduler = scheduler_of(llm)
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_TOKENS, min_tokens=OUTPUT_TOKENS, ignore_eos=True)

    def prompts(tag, idx):
        return [{"prompt_token_ids": vocab.prompt_ids(items[i].question, 1), "multi_modal_data": {"image": images[i]},
                 "multi_modal_uuids": {"image": [f"{tag}-{i}"]}} for i in idx]

    llm.generate(prompts("warmup", range(min(n, max_concurrency))), params, use_tqdm=False)
    print("READY " + json.dumps({"max_num_batched_tokens": llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens}),
          flush=True)
    for line in sys.stdin:
        turn = json.loads(line)
        # what max_num_seqs=c sets at start-up: the scheduler admits at most c requests into RUNNING
        scheduler.max_num_running_reqs = scheduler.max_num_active_reqs = turn["concurrency"]
        batch = prompts(f"turn{turn['turn']}", range(n))
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        wall = time.perf_counter() - start
        ttft = [o.metrics.first_token_latency for o in outs]
        prefill = [o.metrics.first_token_ts - o.metrics.scheduled_ts for o in outs]
        correct = sum(o.outputs[0].token_ids[0] == vocab.stoi.get(it.answer) for o, it in zip(outs, items))
        assert all(len(o.outputs[0].token_ids) == OUTPUT_TOKENS for o in outs)
        print("RESULT " + json.dumps({
            "requests_per_s": n / wall, "wall_s": wall, "prompt_tokens": len(outs[0].prompt_token_ids),
            "ttft_ms_median": 1e3 * statistics.median(ttft), "ttft_ms_p90": 1e3 * statistics.quantiles(ttft, n=10)[-1],
            "prefill_ms_median": 1e3 * statistics.median(prefill), "first_token_accuracy": correct / n,
            "load_avg_1min": [load_before, os.getloadavg()[0]]}), flush=True)


class Engine:
    """A kept-alive engine child; `turn()` sends one turn and waits for its result."""

    def __init__(self, name, folder, n, max_concurrency, pipeline, log_path):
        env = {k: v for k, v in os.environ.items() if k != "GRAPHPRUNE_VLLM_PIPELINE"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if pipeline:
            env["GRAPHPRUNE_VLLM_PIPELINE"] = pipeline
        self.name, self.log_path = name, log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, __file__, "--engine", folder, "--questions", str(n),
                                      "--max-concurrency", str(max_concurrency)], env=env, cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)

    def read(self, prefix):
        for line in self.proc.stdout:
            if line.startswith(prefix + " "):
                return json.loads(line[len(prefix) + 1:])
        self.proc.wait()
        self.log.flush()
        with open(self.log_path) as f:
            tail = f.read()[-3000:]
        sys.exit(f"vLLM engine '{self.name}' exited ({self.proc.returncode}); its log {self.log_path} ends:\n{tail}")

    def turn(self, turn, concurrency):
        self.proc.stdin.write(json.dumps({"turn": turn, "concurrency": concurrency}) + "\n")
        self.proc.stdin.flush()
        return self.read("RESULT")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=120)
        self.log.close()


# ---------------------------------------------------------------- driver

def pipeline_string(spec: str) -> str:
    """`cls_topk:64` -> `cls_topk(keep=64)`; anything with parentheses is taken as it is."""
    if "(" in spec or ":" not in spec:
        return spec
    method, keep = spec.split(":", 1)
    if not keep.isdigit():
        raise SystemExit(f"--pipeline {spec!r}: after ':' give the number of tokens to keep, e.g. cls_topk:64")
    return f"{method}(keep={keep})"


def median_of(turns, key):
    return statistics.median(t[key] for t in turns)


def summarize(turns: dict, concurrency) -> dict:
    """Medians over rounds per engine and concurrency, and pruned / unpruned ratios: of those medians, and the
    median of each round's own ratio (the two turns of a round ran back to back, under about the same load)."""
    keys = ("requests_per_s", "ttft_ms_median", "ttft_ms_p90", "prefill_ms_median", "first_token_accuracy")
    summary = {name: {c: {k: median_of(ts, k) for k in keys} for c, ts in turns[name].items()}
               for name in ("unpruned", "pruned")}
    summary["ratio"] = {}
    for c in concurrency:
        ratio = {k: summary["pruned"][c][k] / summary["unpruned"][c][k] for k in keys[:4]}
        per_round = [p["requests_per_s"] / u["requests_per_s"] for p, u in zip(turns["pruned"][c], turns["unpruned"][c])]
        ratio["requests_per_s_per_round"] = per_round
        ratio["requests_per_s_paired_median"] = statistics.median(per_round)
        summary["ratio"][c] = ratio
    return summary


def table(res) -> str:
    f = res["flops"]
    lines = [f"vLLM {res['vllm_version']} CPU, model {res['model']}, {res['questions']} questions x {res['rounds']} rounds, "
             f"pipeline {res['pipeline']} ({res['kept']} of {res['image_tokens']} image tokens), "
             f"{OUTPUT_TOKENS} output tokens, medians over rounds",
             f"command: {res['command']}",
             f"request GFLOPs unpruned {f['unpruned']['total'] / 1e9:.3f} (LM {100 * f['lm_share_unpruned']:.1f}%), "
             f"pruned {f['pruned']['total'] / 1e9:.3f}: FLOPs-ideal speed-up {f['ideal_speedup']:.2f}x "
             f"(LLaVA-1.5-7B: LM {100 * res['llava_7b_lm_share']:.1f}%)",
             f"load average (1 min) over turns: {res['load_avg_range'][0]:.1f}-{res['load_avg_range'][1]:.1f}",
             "",
             f"{'config':<10} {'conc':>4} {'req/s':>8} {'TTFT med ms':>12} {'TTFT p90 ms':>12} {'prefill ms':>11} "
             f"{'acc %':>6}"]
    for name in ("unpruned", "pruned"):
        for c, r in res["summary"][name].items():
            lines.append(f"{name:<10} {c:>4} {r['requests_per_s']:>8.2f} {r['ttft_ms_median']:>12.1f} "
                         f"{r['ttft_ms_p90']:>12.1f} {r['prefill_ms_median']:>11.1f} {100 * r['first_token_accuracy']:>6.1f}")
    lines.append("")
    for c, r in res["summary"]["ratio"].items():
        rounds = ", ".join(f"{x:.2f}" for x in r["requests_per_s_per_round"])
        lines.append(f"concurrency {c:>2}: req/s pruned/unpruned {r['requests_per_s']:.2f}x (medians), per round "
                     f"{rounds} (median {r['requests_per_s_paired_median']:.2f}x); TTFT median "
                     f"{100 * (r['ttft_ms_median'] - 1):+.0f}%, prefill {100 * (r['prefill_ms_median'] - 1):+.0f}%")
    return "\n".join(lines) + "\n"


def rewrite_summary(path: str) -> None:
    with open(path) as f:
        res = json.load(f)
    res["summary"] = summarize(res["turns"], [str(c) for c in res["concurrency"]])
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    text = table(res)
    with open(path[:-len(".json")] + ".txt", "w") as f:
        f.write(text)
    print(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("shipped", "lm_heavy"), default="lm_heavy")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated, e.g. 1,4,16")
    ap.add_argument("--pipeline", default="cls_topk:64", help="METHOD:KEEP or a graphprune pipeline string")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--summarize", metavar="JSON", help="recompute the summary and .txt of a results json")
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--max-concurrency", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.engine:
        return engine(a.engine, a.questions, a.max_concurrency)
    if a.summarize:
        return rewrite_summary(a.summarize)
    try:
        concurrency = [int(c) for c in a.concurrency.split(",")]
    except ValueError:
        raise SystemExit(f"--concurrency {a.concurrency!r}: give comma-separated integers, e.g. 1,4,16") from None
    if a.questions < 10 or a.rounds < 1 or min(concurrency) < 1:
        raise SystemExit("--questions must be >= 10, --rounds and every concurrency >= 1")
    pipeline = pipeline_string(a.pipeline)

    import vllm

    from graphprune.targets.vllm_plugin import vision_tokens_kept
    from graphprune.tools import vqa
    from graphprune.tools.vqa_model import load_items

    folder = model_dir(a.model)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    vc = cfg["vision_config"]
    image_tokens = (vc["image_size"] // vc["patch_size"]) ** 2
    kept = vision_tokens_kept(pipeline, image_tokens)
    text_tokens = statistics.median(len(vqa.Vocab().prompt_ids(it.question, 0)) for it in load_items(None, a.questions))

    logs = os.path.join(ROOT, ".venv-vllm", "bench_logs")
    os.makedirs(logs, exist_ok=True)
    engines = {"unpruned": Engine("unpruned", folder, a.questions, max(concurrency), None,
                                  os.path.join(logs, f"{a.model}_unpruned.log")),
               "pruned": Engine("pruned", folder, a.questions, max(concurrency), pipeline,
                                os.path.join(logs, f"{a.model}_pruned.log"))}
    started = time.time()
    scheduler_info = {name: e.read("READY") for name, e in engines.items()}
    print(f"engines ready after {time.time() - started:.0f} s", file=sys.stderr)
    turns = {name: {c: [] for c in concurrency} for name in engines}
    turn_id = 0
    for r in range(a.rounds):
        order = ("unpruned", "pruned") if r % 2 == 0 else ("pruned", "unpruned")
        for c in concurrency:
            for name in order:
                turn_id += 1
                result = engines[name].turn(turn_id, c)
                turns[name][c].append(result)
                print(f"round {r} c={c} {name}: {result['requests_per_s']:.2f} req/s, "
                      f"TTFT {result['ttft_ms_median']:.0f} ms, load {result['load_avg_1min'][0]:.1f}", file=sys.stderr)
    for e in engines.values():
        e.close()

    summary = summarize(turns, concurrency)
    loads = [x for per_c in turns.values() for ts in per_c.values() for t in ts for x in t["load_avg_1min"]]
    llava_7b = request_flops(LLAVA_7B, int(text_tokens), 576)
    res = {"model": a.model, "model_dir": os.path.relpath(folder, ROOT), "vllm_version": vllm.__version__,
           "questions": a.questions, "rounds": a.rounds, "concurrency": concurrency, "pipeline": pipeline,
           "image_tokens": image_tokens, "kept": kept, "output_tokens": OUTPUT_TOKENS, "text_tokens_median": text_tokens,
           "command": "python benchmarks/vllm_bench.py " + " ".join(sys.argv[1:]),
           "scheduler": scheduler_info, "flops": flops_summary(cfg, int(text_tokens), kept),
           "llava_7b_lm_share": llava_7b["lm"] / llava_7b["total"], "load_avg_range": [min(loads), max(loads)],
           "summary": summary, "turns": turns}
    os.makedirs(a.out_dir, exist_ok=True)
    base = os.path.join(a.out_dir, f"vllm_{a.model}")
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=1)
    text = table(res)
    with open(base + ".txt", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
