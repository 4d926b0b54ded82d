"""vLLM's LLaVA with graphprune's vision stage (registered by graphprune.targets.vllm_plugin when enabled).

Two pieces, both subclasses of vLLM's own LLaVA classes:
* `GraphpruneLlavaProcessingInfo`: an image's placeholder count is what the pipeline keeps, so the
  prompt, the KV cache and the scheduler's token budget all see `keep` tokens per image;
* `GraphpruneLlavaForConditionalGeneration`: after vLLM loads its weights, transformers loads the same
  checkpoint and `graphprune.prune` rewrites its vision stage; each batch of images then runs through
  that rewritten graph (vision tower, the passes' scoring and selection nodes, projector), whose
  `features` output is `keep` tokens per image. The language model is vLLM's, untouched.
"""
from __future__ import annotations

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from graphprune.compat import plain_model_kwargs
from graphprune.errors import InputError, PassConfigError

from .vllm_plugin import PIPELINE_ENV, enabled_pipeline, vision_tokens_kept


class PrunedVision:
    """graphprune's rewritten vision graph as a plain callable (not a submodule: vLLM's loader would expect
    checkpoint weights for every parameter of the model's submodules)."""

    def __init__(self, pruned):
        self.graph = pruned.executables["vision"]

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, keep, D). Each image runs alone, so what it keeps never depends on which requests
        vLLM's scheduler batched with it (seeded random draws are per position in the batch)."""
        from graphprune.lower.runtime import _call
        return torch.cat([_call(self.graph, pixel_values=image[None])["features"] for image in pixel_values])


def _pipeline() -> str:
    pipeline = enabled_pipeline()
    if pipeline is None:
        raise PassConfigError(f"graphprune's vLLM LLaVA is registered but {PIPELINE_ENV} is unset in this process; "
                              "set it in the environment vLLM starts from")
    return pipeline


class GraphpruneLlavaProcessingInfo(LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        full = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return vision_tokens_kept(_pipeline(), full)


@MULTIMODAL_REGISTRY.register_processor(LlavaMultiModalProcessor, info=GraphpruneLlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class GraphpruneLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.graphprune_source = vllm_config.model_config.model
        self.graphprune_vision = None          # the rewritten vision graph, built in load_weights

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        self.graphprune_vision = self._prune_vision()
        return loaded

    def _prune_vision(self):
        """graphprune.prune of the checkpoint as transformers loads it: its rewritten vision graph."""
        from transformers import LlavaForConditionalGeneration as HFLlava

        import graphprune as gp

        param = next(self.multi_modal_projector.parameters())
        hf_model = HFLlava.from_pretrained(self.graphprune_source, dtype=param.dtype, attn_implementation="sdpa",
                                           **plain_model_kwargs(local_files_only=True)).to(param.device).eval()
        return PrunedVision(gp.prune(hf_model, _pipeline(), attention="sdpa"))

    def _process_image_input(self, image_input):
        if isinstance(image_input, LlavaImageEmbeddingInputs):
            raise InputError("graphprune prunes images from their pixels; this request passed image embeddings, "
                             f"which carry every patch. Send the image itself, or serve without {PIPELINE_ENV}")
        return self.graphprune_vision(image_input["pixel_values"])
