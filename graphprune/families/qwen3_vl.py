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

from graphprune.families.qwen2_vl import Qwen2VLFamily


class Qwen3VLFamily(Qwen2VLFamily):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    # DeepStack adds features with hidden_states[visual_pos_masks, :] (a data-dependent nonzero) after
    # each of the first layers: dynamo cannot trace its language model's forward and runs it eagerly,
    # compiling each decoder layer as a frame of its own
    compile_refused = ("dynamo runs its language model split into one frame per decoder layer (DeepStack's "
                       "boolean-mask write into the hidden states after the first layers breaks the graph), so no "
                       "frame holds the decoder layers the backend would replace by the pruned prefill")

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
