"""Qwen2-VL: ViT without CLS, 2x2 patch merger, Qwen2 LM with 3-D M-RoPE; images and video.

The processor writes `<|vision_start|> <|image_pad|> x (t*h*w / merge^2) <|vision_end|>` per image
and the same with `<|video_pad|>` per video (all its frames in one block); image_grid_thw /
video_grid_thw give each one's (t, h, w) patch grid, in prompt order per modality.
"""
from __future__ import annotations

import torch

from graphprune.compat import qwen2vl_rope_index
from graphprune.errors import InputError, PassNotApplicable
from graphprune.families.base import MODALITIES, Family, VisionLayout, blocks_layout, check_video_unit, runs_of
from graphprune.families.qwen_vision import QwenImageFeatures, QwenVisionStage


class Qwen2VLFamily(Family):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    position_axes = 3
    vision_has_cls = False
    vision_inputs = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "mm_token_type_ids")
    image_feature_inputs = ("image_grid_thw",)
    video_feature_inputs = ("video_grid_thw",)
    eager_vision = "data-dependent patch grid (grid_thw)"
    # the encoder is captured per patch grid (h, w) of one image or video frame (QwenVisionStage)
    vision_buckets = 8
    separator_tokens = ("vision_start_token_id", "vision_end_token_id")

    # -- the vision stage, per bucket: a patch grid (h, w) of an image or video frame, or ("video", frames, h, w)
    # for whole videos (video_unit="video"), each frame its own encoder sequence -------------------------------
    def vision_module(self, through_last: bool = False, bucket=None):
        if bucket is None or self.is_body():
            return None
        if through_last:        # the merger reads the last block: no layer lies past the feature layer
            raise PassNotApplicable(f"{self.model_class}: its features come from the vision encoder's last block; "
                                    "no signal reads a layer past it")
        frames, h, w = _frames_and_grid(bucket)
        return QwenVisionStage(self.body().visual, h, w, frames)

    def vision_eager_module(self, bucket):
        frames, h, w = _frames_and_grid(bucket)
        return QwenImageFeatures(self.body(), h, w, frames)

    def vision_example(self, bucket, images: int):
        vc = self.config().vision_config
        frames, h, w = _frames_and_grid(bucket)
        shape = (images, (frames or 1) * h * w, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2)
        param = next(self.body().visual.parameters())
        return torch.zeros(shape, device=param.device, dtype=param.dtype)

    def vision_bucket(self, rows: int, cols: int) -> tuple[int, int]:
        """The patch grid (h, w) of an image of rows x cols LLM tokens."""
        return rows * self.merge(), cols * self.merge()

    def bucket_name(self, bucket) -> str:
        frames, h, w = _frames_and_grid(bucket)
        return f"patch grid {(h, w)}" if frames is None else f"whole videos of {frames} frame(s) of patch grid {(h, w)}"

    def vision_stage_inputs(self, layout: VisionLayout, video_unit: str = "frame", image_grid_thw=None,
                            video_grid_thw=None, **inputs):
        """Each unit's patch rows: an image's, or a video frame's (temporal patch: the model encodes each
        on its own), all of one grid (h, w): the bucket. video_unit="video": each whole video's frames
        (bucket ("video", frames, h, w)), every unit a video of one shape."""
        kinds = {unit.split()[0] for unit in layout.units}
        whole = video_unit == "video" and "video" in kinds
        if whole and kinds != {"video"}:
            raise InputError(f"{self.model_class}: a vision-stage pass over whole videos (video_unit='video') runs "
                             f"one encoder graph of the videos' frames per call, and the prompt also holds images "
                             f"({list(layout.units)}); prune them in separate prompts, or use video_unit='frame'")
        b = layout.pos.shape[0]
        sources = {"image": (image_grid_thw, inputs.get("pixel_values")),
                   "video": (video_grid_thw, inputs.get("pixel_values_videos"))}
        rows, buckets = [], set()
        for i in range(b):
            for unit in layout.units:
                kind, j = unit.split()[0], int(unit.split()[1])
                grid, pixels = sources[kind]
                per = grid.shape[0] // b
                start = int(grid[:i * per + j].prod(-1).sum())
                t, h, w = grid[i * per + j].tolist()
                if whole:               # the video's every frame (temporal patch), in order
                    buckets.add(("video", t, h, w))
                    rows.append(pixels[start:start + t * h * w])
                    continue
                frame = int(unit.split()[3]) if kind == "video" else 0
                buckets.add((h, w))
                rows.append(pixels[start + frame * h * w:start + (frame + 1) * h * w])
        if len(buckets) != 1 and whole:
            raise InputError(f"whole videos of (frames, h, w) grids {sorted(bucket[1:] for bucket in buckets)}: a "
                             "vision-stage pass runs one encoder graph per call, so with video_unit='video' a prompt's "
                             "videos (and a batch's) must share one frame count and grid; use video_unit='frame'")
        if len(buckets) != 1:
            raise InputError(f"vision units of patch grids {sorted(buckets)}: a vision-stage pass runs one encoder "
                             "graph per call, so a prompt's images and video frames must share one (h, w) grid")
        return buckets.pop(), torch.stack(rows)

    def merge(self) -> int:
        return self.config().vision_config.spatial_merge_size

    def token_types(self, input_ids) -> torch.Tensor:
        """mm_token_type_ids as the processor writes them: text 0, image 1, video 2."""
        types = (input_ids == self.image_token_id()).int()
        return types.masked_fill(input_ids == self.video_token_id(), 2)

    def positions(self, input_ids, attention_mask, image_grid_thw=None, video_grid_thw=None,
                  mm_token_type_ids=None, **inputs):
        if image_grid_thw is None and video_grid_thw is None:
            pos = super().positions(input_ids, attention_mask)
            return pos[None].expand(3, -1, -1).contiguous()
        if mm_token_type_ids is None:
            mm_token_type_ids = self.token_types(input_ids)
        return qwen2vl_rope_index(self.model, input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw,
                                  video_grid_thw=video_grid_thw, attention_mask=attention_mask,
                                  second_per_grid_ts=inputs.get("second_per_grid_ts"))

    def vision_layout(self, input_ids, video_unit: str = "frame", modalities=MODALITIES, image_grid_thw=None,
                      video_grid_thw=None, **inputs) -> VisionLayout | None:
        """One unit per image; per video frame (temporal patch), or per video with video_unit="video"
        (its frames: the temporal patches)."""
        check_video_unit(video_unit)
        b = input_ids.shape[0]
        kinds = [("image", self.image_token_id(), image_grid_thw, "pixel_values"),
                 ("video", self.video_token_id(), video_grid_thw, "pixel_values_videos")]
        per_sample = [[] for _ in range(b)]
        for kind, token, grid, pixels in kinds:
            present = input_ids == token
            if not bool(present.any()):
                continue
            if grid is None or inputs.get(pixels) is None:
                raise InputError(f"the prompt has {kind} tokens but no {pixels} / {kind}_grid_thw were given")
            if grid.shape[0] % b:
                raise InputError(f"{grid.shape[0]} {kind}s ({kind}_grid_thw rows) for {b} samples: give each "
                                 f"sample as many {kind}s")
            per = grid.shape[0] // b
            for i, row in enumerate(present):
                at = row.nonzero()[:, 0]
                thw = grid[i * per:(i + 1) * per]
                sizes = (thw.prod(-1) // self.merge() ** 2).tolist()
                if sum(sizes) != at.numel():
                    raise InputError(f"sample {i}: {at.numel()} {kind} tokens but {kind}_grid_thw {thw.tolist()} "
                                     f"makes {sum(sizes)}")
                for j, (blk, (t, _, _)) in enumerate(zip(at.split(sizes), thw.tolist())):
                    if kind == "video" and video_unit == "frame":
                        per_sample[i] += [(f"video {j} frame {f}", fr) for f, fr in enumerate(blk.chunk(t))]
                    else:
                        per_sample[i].append((f"{kind} {j}", blk, t))
        return blocks_layout(per_sample, self.separators(input_ids), modalities)

    def _frame_videos(self, sample: int, pos: torch.Tensor, closing: torch.Tensor,
                      positions: torch.Tensor | None) -> list[tuple]:
        """The torch.compile backend's video frames: no grid reaches the decoder frame, but its M-RoPE
        position ids do, and every frame of a video repeats the same (height, width) positions (the
        temporal axis alone moves), so a video (one run of placeholders) holds as many frames as
        times its first token's (height, width) recurs."""
        if positions is None:
            raise InputError(f"{self.name}: the decoder frame gave no position ids to tell video frames apart")
        positions = positions[-2:]                       # (height, width) of each prompt token
        blocks = []
        for j, video in enumerate(runs_of(pos)):
            grid = positions[:, video]
            frames = int((grid == grid[:, :1]).all(0).sum())
            chunks = video.chunk(frames)
            size = chunks[0].numel()
            if video.numel() != frames * size or any(not torch.equal(positions[:, c], grid[:, :size]) for c in chunks):
                raise InputError(f"sample {sample}: video {j}'s {video.numel()} position ids do not repeat one "
                                 f"(height, width) grid per frame")
            blocks += [(f"video {j} frame {f}", fr) for f, fr in enumerate(chunks)]
        return blocks

    def grid_free(self, layout, image_grid_thw=None, video_grid_thw=None, **inputs) -> str:
        """Also each image's / frame's merged grid (grid_thw) must be square."""
        why = super().grid_free(layout)
        kinds = {unit.split()[0] for unit in layout.units}
        m, b = self.merge(), layout.pos.shape[0]
        for kind, grid in (("image", image_grid_thw), ("video", video_grid_thw)):
            if kind not in kinds or grid is None or why:
                continue
            for j, (_, h, w) in enumerate(grid[:grid.shape[0] // b].tolist()):
                if h != w:
                    why = f"{self.model_class}'s {kind} {j} is a {h // m} x {w // m} token grid, not a square one"
                    break
        return why

    def image_token_counts(self, pixel_values, image_grid_thw=None):
        vc = self.model.config.vision_config
        grid = image_grid_thw
        if not isinstance(grid, torch.Tensor) or grid.dim() != 2 or grid.shape[1] != 3 \
                or grid.dtype.is_floating_point or bool((grid < 1).any()):
            raise InputError("Qwen2-VL images need image_grid_thw, an int tensor (images, 3) of positive "
                             f"(t, h, w) patch counts as the processor returns it; got {grid!r}")
        m = vc.spatial_merge_size
        if bool((grid[:, 1:] % m != 0).any()):
            raise InputError(f"image_grid_thw {grid.tolist()}: h and w must be multiples of the {m}x{m} patch merge")
        patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        rows = int(grid.prod(-1).sum())
        if tuple(pixel_values.shape) != (rows, patch):
            raise InputError(f"pixel_values of shape {tuple(pixel_values.shape)}: image_grid_thw {grid.tolist()} "
                             f"needs ({rows}, {patch}) flattened patches, as the processor returns them")
        return (grid.prod(-1) // m ** 2).tolist()


def _frames_and_grid(bucket) -> tuple[int | None, int, int]:
    """(frames, h, w) of a Qwen vision bucket: frames None for an image or video frame's grid (h, w), else the
    frame count of a whole-video bucket ("video", frames, h, w)."""
    return (None, *bucket) if bucket[0] != "video" else tuple(bucket[1:])
