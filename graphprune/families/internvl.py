"""InternVL (3 / 3.5, the Hugging Face port): InternViT tower, pixel-shuffle projector
(downsample_ratio), Qwen2 / Llama LM.

Images are tiled and pixel_values holds every tile of every image, in prompt order (the processor
does not pass how many tiles each image has). It writes an image as `<img>` + `<IMG_CONTEXT>` x
tiles x tokens per tile + `</img>`: one unbroken run of placeholders per image (a video: one run per
frame, each frame its own `<img>` block). So an image is a run, `keep` counts per run, and the
tokens either side of a run (`<img>`, `</img>`, whose ids the config does not name) are separators.
"""
from __future__ import annotations

from graphprune.families.base import MODALITIES, Family, VisionLayout


class InternVLFamily(Family):
    name = "internvl"
    model_types = ("internvl",)
    eager_vision = "tiled images whose tiles per image only the prompt's placeholder runs tell"

    def tokens_per_tile(self) -> int:
        cfg = self.config()
        size, patch = (v[0] if isinstance(v, (list, tuple)) else v    # (H, W) or one side
                       for v in (cfg.vision_config.image_size, cfg.vision_config.patch_size))
        return int((size // patch) ** 2 * cfg.downsample_ratio ** 2)

    def vision_layout(self, input_ids, video_unit: str = "frame", modalities=MODALITIES,
                      **inputs) -> VisionLayout | None:
        if "image" not in modalities:
            return None
        return self.tiled_layout(input_ids, inputs.get("pixel_values"), self.tokens_per_tile(), joined=1, before=1)
