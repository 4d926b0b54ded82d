"""LLaVA-NeXT: anyres crops (a base view + a grid of high-resolution crops per image, unpadded to the
image's aspect ratio) and a learned image_newline feature closing every row of the crop grid.

The processor writes one `<image>` placeholder per feature, newlines included, so an image's
placeholder block is [base view][row 0 ... newline][row 1 ... newline]...; the newline slots are
separators (never dropped, never counted in `keep`). Which slots they are comes from the model's
own pack_image_features run on marker features, so the layout follows the model's code exactly.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from graphprune.errors import InputError, PassNotApplicable
from graphprune.families.anyres_vision import AnyresImageFeatures, AnyresVisionStage, crop_count, packed_index
from graphprune.families.base import MODALITIES, Family, VisionLayout, blocks_layout, check_video_unit


@dataclass(frozen=True)
class AnyresPacking:
    """The shape bucket of an anyres image: what its captured vision stage depends on. The crop grid (rows x
    columns of crops after the base view) and the patch rows x columns unpadding leaves of it fix the crop
    count, the patch behind every token (unpad_image cuts equal margins off one side pair, so the shape fixes
    them) and the newline rows; images of any size packed alike share one bucket. `image_size`, the first
    size seen of this packing, is what the stage is captured and checked with: no part of the key."""
    grid: tuple[int, int]
    unpadded: tuple[int, int]
    image_size: tuple[int, int] = field(compare=False)

    def __str__(self) -> str:
        return (f"crop grid {self.grid[0]} x {self.grid[1]} unpadded to {self.unpadded[0]} x {self.unpadded[1]} "
                f"patches, first seen at image size {self.image_size}")


class LlavaNextFamily(Family):
    name = "llava_next"
    model_types = ("llava_next",)
    reads_feature_layer = True
    vision_inputs = ("pixel_values", "image_sizes")
    image_feature_inputs = ("image_sizes",)
    eager_vision = "a data-dependent number of anyres crops per image (image_sizes)"
    image_not_grid = "its base view's patch grid followed by its anyres crops' rows"
    # the tower is captured per image packing (AnyresVisionStage: crop count, unpadding and newline rows constant)
    vision_buckets = 8
    # videos (LLaVA-OneVision, LLaVA-NeXT-Video): each pooled token's patches (video_token_patches), pooled
    # before the projector or after it
    video_pooled_before_projector = False

    # -- the vision stage, per bucket: an image packing (AnyresPacking), or ("video", frames a unit) ------
    def vision_module(self, through_last: bool = False, bucket=None):
        if bucket is None or self.is_body():
            return None
        if through_last:
            raise PassNotApplicable(f"{self.model_class}: a vision-stage pass reading the vision tower's last "
                                    "layer past the feature layer is not supported on anyres images")
        image = self.image_bucket(bucket)
        return AnyresVisionStage(self, None, crops=bucket[1]) if image is None else AnyresVisionStage(self, image.image_size)

    def vision_eager_module(self, bucket):
        image = self.image_bucket(bucket)
        return AnyresImageFeatures(self, None if image is None else image.image_size)

    def vision_example(self, bucket, images: int):
        vc = self.config().vision_config
        param = next(self.body().vision_tower.parameters())
        image = self.image_bucket(bucket)
        crops = bucket[1] if image is None else crop_count(self, image.image_size)
        return torch.zeros(images, crops, vc.num_channels, vc.image_size, vc.image_size,
                           device=param.device, dtype=param.dtype)

    def bucket_name(self, bucket) -> str:
        image = self.image_bucket(bucket)
        return f"video units of {bucket[1]} frame(s)" if image is None else f"images packed as {image}"

    def image_bucket(self, bucket) -> AnyresPacking | None:
        """An image bucket as its packing (an image size (H, W) stands for its own); None for a video bucket."""
        if isinstance(bucket, AnyresPacking):
            return bucket
        return None if bucket[0] == "video" else self.image_packing(bucket)

    def modeling_module(self):
        """The transformers modeling module of the model (its anyres helper functions live there)."""
        return sys.modules[type(self.body()).__module__]

    def image_packing(self, image_size) -> AnyresPacking:
        """The bucket of an image of image_size (H, W): its crop grid and unpadded patch grid, by the model's
        own get_anyres_image_grid_shape and unpad_image (on an empty tensor of the crops' patch grid)."""
        module, cfg = self.modeling_module(), self.config()
        size = [int(s) for s in image_size]
        grid = module.get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        unpadded = module.unpad_image(torch.empty(0, grid[0] * side, grid[1] * side), size).shape[1:]
        return AnyresPacking(tuple(int(g) for g in grid), tuple(int(u) for u in unpadded), tuple(size))

    def vision_bucket(self, rows: int, cols: int) -> AnyresPacking:
        """The prune-time probe bucket (an anyres image is no rows x cols grid): the largest crop grid's
        resolution whose packing is a gather (LLaVA-OneVision interpolates the largest ones)."""
        for size in sorted(self.config().image_grid_pinpoints, key=lambda hw: -hw[0] * hw[1]):
            try:
                packed_index(self, size)
            except InputError:
                continue
            return self.image_packing(size)
        raise PassNotApplicable(f"{self.model_class}: every crop grid of image_grid_pinpoints is packed by "
                                "interpolation, so no image's feature tokens are encoder patches a vision-stage pass "
                                "could score; use a feature-level or an LLM-stage pass")

    def vision_stage_inputs(self, layout: VisionLayout, video_unit: str = "frame", image_sizes=None,
                            pixel_values=None, pixel_values_videos=None, **inputs):
        """Each unit's crops: an image's (pixel_values less the processor's padding crops), all of one image size
        (the bucket: its packing, image_packing); or a video frame (bucket ("video", 1)) or whole video (("video", frames)), one frame a crop."""
        kinds = {unit.split()[0] for unit in layout.units}
        if len(kinds) != 1:
            raise InputError(f"{self.model_class}: a vision-stage pass runs one encoder graph per call, and the "
                             f"prompt holds images and videos ({list(layout.units)}); prune them in separate prompts")
        b = layout.pos.shape[0]
        if kinds == {"video"}:
            per = pixel_values_videos.shape[0] // b
            frames = 1 if video_unit == "frame" else pixel_values_videos.shape[1]
            rows = []
            for i in range(b):
                for unit in layout.units:
                    words = unit.split()
                    video = pixel_values_videos[i * per + int(words[1])]
                    rows.append(video[int(words[3]):int(words[3]) + 1] if video_unit == "frame" else video)
            return ("video", frames), torch.stack(rows)
        sizes = sorted({tuple(int(s) for s in size) for size in image_sizes.tolist()})
        packings = {self.image_packing(size) for size in sizes}     # sizes packed alike share one graph
        if len(packings) != 1:
            raise InputError(f"images of sizes {sizes} pack differently ({'; '.join(sorted(map(str, packings)))}): a "
                             "vision-stage pass runs one encoder graph per call, so a prompt's images (and a batch's) "
                             "must share one packing (crop grid and unpadded patch grid); resize them to one size")
        packing = packings.pop()
        crops = crop_count(self, packing.image_size)
        per = image_sizes.shape[0] // b
        rows = [pixel_values[i * per + int(unit.split()[1]), :crops] for i in range(b) for unit in layout.units]
        return packing, torch.stack(rows)

    def separator_embeds(self, embeds, input_ids, separators):
        """The image_newline rows at an image's newline slots (separators holding the image token)."""
        at = separators & (input_ids == self.image_token_id())
        return torch.where(at[..., None], self.body().image_newline.to(embeds.dtype), embeds)

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
        crops = self.modeling_module().image_size_to_num_patches(
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
