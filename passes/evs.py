"""EVS: Efficient Video Sampling, video token pruning as vLLM serves it (`--video-pruning-rate`,
vllm/multimodal/evs.py: compute_retained_tokens_count, compute_retention_mask).

Per video of T frames, each an h x w grid of LLM tokens (after the spatial merge or pooling):
  score      each token's dissimilarity 1 - cos(e, e') between its LLM input embedding e and the
             embedding e' of the token at the same (row, col) of the previous frame
             (torch.nn.functional.cosine_similarity, in the embeddings' dtype); every token of the
             first frame scores 255, above any dissimilarity (at most 2), so the first frame stays whole;
  count      max(h*w, int(T*h*w * (1 - rate))) tokens per video: int() truncates the float product,
             and at least the first frame fits; the count depends on the shapes only, so it is known
             before the LLM runs;
  selection  the top `count` tokens by score over the whole video; ties go to the earlier token (a
             stable descending sort, as vLLM's argsort(descending=True, stable=True));
  positions  kept tokens keep their original (Qwen: 3-D M-RoPE) positions.
Qwen2-VL / Qwen2.5-VL frames are the temporal patches (video_grid_thw's t), LLaVA-OneVision's the
sampled frames (pooled grids). Where it runs: at layer=0, on the videos' LLM input embeddings, so
every language-model layer runs on the kept tokens only. A unit is a whole video (prune's
video_unit="video", the default with evs; "frame" is refused, the budget being global over a video);
images in the prompt are not units of evs and stay whole. Departure from vLLM: text after a pruned
video keeps the position Hugging Face's get_rope_index gives it in the unpruned prompt; vLLM's
recompute_mrope_positions continues it from the video's start plus its grid width. docs/methods.md.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from graphprune import tokenops
from graphprune.errors import InputError, PassConfigError
from graphprune.rewrite.pass_api import Choose, Frames, InputEmbeds, Plan, TokenPass
from graphprune.rewrite.registry import register_pass

FIRST_FRAME_SCORE = 255.0      # vLLM's score of every first-frame token: above any 1 - cosine


def retained_count(tokens: int, frames, rate: float) -> int:
    """Tokens EVS keeps of each video unit of `tokens` tokens over `frames` (a tensor of the units'
    frame counts); the units of one prompt must agree (budgets are rectangular)."""
    per_frame = {tokens // int(t) for t in frames.flatten().tolist()}
    counts = {max(f, int(tokens * (1 - rate))) for f in per_frame}
    if any(tokens % int(t) for t in frames.flatten().tolist()) or len(counts) != 1:
        raise InputError(f"evs: videos of {tokens} tokens over {sorted(set(frames.flatten().tolist()))} frames "
                         f"keep {sorted(counts)} tokens each; a batch's videos must keep one count: give them the "
                         "same frames and grid")
    return counts.pop()


def evs_keep(*, k, protected, valid, vision_pos, embeds, frames, rate):
    """picked (B, videos, count): each video's tokens most unlike the same patch one frame earlier."""
    b, n, v, d = embeds.shape
    count = retained_count(v, frames, rate)
    stride = (v // frames)[..., None].to(embeds.device)                     # tokens per frame (B, n, 1)
    index = torch.arange(v, device=embeds.device)
    earlier = (index - stride).clamp(min=0)
    previous = embeds.gather(2, earlier[..., None].expand(b, n, v, d))
    score = 1 - F.cosine_similarity(embeds, previous, dim=-1)
    score = score.masked_fill(index < stride, FIRST_FRAME_SCORE)
    order = tokenops.rank_scores(score, protected, valid).argsort(dim=-1, descending=True, stable=True)
    return order[..., :count].sort(-1).values


@register_pass
class EVS(TokenPass):
    name = "evs"
    stage = "prefill"
    units = "videos"

    @dataclass
    class Config:
        rate: float = 0.75          # q: the share of each video's tokens pruned, 0 <= q < 1 (graphprune's default)

    def validate(self):
        super().validate()
        rate = self.config.rate
        if not 0.0 <= rate < 1.0:
            raise PassConfigError(f"evs: rate={rate!r} is the share of video tokens pruned; give 0 <= rate < 1 "
                                  "(0 keeps every token)")

    def check_prompt(self, prompt):
        b, n, v = prompt.vision_pos.shape
        retained_count(v, prompt.unit_frames, self.config.rate)

    def plan(self) -> Plan:
        return Plan(layer=0, signals={"embeds": InputEmbeds("vision"), "frames": Frames()},
                    select=Choose(None, evs_keep, (("rate", self.config.rate),)), positions="keep")
