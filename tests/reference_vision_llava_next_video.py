"""Independent reference for vision-stage pruning of LLaVA-NeXT-Video videos. Nothing here imports graphprune.

* Each video's frames run through the model's own vision tower, the feature layer's attention written by hand
  (reference_vision_llava_next.crop_signals: per frame patch, CLS dropped, its frame's CLS attention to it and the
  attention it receives, heads averaged).
* A video token is the model's own vision_resampler (average pooling, kernel = stride = spatial_pool_stride) of
  its frame's patch block, then the projector. Its score is the same resampler run on the per-patch scores: the
  mean over its patches (the CLS attention of a pooled token is the mean of its frame's CLS attention to its
  patches; the attention it receives, the mean of its patches'). Its key (heads concatenated) and hidden state
  (the feature layer's output) are pooled the same way: the pooled hidden state is what the projector maps.
* VisionZip / VisPruner per unit on those pooled tokens (reference_vision_qwen.zip_unit,
  reference_vision_qwen_methods.vispruner_choice), a merged token's value its merged hidden state through the
  model's projector.
* MustDrop without its merge (mustdrop_filters): per unit the key set, the pooled tokens of highest CLS attention
  (reference_mustdrop.key_set), then reference_mustdrop.filter_select per unit in reference.lm_generate.
* `features` runs that pooling and the projector by hand on the feature layer (hidden_states[vision_feature_layer]
  of the tower, CLS dropped), the pixels a video of frames: what the placeholders take.
* Units, the kept prompt and its run: reference_vision_llava_next (units: a frame's pooled tokens or the whole
  video's, no newline slot; the pruned prompt's embeddings from the model's own get_video_features, positions
  kept or compact, run by reference.lm_generate).
"""
from __future__ import annotations

import reference as R
import reference_mustdrop as M
import reference_vision_llava_next as RN
import torch
from reference_families import family_inputs, instruction_mask
from reference_vision_qwen import zip_unit
from reference_vision_qwen_methods import vispruner_choice
from torch import Tensor


@torch.no_grad()
def features(model, video: Tensor) -> Tensor:
    """(frames x pooled tokens, D) a video's projected tokens: tower, feature layer, resampler, projector by hand."""
    cfg = model.config
    hidden = model.model.vision_tower(video, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
    pooled = model.model.vision_resampler(hidden[:, 1:] if cfg.vision_feature_select_strategy == "default" else hidden)
    return model.model.multi_modal_projector(pooled).reshape(-1, cfg.text_config.hidden_size)


@torch.no_grad()
def video_tokens(model, example, video_unit: str) -> list[dict]:
    """Per unit (samples, videos, frames in order): its pooled tokens' 'cls', 'received' (tokens,), 'keys',
    'hidden' (tokens, C): each frame's per-patch signals pooled by the model's own vision_resampler."""
    out = []
    for video in example.pixel_values_videos:
        pooled = {}
        for name, per_patch in RN.crop_signals(model, video).items():      # (frames, patches[, C])
            rows = per_patch[..., None] if per_patch.dim() == 2 else per_patch
            rows = model.model.vision_resampler(rows.float())             # (frames, tokens, C)
            pooled[name] = rows[..., 0] if per_patch.dim() == 2 else rows
        if video_unit == "frame":
            out += [{name: t[f] for name, t in pooled.items()} for f in range(video.shape[0])]
        else:
            out.append({name: t.reshape(-1, *t.shape[2:]) for name, t in pooled.items()})
    return out


def video_scores(model, example, how: str, video_unit: str) -> list[Tensor]:
    """Per unit: each token's score ('cls' or 'received')."""
    return [tok[how] for tok in video_tokens(model, example, video_unit)]


def _per_sample(model, example, video_unit: str, per_unit: list) -> list[list]:
    n = len(RN.units(model, example, video_unit)[0])
    return [per_unit[i * n:(i + 1) * n] for i in range(len(per_unit) // n)]


@torch.no_grad()
def visionzip(model, example, keep: int, contextual: int, dominant: str, video_unit: str) -> tuple[list, list]:
    """Per sample, per unit: VisionZip's kept token indices (ascending) and the projected values their slots take
    (dominant tokens in raster order, then the contextual ones, as the authors lay them out)."""
    chosen, values = [], []
    for tok in video_tokens(model, example, video_unit):
        dom, targets, hidden = zip_unit(tok[dominant], tok["keys"], tok["hidden"], keep, contextual)
        chosen.append(torch.cat([dom, targets]).sort().values)
        values.append(model.model.multi_modal_projector(hidden[torch.cat([dom.sort().values, targets])]))
    return _per_sample(model, example, video_unit, chosen), _per_sample(model, example, video_unit, values)


@torch.no_grad()
def vispruner(model, example, keep: int, important_ratio: float, importance: str, video_unit: str) -> list[list]:
    """Per sample, per unit: VisPruner's kept local indices (ascending) on the pooled tokens."""
    return _per_sample(model, example, video_unit, [
        vispruner_choice(tok[importance], tok["hidden"], keep, important_ratio)
        for tok in video_tokens(model, example, video_unit)])


def picks(model, example, keep: int, how: str, seed: int = 0, video_unit: str = "frame") -> list[list[Tensor]]:
    """Per sample, per unit: the kept token indices (ascending); how 'cls', 'received' or 'random' (as
    reference_vision_llava_next.picks: the top-k of torch.rand((units, 1, tokens), manual_seed(seed)))."""
    if how == "random":
        return RN.picks(model, example, keep, how, seed, video_unit)
    return _per_sample(model, example, video_unit, [score.topk(keep).indices.sort().values
                                                    for score in video_scores(model, example, how, video_unit)])


@torch.no_grad()
def mustdrop_filters(model, example, *, ratio: float | None, filters: dict, video_unit: str, steps: int) -> dict:
    """MustDrop without its merge (mustdrop(merge=False)) on videos: per unit the key set, the top
    ceil(ratio x tokens) pooled tokens by CLS attention (reference_mustdrop.key_set; ratio None: no key set),
    then the dual-attention filters {layer: (gamma, alpha, capacity)} per unit (a filter at L reads layer L's
    attention, L + 1 runs reduced; static: protected first, then the rule's by column sum), compact positions
    after each, the caches of the first..last filter layers cut to the final set; run by reference.lm_generate."""
    emb, am, pos, vm = family_inputs(model, example)
    blocks = RN.units(model, example, video_unit)
    protected = torch.zeros_like(vm, dtype=torch.bool)
    if ratio is not None:
        scores = iter(video_scores(model, example, "cls", video_unit))
        for s, row in enumerate(blocks):
            for blk in row:
                protected[s, blk] = M.key_set(next(scores)[None], ratio)[0]
    selects = {layer + 1: M.filter_select(gamma, alpha, "static", capacity, images=len(blocks[0]))
               for layer, (gamma, alpha, capacity) in filters.items()}
    return R.lm_generate(model, emb, am, pos, selects=selects, protected=protected, positions="compact",
                         cut_to_final=(min(filters), max(filters) + 1), max_new_tokens=steps, vision_mask=vm,
                         text_mask=instruction_mask(model, example))
