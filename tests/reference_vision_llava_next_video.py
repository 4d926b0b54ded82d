"""Independent reference for vision-stage pruning of LLaVA-NeXT-Video videos. Nothing here imports graphprune.

* Each video's frames run through the model's own vision tower, the feature layer's attention written by hand
  (reference_vision_llava_next.crop_signals: per frame patch, CLS dropped, its frame's CLS attention to it and the
  attention it receives, heads averaged).
* A video token is the model's own vision_resampler (average pooling, kernel = stride = spatial_pool_stride) of
  its frame's patch block, then the projector. Its score is the same resampler run on the per-patch scores: the
  mean over its patches (the CLS attention of a pooled token is the mean of its frame's CLS attention to its
  patches; the attention it receives, the mean of its patches').
* `features` runs that pooling and the projector by hand on the feature layer (hidden_states[vision_feature_layer]
  of the tower, CLS dropped), the pixels a video of frames: what the placeholders take.
* Units, the kept prompt and its run: reference_vision_llava_next (units: a frame's pooled tokens or the whole
  video's, no newline slot; the pruned prompt's embeddings from the model's own get_video_features, positions
  kept or compact, run by reference.lm_generate).
"""
from __future__ import annotations

import reference_vision_llava_next as RN
import torch
from torch import Tensor


@torch.no_grad()
def features(model, video: Tensor) -> Tensor:
    """(frames x pooled tokens, D) a video's projected tokens: tower, feature layer, resampler, projector by hand."""
    cfg = model.config
    hidden = model.model.vision_tower(video, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
    pooled = model.model.vision_resampler(hidden[:, 1:] if cfg.vision_feature_select_strategy == "default" else hidden)
    return model.model.multi_modal_projector(pooled).reshape(-1, cfg.text_config.hidden_size)


@torch.no_grad()
def video_scores(model, example, how: str, video_unit: str) -> list[Tensor]:
    """Per unit (samples, videos, frames in order): each token's score ('cls' or 'received'), its frame's
    per-patch scores pooled by the model's own vision_resampler."""
    out = []
    for video in example.pixel_values_videos:
        per_patch = RN.crop_signals(model, video)[how]                    # (frames, patches)
        pooled = model.model.vision_resampler(per_patch[..., None])[..., 0]     # (frames, tokens)
        out += list(pooled) if video_unit == "frame" else [pooled.reshape(-1)]
    return out


def picks(model, example, keep: int, how: str, seed: int = 0, video_unit: str = "frame") -> list[list[Tensor]]:
    """Per sample, per unit: the kept token indices (ascending); how 'cls', 'received' or 'random' (as
    reference_vision_llava_next.picks: the top-k of torch.rand((units, 1, tokens), manual_seed(seed)))."""
    if how == "random":
        return RN.picks(model, example, keep, how, seed, video_unit)
    n = len(RN.units(model, example, video_unit)[0])
    chosen = [score.topk(keep).indices.sort().values for score in video_scores(model, example, how, video_unit)]
    return [chosen[i * n:(i + 1) * n] for i in range(len(chosen) // n)]
