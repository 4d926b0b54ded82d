#!/usr/bin/env bash
# The oldest supported stack: the lower ends of pyproject.toml's ranges in a fresh venv, then
#  1. `pip install ".[test]"` on top must keep that stack (no re-resolution replacing the user's
#     torch / transformers), and
#  2. a subset of the suite: capture, anatomy, rewrite and the main methods against the
#     independent reference, the runtime, generation through transformers (GenerationConfig,
#     beams, streamers, multi-turn, save / load, the pipeline), every family through graphprune.prune,
#     the torch.compile backend on Gemma 3, EVS and DyCoke on video, Qwen's captured
#     vision stage (with VisPruner / ToMe inside it), LLaVA-NeXT / OneVision's per packing (its capture
#     and one method), and ONNX export + ONNX Runtime of Qwen2.5-VL
#     (M-RoPE positions in the decode graph).
# Usage: bash .ci/check_oldest.sh   (VENV, TORCH, TRANSFORMERS override the defaults)
# torch 2.12 is not supported: its torch.export cannot prove the min(...) stride guard transformers'
# attention emits for a dynamic sequence length (capture of the prefill stage fails).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/graphprune-oldest}
TORCH=${TORCH:-2.13.0}
TRANSFORMERS=${TRANSFORMERS:-4.56.2}
STACK=("torch==$TORCH" "transformers==$TRANSFORMERS" "onnx==1.23.1" "onnxscript==0.7.2" "onnxruntime==1.30.0")

python3 -m venv --clear "$VENV"
. "$VENV/bin/activate"
pip install -q "${STACK[@]}"
pip freeze > "$VENV/before.txt"
pip install -q ".[test]"
pip freeze > "$VENV/after.txt"
for pin in "${STACK[@]}"; do
    name=${pin%%==*}
    if ! grep -qiE "^${name}==${pin#*==}(\+.*)?$" "$VENV/after.txt"; then
        echo "pip install .[test] replaced $pin: $(grep -iE "^${name}==" "$VENV/after.txt" || echo removed)" >&2
        exit 1
    fi
done
echo "pip install .[test] kept ${STACK[*]}"
pip install -q --no-deps -e .      # run the tests against this checkout

# -m "not slow": as the main run; where a file repeats one code path across methods or families, the cases
# that differ on this stack (the main run, on the newest stack, runs them all)
python -m pytest -q -n 2 --dist loadfile -p no:cacheprovider -m "not slow" \
    --deselect tests/test_runtime.py::test_model_moved_after_capture_is_captured_again \
    --deselect "tests/test_generation_hf.py::test_save_and_load_round_trip[qwen]" \
    tests/test_reference.py::test_unpruned_matches_hf \
    tests/test_reference.py::test_step_logits_match_hf_forward \
    tests/test_runtime.py \
    tests/test_passes.py \
    "tests/test_methods.py::test_dart_llava" \
    "tests/test_methods.py::test_mustdrop_pipeline_exact" \
    "tests/test_methods.py::test_qwen2vl" \
    tests/test_generation_hf.py \
    tests/test_families.py \
    tests/test_families_tier2.py::test_keep_everything_equals_hf \
    tests/test_families_tier2.py::test_llm_methods_equal_reference \
    tests/test_families_tier2.py::test_batch_equals_samples_alone \
    tests/test_families_tier2.py::test_images_and_separators_found_by_place \
    "tests/test_dynamo_families.py::test_compiled_equals_prune[gemma3-2images]" \
    tests/test_evs.py \
    tests/test_dycoke.py \
    tests/test_vision_qwen_methods.py::test_vispruner_attention_matches_reference \
    tests/test_vision_qwen_methods.py::test_tome_in_place_matches_reference \
    tests/test_vision_llava_next.py::test_captured_stage_equals_get_image_features \
    "tests/test_vision_llava_next.py::test_matches_reference[llava_next-0]" \
    "tests/test_onnx_families.py::test_prefill_and_greedy_tokens_match[qwen2_5_vl-fastv-batch2]" \
    "tests/test_onnx_families.py::test_prefill_and_greedy_tokens_match[qwen2_5_vl-fastv-batch1]" \
    "tests/test_onnx_families.py::test_qwen_exports_mrope_positions_and_needs_the_model[qwen2_5_vl-fastv]"
