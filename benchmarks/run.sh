#!/usr/bin/env bash
# The benchmark runs behind the numbers in benchmarks/README.md. Run from the repository root with
# the virtual environment active (pip install -e ".[plot]" for the PNG plots). Results go to
# benchmarks/results/ (JSON + PNG); the tables print on the terminal.
set -euo pipefail
out=benchmarks/results
mkdir -p "$out"
model=${MODEL:-}                 # empty: the shipped VQA model; MODEL=random for random weights
args=()
[ -n "$model" ] && args+=(--model "$model")

# accuracy / speed / cost grid: methods x budgets (192/128/64 of 576 and each method's defaults)
graphprune bench "${args[@]}" --n "${N:-200}" --repeats "${REPEATS:-11}" --json "$out/grid.json" --plot "$out/grid.png" \
    | tee "$out/grid.txt"

# speed mode: larger random-weight model, 64 of 576 kept after layer 2, both linear lowerings
graphprune bench --speed --linear aten,packed --repeats "${REPEATS:-11}" --json "$out/speed.json" | tee "$out/speed.txt"

# video-length case: random-weight Qwen2.5-VL, one 32-frame video (3136 vision tokens), evs / fastv / dart /
# random keeping a fifth; LLM-prefill and end-to-end speed-ups against graphprune's unpruned model and transformers
graphprune bench --speed --video --repeats "${REPEATS:-11}" --json "$out/speed_video.json" | tee "$out/speed_video.txt"

# compile backend against graphprune's eager lowering (FastV, both linear lowerings), and graphprune's
# unpruned decode step against transformers' generate, on the speed model
graphprune bench --speed --compiled --linear aten,packed --repeats "${REPEATS:-11}" --json "$out/speed_compiled.json" \
    | tee "$out/speed_compiled.txt"
