"""Independent references for the vision-stage cells tests/test_vision_coverage.py fills (docs/vision_stage_matrix.md).
Nothing here imports graphprune; the per-token signals and the pruned-prompt runs come from the family references:

* anyres images / OneVision videos (LLaVA-NeXT, LLaVA-OneVision): reference_vision_llava_next (each crop's feature
  layer by hand, laid in prompt order by the model's own pack_image_features; units with newline slots left out);
* Qwen2.5-VL / Qwen3-VL: reference_vision_qwen (the encoder's last block by hand per attention segment; units: an
  image, a video's frames), reference_vision_qwen_methods.vispruner_choice (VisPruner's rule on one unit).

Written here:
* vision_topk(score="norm"): a unit's tokens ranked by the L2 norm of their LLM-space features, the projector's
  output (reference_families.family_inputs: the model's own get_image_features / get_video_features at the
  placeholders); the top `keep` of each unit are kept, every token keeps its slot and position.
* VisPruner on anyres images: per image, vispruner_choice on the image's tokens in prompt order, importance the
  head-averaged CLS attention of the feature layer (LLaVA-NeXT's CLIP) or the attention each token receives there
  (SigLIP, no CLS), diversity on the feature layer's output (what enters the projector).
"""
from __future__ import annotations

import reference_vision_llava_next as RN
import reference_vision_qwen as RQ
import torch
from reference_families import family_inputs
from reference_vision_qwen_methods import vispruner_choice
from torch import Tensor


@torch.no_grad()
def norm_picks_anyres(model, example, keep: int, video_unit: str = "frame") -> list[list[Tensor]]:
    """Per sample, per unit (image, video frame or video): the local indices (ascending) of its `keep` tokens of
    largest projected-feature norm."""
    emb = family_inputs(model, example)[0]
    return [[emb[i, blk].norm(dim=-1).topk(keep).indices.sort().values for blk in row]
            for i, row in enumerate(RN.units(model, example, video_unit))]


@torch.no_grad()
def norm_kept_qwen(model, example, keep: int) -> Tensor:
    """(B, S') prompt indices kept by vision_topk(score='norm') on a Qwen prompt (units: images, video frames)."""
    emb = family_inputs(model, example)[0]
    picks = [[emb[i, blk].norm(dim=-1).topk(keep).indices for blk in row]
             for i, row in enumerate(RQ.units(model, example))]
    return RQ.keep_index(model, example, picks)


@torch.no_grad()
def vispruner_anyres(model, example, keep: int, important_ratio: float, importance: str) -> list[list[Tensor]]:
    """Per sample, per anyres image: VisPruner's kept local indices (ascending); importance 'cls' or 'received'."""
    tokens = iter(RN.image_tokens(model, example))
    out = []
    for row in RN.units(model, example):
        picks = []
        for _ in row:
            tok = next(tokens)
            picks.append(vispruner_choice(tok[importance], tok["hidden"], keep, important_ratio))
        out.append(picks)
    return out
