"""LLaVA-OneVision: LLaVA-NeXT's anyres images (crop grids capped at `vision_aspect_ratio`), plus
video: each frame's patch grid pooled 2x2, all frames of a video in one `<video>` block closed by
one image_newline slot (LlavaOnevisionProcessor: frames x pooled^2 + 1 placeholders)."""
from __future__ import annotations

import torch

from graphprune.compat import onevision_video_features
from graphprune.errors import InputError
from graphprune.families.base import VisionLayout, blocks_layout, check_video_unit
from graphprune.families.llava_next import LlavaNextFamily


class LlavaOnevisionFamily(LlavaNextFamily):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    vision_inputs = ("pixel_values", "image_sizes", "pixel_values_videos")

    def pack_markers(self, body, marker, image_size) -> torch.Tensor:
        packed, _ = body.pack_image_features([marker], image_size[None], image_newline=torch.zeros(1, device=marker.device),
                                             vision_aspect_ratio=self.config().vision_aspect_ratio)
        return packed[0]

    def video_features(self, body, pixel_values_videos, **kw):
        return onevision_video_features(body, pixel_values_videos, **kw)

    def vision_layout(self, input_ids, video_unit: str = "frame", **inputs) -> VisionLayout | None:
        check_video_unit(video_unit)
        is_video = input_ids == self.video_token_id()
        images = super().vision_layout(input_ids, **inputs) if bool((input_ids == self.image_token_id()).any()) else None
        if not bool(is_video.any()):
            return images
        videos = inputs.get("pixel_values_videos")
        b = input_ids.shape[0]
        if videos is None or videos.shape[0] % b:
            raise InputError(f"the prompt has video tokens but pixel_values_videos is "
                             f"{None if videos is None else tuple(videos.shape)}: give each of the {b} samples as many videos")
        per, frames = videos.shape[0] // b, videos.shape[1]
        separators = torch.zeros_like(is_video) if images is None else images.separators.clone()
        per_sample = []
        for i, row in enumerate(is_video):
            at = row.nonzero()[:, 0]
            if at.numel() % per or (at.numel() // per - 1) % frames:
                raise InputError(f"sample {i}: {at.numel()} video tokens do not make {per} video(s) of {frames} "
                                 "frames x pooled patches + 1 newline")
            blocks = []
            for j, blk in enumerate(at.reshape(per, -1)):
                separators[i, blk[-1]] = True            # the newline closing the video
                if video_unit == "frame":
                    blocks += [(f"video {j} frame {f}", fr) for f, fr in enumerate(blk[:-1].chunk(frames))]
                else:
                    blocks.append((f"video {j}", blk[:-1]))
            if images is not None:
                blocks += [(name, pos) for name, pos in zip(images.units, images.pos[i])]
            per_sample.append(blocks)
        return blocks_layout(per_sample, separators)
