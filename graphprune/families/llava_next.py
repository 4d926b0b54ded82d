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
from graphprune.families.base import MODALITIES, Family, VisionLayout, blocks_layout, check_video_unit


class LlavaNextFamily(Family):
    name = "llava_next"
    model_types = ("llava_next",)
    vision_inputs = ("pixel_values", "image_sizes")
    image_feature_inputs = ("image_sizes",)
    eager_vision = "a data-dependent number of anyres crops per image (image_sizes)"
    image_not_grid = "its base view's patch grid followed by its anyres crops' rows"

    def vision_layout(self, input_ids, video_unit: str = "frame", modalities=MODALITIES,
                      **inputs) -> VisionLayout | None:
        """The anyres images (image_layout), then the videos (Family.with_videos)."""
        check_video_unit(video_unit)
        return self.with_videos(input_ids, self.image_layout(input_ids, **inputs), video_unit,
                                inputs.get("pixel_values_videos"), modalities)

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
        packed = self.pack_markers(body, torch.ones(crops, side * side, 1, device=image_size.device), image_size)
        return packed[:, 0] == 0

    def pack_markers(self, body, marker, image_size) -> torch.Tensor:
        """The model's pack_image_features on marker features, image_newline 0."""
        packed, _ = body.pack_image_features([marker], image_size[None], self.config().vision_feature_select_strategy,
                                             image_newline=torch.zeros(1, device=marker.device))
        return packed[0]

    # -- what the torch.compile backend reads: the merge frame's mask and features --------------
    def feature_separators(self, features: torch.Tensor) -> torch.Tensor:
        """pack_image_features writes every newline row as a copy of the model's image_newline
        parameter (expand + cast, no arithmetic), so the rows equal to it are the newline slots."""
        return (features == self.body().image_newline.to(features.dtype)).all(-1)

    def check_frame_image(self, sample: int, separators: torch.Tensor) -> None:
        """An image's block is its base view (no newline), then rows of one width each closed by a
        newline. A run shaped otherwise, or that also splits into two such blocks (adjacent images),
        is refused: without image_sizes the run cannot say where its images are."""
        if not self._one_image(separators) or any(
                self._one_image(separators[:int(e) + 1]) and self._one_image(separators[int(e) + 1:], tail=True)
                for e in separators.nonzero()[:-1, 0]):
            raise InputError(f"sample {sample}: a run of {separators.numel()} image tokens that is not exactly one "
                             "LLaVA-NeXT image (adjacent images?); the torch.compile backend needs text between "
                             "images, or use graphprune.prune(model, ...), which reads image_sizes")

    def _one_image(self, separators: torch.Tensor, tail: bool = False) -> bool:
        """The slots fit one image block (tail: they start like one, the rest may be more images)."""
        vc = self.config().vision_config
        base = (vc.image_size // vc.patch_size) ** 2        # as newline_slots packs a crop
        if separators.numel() <= base or bool(separators[:base].any()):
            return False
        if tail:
            return True
        ends = separators.nonzero()[:, 0]
        rows = torch.diff(ends, prepend=ends.new_tensor([base - 1]))
        return bool(separators[-1]) and bool((rows == rows[0]).all())
