"""vLLM plugin: graphprune's vision-stage pruning inside vLLM's LLaVA (entry point `vllm.general_plugins`).

    GRAPHPRUNE_VLLM_PIPELINE="cls_topk(keep=64)" vllm serve DIR        (or os.environ[...] before LLM(...))

With the variable set, vLLM (front end, engine core and every worker: it loads general plugins in
each process and they inherit the environment) serves `LlavaForConditionalGeneration` checkpoints
through `graphprune.targets.vllm_llava`: the processor puts the pipeline's kept count of
placeholders in each prompt (so the KV cache and the scheduler see `keep` tokens per image, positions
sequential as LLaVA's are), and the model computes each image's tokens with graphprune's rewritten
vision graph (`graphprune.prune(...)` of the same checkpoint loaded by transformers). Unset or empty:
the plugin registers nothing and vLLM is unchanged.

vLLM fixes every request's length when its prompt is processed, before any image is seen, so only
pipelines whose passes all act in the vision stage and keep a fixed number of tokens per image can
run; the rest are refused here, at start-up, with the reason (`vision_tokens_kept`). Why the
LLM-stage methods do not fit, and what vLLM would need: docs/vllm.md.
"""
from __future__ import annotations

import os

from graphprune.errors import PassConfigError

PIPELINE_ENV = "GRAPHPRUNE_VLLM_PIPELINE"


def enabled_pipeline() -> str | None:
    """The pipeline named by GRAPHPRUNE_VLLM_PIPELINE, or None when the plugin is off."""
    text = os.environ.get(PIPELINE_ENV, "").strip()
    return text or None


def vision_tokens_kept(pipeline, tokens_per_image: int) -> int:
    """Vision tokens per image that `pipeline` leaves for the language model, for a prompt with
    `tokens_per_image` image tokens; raises PassConfigError for any pipeline vLLM cannot serve."""
    from graphprune.rewrite.pass_api import Choose, Protect, TextEmbeds, TextMask, TopK
    from graphprune.rewrite.pipeline import as_passes, load_builtin_methods
    from graphprune.tokenops import budget

    load_builtin_methods()
    passes = as_passes(pipeline)
    if not passes:
        raise PassConfigError(f"{PIPELINE_ENV}={pipeline!r} names no pass; unset it to serve unpruned")
    kept = tokens_per_image
    for p in passes:
        where = f"{PIPELINE_ENV}: {p!r}"
        if p.stage != "vision":
            raise PassConfigError(
                f"{where} prunes inside the language model ({p.stage} stage); vLLM's KV-cache manager gives every "
                "layer of a request the same length, so only vision-stage methods run in vLLM (docs/vllm.md). "
                "Use cls_topk or random(stage='vision', positions='compact').")
        plans = p.plan()
        for plan in plans if isinstance(plans, list) else [plans]:
            select = plan.select
            if isinstance(select, Protect):
                continue
            if not isinstance(select, (TopK, Choose)) or select.keep is None:
                raise PassConfigError(f"{where} keeps a data-dependent number of tokens; vLLM needs the count "
                                      "when the prompt is processed. Give it a fixed budget (mode='static').")
            if isinstance(select, Choose) and select.static_mask:
                raise PassConfigError(
                    f"{where} keeps a static capacity whose unused slots graphprune masks as padding; vLLM cannot "
                    "mask single tokens of a prompt, so the served answers would differ. Use a method whose "
                    "kept count is fixed (cls_topk, random).")
            if plan.positions != "compact":
                fix = ("Set positions='compact'." if hasattr(p.config, "positions") else
                       "This method keeps them by design; vLLM would need per-token position ids for LLaVA.")
                raise PassConfigError(f"{where} gives the kept tokens their original positions; vLLM numbers a "
                                      f"LLaVA prompt's tokens sequentially. {fix}")
            if any(isinstance(s, (TextEmbeds, TextMask)) for s in plan.signals.values()):
                raise PassConfigError(
                    f"{where} reads the instruction in the vision stage; vLLM's image encoder sees only the image "
                    "(its processor and encoder caches are keyed by image content). Not supported yet.")
            try:
                kept = budget(select.keep, kept)
            except ValueError as e:
                raise PassConfigError(f"{where}: {e}") from None
    return kept


def register() -> None:
    """Entry point (vllm.general_plugins): with GRAPHPRUNE_VLLM_PIPELINE set, check the pipeline and serve
    LLaVA through graphprune's vision stage; an unsupported pipeline raises here, before vLLM starts."""
    pipeline = enabled_pipeline()
    if pipeline is None:
        return
    vision_tokens_kept(pipeline, 10**9)       # refuse bad pipelines before any model is loaded
    from vllm import ModelRegistry

    ModelRegistry.register_model("LlavaForConditionalGeneration",
                                 "graphprune.targets.vllm_llava:GraphpruneLlavaForConditionalGeneration")
