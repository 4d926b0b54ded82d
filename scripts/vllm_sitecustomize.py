"""Loaded at interpreter start-up in the vLLM venv (scripts/setup_vllm_env.sh puts it on PYTHONPATH).

The package registry serves torchvision / torchaudio / torchcodec as CUDA builds; against the CPU torch,
torchvision's import fails on `operator torchvision::nms does not exist` and torchaudio / torchcodec raise
OSError, which vLLM's audio module does not catch. Declaring the two op schemas torchvision registers
fake kernels for lets it import (vLLM only uses its image transforms); the audio packages are hidden, so
importing them raises ImportError, which vLLM handles.
"""

import sys

try:
    import torch

    _lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 - must stay alive
    _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
except Exception:  # a torchvision that registers its own ops (a CPU build) needs none of this
    pass

sys.modules.setdefault("torchaudio", None)
sys.modules.setdefault("torchcodec", None)
