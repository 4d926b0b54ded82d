"""DyCoke's temporal token merging (TTM): Tao et al., "DyCoke: Dynamic Compression of Tokens for
Fast Video Large Language Models", CVPR 2025 (arXiv 2411.15024), its first stage.

A video's frames are taken in windows of K = 4 consecutive frames (4w, 4w+1, 4w+2, 4w+3; the last
window may be shorter). In each window
  anchor     frame 4w is kept whole;
  reference  frame 4w+1 is compared with 4w, frame 4w+3 with 4w+2 (adjacent pairs), and frame 4w+2
             with the anchor 4w (the second comparison the paper makes inside a window); a frame is
             compared with its reference frame as encoded, before either is pruned;
  similarity each token's cosine similarity to the token at the same (row, col) of its reference frame,
             on the LLM input embeddings (the projected / merged vision features);
  selection  every compared frame keeps its int((1 - rate) * N) tokens least similar to the reference
             (N tokens per frame; ties go to the earlier token, a stable ascending sort): a token
             much like the one before it is redundant, the reference frame carries it.
So a video of T frames keeps N * ceil(T / 4) + int((1 - rate) * N) * (T - ceil(T / 4)) tokens, a count
known from the shapes before the language model runs. Kept tokens keep their order and their
original (Qwen: 3-D M-RoPE) positions; images in the prompt are not units and stay whole. Units are
whole videos (video_unit="video", the default with this pass), at LLM layer 0 like evs.

DyCoke's second stage (pruning the KV cache anew at each decoding step by the last token's
attention) changes the cache per step and is not built. Departures from the authors' released code
(KD-TAO/DyCoke, `dycole_ttm`), where this pass follows the paper's window rule: the code prunes
frame 2i+1 with the similarity of the *previous* pair (its `similarities[(i - 2) // 2]`, the last
pair's for the first one); skips the anchor comparison in the last window (its loop stops at T - 4);
drops the last frame of a video with an odd T; and emits a pruned frame's tokens in ascending
similarity rather than in raster order, renumbering positions contiguously. docs/methods.md.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from graphprune import tokenops
from graphprune.errors import InputError, PassConfigError
from graphprune.rewrite.pass_api import Choose, Frames, InputEmbeds, Plan, TokenPass
from graphprune.rewrite.registry import register_pass

WINDOW = 4          # K, the paper's window of frames


def reference_frames(frames: int) -> list[int]:
    """For each frame of a video, the frame it is compared with (itself: an anchor, kept whole)."""
    return [f - 1 if f % WINDOW in (1, 3) else f - 2 if f % WINDOW == 2 else f for f in range(frames)]


def video_shape(tokens: int, frames) -> int:
    """The one frame count of a prompt's video units (tokens each); a batch's videos must agree."""
    counts = set(frames.flatten().tolist())
    if len(counts) != 1 or tokens % int(next(iter(counts))):
        raise InputError(f"dycoke: videos of {tokens} tokens over {sorted(counts)} frames; a batch's videos must "
                         "have one frame count and grid (dycoke keeps a fixed count per frame)")
    return int(counts.pop())


def dycoke_keep(*, k, protected, valid, vision_pos, embeds, frames, rate):
    """picked (B, videos, count): every anchor frame whole, and each other frame's tokens least
    like the same patch of its reference frame."""
    b, n, v, d = embeds.shape
    t = video_shape(v, frames)
    per_frame = v // t
    kept = int((1 - rate) * per_frame)
    x = embeds.view(b, n, t, per_frame, d)
    refs = torch.tensor(reference_frames(t), device=embeds.device)
    similarity = F.cosine_similarity(x, x[:, :, refs], dim=-1)                       # (B, n, T, N)
    anchor = (refs == torch.arange(t, device=embeds.device))[:, None]
    score = tokenops.rank_scores(-similarity.view(b, n, v), protected, valid).view(b, n, t, per_frame)
    score = score.masked_fill(anchor, float("inf"))                                  # anchors stay whole
    order = score.argsort(dim=-1, descending=True, stable=True)
    offset = (torch.arange(t, device=embeds.device) * per_frame)[:, None]
    whole = (order + offset)[:, :, anchor[:, 0]].flatten(2)
    pruned = (order[..., :kept] + offset)[:, :, ~anchor[:, 0]].flatten(2)
    return torch.cat([whole, pruned], dim=-1).sort(-1).values


@register_pass
class DyCoke(TokenPass):
    name = "dycoke"
    stage = "prefill"
    units = "videos"

    @dataclass
    class Config:
        rate: float = 0.7           # P: the share of each compared frame's tokens pruned (the authors' default)

    def validate(self):
        super().validate()
        rate = self.config.rate
        if not 0.0 <= rate < 1.0:
            raise PassConfigError(f"dycoke: rate={rate!r} is the share of each compared frame's tokens pruned; "
                                  "give 0 <= rate < 1 (0 keeps every token)")

    def check_prompt(self, prompt):
        video_shape(prompt.vision_pos.shape[-1], prompt.unit_frames)

    def plan(self) -> Plan:
        return Plan(layer=0, signals={"embeds": InputEmbeds("vision"), "frames": Frames()},
                    select=Choose(None, dycoke_keep, (("rate", self.config.rate),)), positions="keep")
