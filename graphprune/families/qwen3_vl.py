"""Qwen3-VL: Qwen2-VL's units and separators, Qwen3 LM (q/k norms) with interleaved M-RoPE, and
DeepStack: features of some ViT layers (vision_config.deepstack_visual_indexes) are added to the
hidden states at the vision tokens after LM layers 0..n-1.

The processor writes `<|vision_start|> <|image_pad|> x (h*w / merge^2) <|vision_end|>` per image and,
per video, each frame (temporal patch) as its own block `<t seconds> <|vision_start|> <|video_pad|> x
(h*w / merge^2) <|vision_end|>`, the time stamp as text; units come from video_grid_thw as for
Qwen2-VL (a frame's tokens are still the video's placeholders in order), and the model's own
get_rope_index splits each video into its frames.
"""
from __future__ import annotations

import torch
from torch import nn

from graphprune.errors import InputError
from graphprune.families.base import MODALITIES, runs_of
from graphprune.families.qwen2_vl import Qwen2VLFamily


class Qwen3VLFamily(Qwen2VLFamily):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    # DeepStack adds features with hidden_states[visual_pos_masks, :] (a data-dependent nonzero) after
    # each of the first layers: dynamo cannot trace its language model's forward and runs it eagerly,
    # compiling each decoder layer as a frame of its own (the backend's targets/dynamo_layers.py)
    layer_frames = True

    def deepstack_layers(self) -> list[nn.Module]:
        return list(self.language_model().layers[:len(self.config().vision_config.deepstack_visual_indexes)])

    def merged_inputs(self, input_ids, **inputs) -> dict[str, torch.Tensor]:
        """inputs_embeds, and deepstack_embeds (levels, B, S, D): each DeepStack level's features at
        the vision tokens, zero elsewhere (the model's own get_image_features / get_video_features)."""
        outputs = self._outputs(self.body(), **inputs)
        embeds = self._merge(input_ids, outputs)
        deepstack = embeds.new_zeros(len(self.deepstack_layers()), *embeds.shape)
        for token, out in outputs:
            for level, feats in enumerate(out.deepstack_features):
                deepstack[level][input_ids == token] = torch.cat(feats).to(embeds.dtype)
        return {"inputs_embeds": embeds, "deepstack_embeds": deepstack}

    def frame_layout(self, merges, positions=None, video_unit: str = "frame", modalities=MODALITIES):
        """As Family.frame_layout; a video counted whole is refused when the prompt has videos: each
        frame is a block of its own behind a time stamp, and no compile frame tells which frames make
        one video (video_grid_thw does not reach them)."""
        if video_unit == "video" and "video" in modalities and any(m[0] == "video" and bool(m[1].any())
                                                                    for m in merges):
            raise InputError(f'{self.model_class} under torch.compile: video_unit="video" needs to know which '
                             "frames make each video, which no compile frame shows (each frame is its own "
                             'block); use video_unit="frame", or graphprune.prune(model, ..., video_unit="video")')
        return super().frame_layout(merges, positions, video_unit, modalities)

    def _frame_videos(self, sample: int, pos: torch.Tensor, closing: torch.Tensor,
                      positions: torch.Tensor | None) -> list[tuple]:
        """Each run of video placeholders is one frame (a time stamp and markers separate frames)."""
        return [(f"video frame {f}", run) for f, run in enumerate(runs_of(pos))]
