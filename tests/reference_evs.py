"""Independent reference for EVS, Efficient Video Sampling as vLLM serves it (vllm/multimodal/evs.py),
written from its rule in plain PyTorch; nothing here imports graphprune.

Per video of T frames of h x w LLM tokens (its embeddings after the merger / pooling, in prompt order):
dissimilarity = 1 - cosine similarity to the same (row, col) token of the previous frame, the first
frame scoring 255; the top max(h*w, int(T*h*w*(1 - q))) by a stable descending sort stay. The language
model then runs on the prompt without the dropped tokens, every token at its original position.

Which placeholders are a video's tokens comes from the processors' layouts: Qwen2-VL / Qwen2.5-VL
write `<|video_pad|>` x t*h*w/merge^2 per video (frames: video_grid_thw's t, temporal patches), Qwen3-VL
the same tokens as t blocks of h*w/merge^2, one per frame, with time stamps and markers between;
LLaVA-OneVision writes `<video>` x frames*pooled^2 + 1 per video, the last slot image_newline (frames:
pixel_values_videos' second dimension); LLaVA-NeXT-Video `<video>` x frames*pooled^2, no closing slot.
"""
from __future__ import annotations

import reference as R
import reference_families as RF
import torch
import torch.nn.functional as F
from torch import Tensor


def retention_mask(video: Tensor, frames: int, rate: float) -> Tensor:
    """(T*h*w,) bool: the tokens EVS keeps of one video's embeddings (T*h*w, D)."""
    x = video.reshape(frames, -1, video.shape[-1])
    per_frame = x.shape[1]
    dissimilarity = torch.cat([torch.full_like(x[:1, :, 0], 255.0), 1 - F.cosine_similarity(x[1:], x[:-1], dim=-1)])
    order = dissimilarity.flatten().argsort(descending=True, stable=True)
    count = max(per_frame, int(frames * per_frame * (1 - rate)))
    mask = torch.zeros(frames * per_frame, dtype=torch.bool)
    mask[order[:count]] = True
    return mask


def ttm_mask(video: Tensor, frames: int, rate: float) -> Tensor:
    """(T*N,) bool: the tokens DyCoke's temporal token merging keeps of one video's embeddings (T*N, D):
    in each window of 4 frames the first stays whole, the second and fourth are compared with the frame
    just before them and the third with the window's first; a compared frame keeps its
    int((1 - rate) N) tokens least cosine-similar to the same token of that frame (stable: ties to the
    earlier token)."""
    x = video.reshape(frames, -1, video.shape[-1])
    per_frame = x.shape[1]
    mask = torch.zeros(frames, per_frame, dtype=torch.bool)
    for f in range(frames):
        step = f % 4
        if step == 0:
            mask[f] = True
            continue
        ref = f - 2 if step == 2 else f - 1
        similarity = F.cosine_similarity(x[f], x[ref], dim=-1)
        mask[f, similarity.argsort(stable=True)[: int((1 - rate) * per_frame)]] = True
    return mask.flatten()


def video_blocks(model, example, b: int) -> list[tuple[Tensor, int]]:
    """Sample b's videos: (prompt positions of the video's tokens, its frame count) each."""
    cfg = model.config
    at = (example.input_ids[b] == cfg.video_token_id).nonzero(as_tuple=True)[0]
    batch = example.input_ids.shape[0]
    if cfg.model_type in ("llava_onevision", "llava_next_video"):
        videos = example.pixel_values_videos.shape[0] // batch
        frames = example.pixel_values_videos.shape[1]
        newline = int(cfg.model_type == "llava_onevision")      # OneVision closes each video with one slot
        return [(blk[:blk.numel() - newline], frames) for blk in at.view(videos, -1)]
    grids = example.video_grid_thw.view(batch, -1, 3)[b]
    sizes = (grids.prod(-1) // cfg.vision_config.spatial_merge_size ** 2).tolist()
    return [(blk, int(t)) for blk, t in zip(at.split(sizes), grids[:, 0].tolist())]


@torch.no_grad()
def evs_inputs(model, example, rate: float, rule=retention_mask):
    """The reduced prompt: (keep (B, S') prompt indices kept, embeds, attention mask, positions) at them;
    `rule`: a video's kept tokens (EVS's retention_mask, or DyCoke's ttm_mask)."""
    emb, am, pos, _ = RF.family_inputs(model, example)
    rows = []
    for b in range(emb.shape[0]):
        kept = torch.ones(emb.shape[1], dtype=torch.bool)
        for at, frames in video_blocks(model, example, b):
            kept[at] = rule(emb[b, at], frames, rate)
        rows.append(kept.nonzero(as_tuple=True)[0])
    keep = torch.stack(rows)
    kept_pos = pos.gather(-1, keep if pos.dim() == 2 else keep[None].expand(pos.shape[0], -1, -1))   # M-RoPE: (3, B, S)
    return keep, emb.gather(1, keep[..., None].expand(-1, -1, emb.shape[-1])), am.gather(1, keep), kept_pos


def evs_generate(model, example, rate: float, max_new_tokens: int = 16, rule=retention_mask) -> dict:
    """reference.lm_generate on the reduced prompt (the decoder run by hand; Qwen3-VL's DeepStack
    features of the kept tokens only); `keep`: prompt indices."""
    keep, emb, am, pos = evs_inputs(model, example, rate, rule)
    deepstack = RF.deepstack(model, example)
    if deepstack is not None:
        deepstack = deepstack.gather(2, keep[None, ..., None].expand(deepstack.shape[0], -1, -1, deepstack.shape[-1]))
    out = R.lm_generate(model, emb, am, pos, max_new_tokens=max_new_tokens, deepstack=deepstack)
    out["keep"] = keep
    return out
