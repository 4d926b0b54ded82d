"""Qwen2.5-VL: Qwen2-VL's layout and M-RoPE, windowed-attention ViT, video time stamps in the
temporal positions (second_per_grid_ts)."""
from __future__ import annotations

from graphprune.families.qwen2_vl import Qwen2VLFamily


class Qwen2_5_VLFamily(Qwen2VLFamily):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    vision_inputs = Qwen2VLFamily.vision_inputs + ("second_per_grid_ts",)
