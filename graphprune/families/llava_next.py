"""LLaVA-NeXT: anyres crops (a base view + a grid of high-resolution crops per image, unpadded to the
image's aspect ratio) and a learned image_newline feature closing every row of the crop grid.

The processor writes one `<image>` placeholder per feature, newlines included, so an image's
placeholder block is [base view][row 0 ... newline][row 1 ... newline]...; the newline slots are
separators (never dropped, never counted in `keep`). Which slots they are comes from the model's
own pack_image_features run on marker features, so the layout follows the model's code exactly.
"""
from __future__ import annotations

import sys

import torch

from graphprune.errors import InputError
from graphprune.families.base import Family, VisionLayout, blocks_layout, check_video_unit


class LlavaNextFamily(Family):
    name = "llava_next"
    model_types = ("llava_next",)
    vision_inputs = ("pixel_values", "image_sizes")
    image_feature_inputs = ("image_sizes",)
    eager_vision = "a data-dependent number of anyres crops per image (image_sizes)"
    compile_refused = ("the torch.compile backend sees only the image-token mask, which does not tell the "
                       "image_newline slots (never pruned) from the patches")

    video_newline = 0         # image_newline slots closing each video block (OneVision: 1)

    def vision_layout(self, input_ids, video_unit: str = "frame", **inputs) -> VisionLayout | None:
        """Images (the anyres layout below), then videos: each video's `<video>` block holds its frames'
        pooled patches in order, then `video_newline` newline slots; a unit is a frame, or the video."""
        check_video_unit(video_unit)
        images = self.image_layout(input_ids, **inputs)
        token = self.video_token_id()
        is_video = input_ids == token if token is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        if not bool(is_video.any()):
            return images
        videos = inputs.get("pixel_values_videos")
        b = input_ids.shape[0]
        if videos is None or videos.shape[0] % b:
            raise InputError(f"the prompt has video tokens but pixel_values_videos is "
                             f"{None if videos is None else tuple(videos.shape)}: give each of the {b} samples as many videos")
        per, frames, closing = videos.shape[0] // b, videos.shape[1], self.video_newline
        separators = torch.zeros_like(is_video) if images is None else images.separators.clone()
        per_sample = []
        for i, row in enumerate(is_video):
            at = row.nonzero()[:, 0]
            if at.numel() % per or (at.numel() // per - closing) % frames:
                raise InputError(f"sample {i}: {at.numel()} video tokens do not make {per} video(s) of {frames} "
                                 f"frames x pooled patches{f' + {closing} newline' if closing else ''}")
            blocks = []
            for j, blk in enumerate(at.reshape(per, -1)):
                patches = blk[:blk.numel() - closing]
                separators[i, blk[patches.numel():]] = True            # the newline closing the video
                if video_unit == "frame":
                    blocks += [(f"video {j} frame {f}", fr) for f, fr in enumerate(patches.chunk(frames))]
                else:
                    blocks.append((f"video {j}", patches))
            if images is not None:
                blocks += [(name, pos) for name, pos in zip(images.units, images.pos[i])]
            per_sample.append(blocks)
        return blocks_layout(per_sample, separators)

    def image_layout(self, input_ids, image_sizes=None, **inputs) -> VisionLayout | None:
        found = self.sized_images(input_ids, image_sizes, inputs.get("pixel_values"))
        if found is None:
            return None
        is_image, per = found
        separators = torch.zeros_like(is_image)
        per_sample = []
        for i, row in enumerate(is_image):
            at = row.nonzero()[:, 0]
            newline = [self.newline_slots(size) for size in image_sizes[i * per:(i + 1) * per]]
            if sum(m.numel() for m in newline) != at.numel():
                raise InputError(f"sample {i}: {at.numel()} image tokens but image_sizes "
                                 f"{image_sizes[i * per:(i + 1) * per].tolist()} make {sum(m.numel() for m in newline)}")
            blocks = at.split([m.numel() for m in newline])
            separators[i, at[torch.cat(newline)]] = True
            per_sample.append([(f"image {j}", blk[~m]) for j, (blk, m) in enumerate(zip(blocks, newline))])
        return blocks_layout(per_sample, separators)

    def newline_slots(self, image_size: torch.Tensor) -> torch.Tensor:
        """(placeholders,) bool: which of an image's placeholder slots hold image_newline."""
        body, cfg = self.body(), self.config()
        vc = cfg.vision_config
        side = vc.image_size // vc.patch_size
        crops = sys.modules[type(body).__module__].image_size_to_num_patches(
            image_size=image_size, grid_pinpoints=cfg.image_grid_pinpoints, patch_size=vc.image_size)
        packed = self.pack_markers(body, torch.ones(crops, side * side, 1), image_size)
        return packed[:, 0] == 0

    def pack_markers(self, body, marker, image_size) -> torch.Tensor:
        """The model's pack_image_features on marker features, image_newline 0."""
        packed, _ = body.pack_image_features([marker], image_size[None], self.config().vision_feature_select_strategy,
                                             image_newline=torch.zeros(1))
        return packed[0]
