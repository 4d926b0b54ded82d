"""Families graphprune recognises and refuses up front, with the reason (instead of a raw error
deep in capture, or a silently wrong graph)."""
from __future__ import annotations

from graphprune.families.base import Family


class MllamaFamily(Family):
    name = "mllama"
    model_types = ("mllama",)
    refused = ("Mllama (Llama 3.2 Vision) feeds the image to cross-attention layers, not as tokens of the "
               "decoder's sequence: there are no vision tokens in the prompt to prune")


def hybrid_layers(config) -> list[str]:
    """Decoder layer kinds other than softmax attention (linear attention, state-space, conv), which
    hold no per-token keys and values to prune."""
    text = getattr(config, "text_config", None) or config
    kinds = getattr(text, "layer_types", None) or []
    return sorted({k for k in kinds if k not in ("full_attention", "sliding_attention")})
