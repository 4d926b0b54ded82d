"""GLM-4.1V: Qwen2-VL-style ViT with a 2x2 patch merger, GLM-4 LM with 3-D M-RoPE; images.

The processor writes `<|begin_of_image|> <|image|> x (t*h*w / merge^2) <|end_of_image|>` per image,
image_grid_thw giving each one's patch grid, and mm_token_type_ids (1 at image tokens), from which
the model's own get_rope_index builds the positions, as Qwen2-VL's does. Videos are left out: their
frames are written with the image token, each frame its own block followed by its time stamp, a
layout this family does not read yet (a video input is refused up front, as an input it does not take).
"""
from __future__ import annotations

from graphprune.families.qwen2_vl import Qwen2VLFamily


class Glm4vFamily(Qwen2VLFamily):
    name = "glm4v"
    model_types = ("glm4v",)
    vision_inputs = ("pixel_values", "image_grid_thw", "mm_token_type_ids")
    vision_buckets = 0      # its encoder (learned position embeddings, downsampling conv) is not QwenVisionStage's
    separator_tokens = ("image_start_token_id", "image_end_token_id")
