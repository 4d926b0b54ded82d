"""The Family interface: where a model's parts are and how its inputs are laid out.

`Family` is also the generic default: a Hugging Face `XForConditionalGeneration` that holds a body
(`model.model`) with a vision tower, a projector and a `language_model`, plus an `lm_head`. It
reaches the parts only through the model's own public methods and attributes
(`get_input_embeddings`, `language_model`, `get_image_features`, `get_video_features`,
`get_rope_index`), so a family file declares only what differs: its `model_types`, the processor
inputs it takes, the separator tokens it protects, how many position axes its RoPE has.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from graphprune.compat import feature_selection_kwargs, sliding_window, vlm_body
from graphprune.errors import InputError, UnsupportedModelError

VIDEO_UNITS = ("frame", "video")     # what a video's `keep` counts: each frame, or the whole video
MODALITIES = ("image", "video")      # what vision units a layout may hold


@dataclass
class VisionLayout:
    """Where the vision tokens of a prompt are, from the processor's inputs.

    pos: (B, units, tokens) prompt index of every prunable vision token of each unit (an image, or a
    video frame / a whole video). `keep` budgets count per unit.
    units: what each unit is, e.g. ("image 0", "video 0 frame 1"), the same for every sample.
    separators: (B, S) bool, the tokens of vision blocks that are never dropped nor counted
    (begin/end-of-image markers, image_newline rows, ...).
    frames: (B, units) how many frames each unit holds (T for a whole video, else 1), its tokens
    being the frames' equal token grids in order."""
    pos: torch.Tensor
    units: tuple[str, ...]
    separators: torch.Tensor
    frames: torch.Tensor | None = None


class Family:
    name = "generic"
    model_types: tuple[str, ...] = ()   # config.model_type values read by this family
    position_axes: int = 1              # 3 for M-RoPE (temporal, height, width)
    vision_has_cls: bool = True
    refused: str = ""                   # why models of this family cannot be pruned (checked up front)
    eager_vision: str = "no capturable vision stage declared"     # why vision_module() is None
    # > 0: the vision stage is captured per shape bucket (one patch grid each, vision_stage_inputs),
    # at most this many per pruned model, when a vision-stage pass needs it (else it runs eagerly)
    vision_buckets: int = 0
    compile_refused: str = ""           # why the torch.compile backend cannot prune it (prune() can)
    # dynamo runs the language model's forward eagerly and compiles each decoder layer (and the final
    # norm) as a frame of its own: the backend prunes through those frames (targets/dynamo_layers.py)
    layer_frames: bool = False
    # processor outputs the family consumes besides input_ids / attention_mask
    vision_inputs: tuple[str, ...] = ("pixel_values",)
    video_newline: int = 0              # slots closing each video block (LLaVA-OneVision's image_newline: 1)
    image_pixels_alias: str = ""        # another processor name for pixel_values (Video-LLaVA's pixel_values_images)
    # extra get_image_features / get_video_features arguments, by processor output name
    image_feature_inputs: tuple[str, ...] = ()
    video_feature_inputs: tuple[str, ...] = ()
    # config attributes naming token ids that delimit vision blocks (protected, never counted)
    separator_tokens: tuple[str, ...] = ()
    # the captured prefill takes `attention_groups` (B, S) int64 from attention_groups(): a token of
    # group g >= 0 attends to every token of group g as well as causally (Gemma 3's image blocks,
    # PaliGemma's prefix); -1: causally only
    attention_groups_input: bool = False
    # why an image of this family is not one patch grid in raster order ("": it is one, or tiles of
    # tokens_per_tile() each), for methods that place a unit's tokens on its grid (visiontrim_llm)
    image_not_grid: str = ""
    # get_image_features reads the vision tower's hidden_states[vision_feature_layer] and nothing else of
    # it (vision_tower_read)
    reads_feature_layer: bool = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.model_class = type(model).__name__
        if self.refused:
            raise UnsupportedModelError(self.model_class, f"{self.name} family support", self.refused)

    # -- parts -------------------------------------------------------------------------------
    def body(self) -> nn.Module:
        """The module holding vision tower, projector and language model (`model.model` of an
        XForConditionalGeneration; the model itself when it is that body, as in a compile frame)."""
        return vlm_body(self.model)

    def is_body(self) -> bool:
        return self.body() is self.model

    def language_model(self) -> nn.Module:
        return self._require(getattr(self.body(), "language_model", None), "language model")

    def lm_head(self) -> nn.Module:
        # a body's prefill "logits" output is the final-normed hidden state (what a compile frame returns)
        if self.is_body():
            return nn.Identity()
        return self._require(getattr(self.model, "lm_head", None), "lm_head")

    def vision_module(self, through_last: bool = False, bucket=None) -> nn.Module | None:
        """A module capturing pixel_values -> projected features, for vision-stage passes; None runs
        the vision encoder eagerly through the model's own get_image_features. through_last: it also
        returns the encoder's last hidden state, so the layers past the feature layer stay in the
        captured graph (a pass reads the last layer). bucket: the shape bucket (vision_buckets > 0)."""
        return None

    def vision_tower_read(self) -> tuple[nn.Module, int] | None:
        """The vision tower and how many of its encoder layers the model's own code reads, when its
        features are hidden_states[vision_feature_layer] and nothing else of the tower (the later layers
        feed only what the tower hands back to the caller: last_hidden_state, pooler_output). None: not
        known for this family (the torch.compile backend then runs the tower's frame whole)."""
        read = feature_layers(self.config()) if self.reads_feature_layer else None
        return None if read is None else (self.body().vision_tower, read)

    def vision_eager_module(self, bucket) -> nn.Module | None:
        """The model's own computation of a bucket's features (its get_image_features; bucket None: of a
        vision stage captured once), for checking the capture; None: the captured module itself is that."""
        return None

    def vision_example(self, bucket, images: int) -> torch.Tensor:
        """pixel_values (zeros) of `images` images of a shape bucket, as vision_stage_inputs lays them
        out: the capture example of that bucket."""
        raise NotImplementedError(f"{self.name}: no shape buckets")

    def vision_bucket(self, rows: int, cols: int):
        """The shape bucket of an image of rows x cols feature tokens."""
        raise NotImplementedError(f"{self.name}: no shape buckets")

    def bucket_name(self, bucket) -> str:
        """What a shape bucket is, for messages."""
        return f"patch grid {bucket}"

    def vision_stage_inputs(self, layout: VisionLayout, **inputs) -> tuple[object, torch.Tensor]:
        """(bucket, pixel_values) for the vision stage of a bucketed family: one row per vision unit
        of `layout`, samples in order, each sample's units in layout order."""
        raise NotImplementedError(f"{self.name}: no shape buckets")

    def separator_embeds(self, embeds, input_ids, separators) -> torch.Tensor:
        """embeds (B, S, D) of the token ids, with what a bucketed vision stage leaves out written at the
        vision blocks' separator slots `separators` (B, S) (LLaVA-NeXT's image_newline rows); as they
        are here where separators are tokens of their own (Qwen's vision_start / vision_end)."""
        return embeds

    def config(self):
        return self.model.config

    def text_config(self):
        cfg = self.config()
        return getattr(cfg, "text_config", None) or cfg

    def token_id(self, attr: str) -> int | None:
        cfg = self.config()
        value = getattr(cfg, attr, None)
        if value is None and attr.endswith("_id"):             # older configs: image_token_index
            value = getattr(cfg, attr[:-3] + "_index", None)
        return value

    def image_token_id(self) -> int:
        return self._require(self.token_id("image_token_id"), "image token id (config.image_token_id)")

    def video_token_id(self) -> int | None:
        return self.token_id("video_token_id")

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model().get_input_embeddings()(input_ids)

    # -- inputs ------------------------------------------------------------------------------
    def embed_rows(self) -> int:
        """How many token ids the input embedding has rows for."""
        return self.language_model().get_input_embeddings().num_embeddings

    def image_token_counts(self, pixel_values: torch.Tensor, image_grid_thw=None) -> list[int] | None:
        """How many image tokens each image of pixel_values fills in the prompt (None: this family
        cannot tell); raises InputError when the images have a shape the vision encoder cannot take."""
        return None

    def tokens_per_tile(self) -> int | None:
        """Tokens of one tile, for a family whose images are tiles of patch grids (None: not tiled)."""
        return None

    def grid_free(self, layout: VisionLayout, **inputs) -> str:
        """Why some unit of `layout` is not one square patch grid in raster order, "" when each is:
        grid-based LLM-stage methods (visiontrim_llm's LTAM) refuse such prompts before any work,
        where a token count that happens to be square would silently lay them on a wrong grid."""
        tile = self.tokens_per_tile()
        for unit, frames in zip(layout.units, layout.frames[0].tolist()):
            why = ""
            if frames > 1:
                why = f"{frames} frames' grids one after another (video_unit='video')"
            elif unit.startswith("image") and self.image_not_grid:
                why = self.image_not_grid
            elif tile and layout.pos.shape[-1] > tile:
                why = f"{layout.pos.shape[-1] // tile} tiles' grids one after another"
            if why:
                return f"{self.model_class}'s {unit} is {why}"
        return ""

    def positions(self, input_ids, attention_mask, **inputs) -> torch.Tensor:
        """Position ids as Hugging Face's generate() builds them for left-padded batches."""
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.masked_fill(attention_mask == 0, 0)

    def vision_layout(self, input_ids, video_unit: str = "frame", modalities=MODALITIES,
                      **inputs) -> VisionLayout | None:
        """Images of the prompt: each sample's image placeholders split in prompt order into as many
        equal blocks as it has pixel_values rows (one row per image). `modalities`: the kinds of unit
        laid out (the others stay whole, like text); None when the prompt has none of them."""
        is_image = self.image_mask(input_ids, inputs.get("pixel_values")) if "image" in modalities else None
        if is_image is None:
            return None
        pixel_values = inputs["pixel_values"]
        b = input_ids.shape[0]
        if pixel_values.shape[0] % b:
            raise InputError(f"{pixel_values.shape[0]} images for {b} samples: give each sample as many images")
        images = pixel_values.shape[0] // b
        per_sample = []
        for row in is_image:
            at = row.nonzero()[:, 0]
            if at.numel() % images:
                raise InputError(f"{at.numel()} image tokens do not split into {images} images of one size")
            per_sample.append([(f"image {i}", blk) for i, blk in enumerate(at.reshape(images, -1))])
        return blocks_layout(per_sample, self.separators(input_ids))

    def image_mask(self, input_ids, pixel_values, needs: str = "pixel_values") -> torch.Tensor | None:
        """(B, S) bool image placeholders; None when there are none. Raises when the images are missing."""
        is_image = input_ids == self.image_token_id()
        if not bool(is_image.any()):
            return None
        if pixel_values is None:
            raise InputError(f"the prompt has image tokens but no {needs} were given")
        return is_image

    def frame_layout(self, merges, positions: torch.Tensor | None = None, video_unit: str = "frame",
                     modalities=MODALITIES) -> VisionLayout | None:
        """The prompt's images and videos as the torch.compile backend sees them, from the merges
        dynamo's frames run: (modality, (B, S) placeholder mask, (N, D) features merged there in
        order) each (no processor input reaches those frames), and the decoder frame's own position
        ids `positions` (axes, B, S) where it takes them. Images: each run of consecutive image tokens
        is one image (processors write text between images; check_frame_image refuses a run that is
        not one). Videos: a unit per frame, told by _frame_videos, or per video (video_unit="video").
        Feature rows that are separators (feature_separators) are protected and never counted. Of
        these, the units of `modalities`; None when there are none."""
        per_sample, separators = None, None
        for modality, is_vision, features in merges:
            if not bool(is_vision.any()):
                continue
            at = is_vision.nonzero()                      # row-major: the order masked_scatter fills
            if at.shape[0] != features.shape[0]:
                raise InputError(f"{at.shape[0]} {modality} tokens for {features.shape[0]} {modality} features")
            if per_sample is None:
                per_sample, separators = [[] for _ in is_vision], torch.zeros_like(is_vision)
            rows = self.feature_separators(features)
            if rows is not None:
                separators[at[:, 0], at[:, 1]] = rows
            for i, row in enumerate(is_vision):
                pos = row.nonzero()[:, 0]
                if modality == "video":
                    frames = self._frame_videos(i, pos, separators[i, pos], None if positions is None else positions[:, i])
                    per_sample[i] += frames if video_unit == "frame" else whole_videos(frames)
                    continue
                runs = runs_of(pos)
                for run in runs:
                    self.check_frame_image(i, separators[i, run])
                per_sample[i] += [(f"image {j}", run[~separators[i, run]]) for j, run in enumerate(runs)]
        return None if per_sample is None else blocks_layout(per_sample, separators, modalities)

    def _frame_videos(self, sample: int, pos: torch.Tensor, closing: torch.Tensor,
                      positions: torch.Tensor | None) -> list[tuple]:
        """A sample's video frames from its video slots `pos`: each video closed by a separator row
        (video_newline), else each video one run of consecutive slots, cut into frames of
        frame_video_tokens() tokens."""
        per = self.frame_video_tokens()
        if per is None:
            raise InputError(f"the torch.compile frame shows no video frames for {self.name}: it cannot lay "
                             "out a video; use graphprune.prune(model, ...)")
        if self.video_newline:
            if not bool(closing[-1]):
                raise InputError(f"sample {sample}: its last video is not closed by a separator row")
            videos = pos.tensor_split((closing.nonzero()[:-1, 0] + 1).tolist())
        else:
            videos = runs_of(pos)
        blocks = []
        for j, video in enumerate(videos):
            patches = video[:video.numel() - self.video_newline]
            if patches.numel() == 0 or patches.numel() % per:
                raise InputError(f"sample {sample}: video {j} has {patches.numel()} tokens, not whole frames of {per}")
            blocks += [(f"video {j} frame {f}", fr) for f, fr in enumerate(patches.split(per))]
        return blocks

    def frame_video_tokens(self) -> int | None:
        """Tokens per video frame, where the compile backend can lay a video out from its merge
        frame (videos closed by separator rows, or one run each); None where it cannot."""
        return None

    def feature_separators(self, features: torch.Tensor) -> torch.Tensor | None:
        """(N,) bool: which rows of the merged image features are separators (None: none are)."""
        return None

    def check_frame_image(self, sample: int, separators: torch.Tensor) -> None:
        """Raise InputError unless a run of image tokens (its separator slots given) is exactly one image."""

    def with_videos(self, input_ids, images: VisionLayout | None, video_unit: str, videos,
                    modalities=MODALITIES) -> VisionLayout | None:
        """`images` plus the prompt's videos: each video's placeholder block holds its frames' tokens in
        order (pixel_values_videos: (videos, frames, ...)), then `video_newline` closing slots
        (separators); a unit is a frame, or the whole video. Of these, the units of `modalities`."""
        token = self.video_token_id()
        is_video = input_ids == token if token is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        if not bool(is_video.any()):
            return images if "image" in modalities else None
        b = input_ids.shape[0]
        if videos is None or videos.shape[0] % b:
            raise InputError(f"the prompt has video tokens but pixel_values_videos is "
                             f"{None if videos is None else tuple(videos.shape)}: give each of the {b} samples as many videos")
        per, frames, closing = videos.shape[0] // b, videos.shape[1], self.video_newline
        separators = self.separators(input_ids) if images is None else images.separators.clone()
        per_sample = []
        for i, row in enumerate(is_video):
            at = row.nonzero()[:, 0]
            if at.numel() % per or (at.numel() // per - closing) % frames:
                raise InputError(f"sample {i}: {at.numel()} video tokens do not make {per} video(s) of {frames} "
                                 f"frames x per-frame tokens{f' + {closing} newline' if closing else ''}")
            blocks = [] if images is None else list(zip(images.units, images.pos[i]))
            for j, blk in enumerate(at.reshape(per, -1)):
                patches = blk[:blk.numel() - closing]
                separators[i, blk[patches.numel():]] = True            # the newline closing the video
                if video_unit == "frame":
                    blocks += [(f"video {j} frame {f}", fr) for f, fr in enumerate(patches.chunk(frames))]
                else:
                    blocks.append((f"video {j}", patches, frames))
            per_sample.append(blocks)
        return blocks_layout(per_sample, separators, modalities)

    def tiled_layout(self, input_ids, pixel_values, per_tile: int, joined: int, before: int) -> VisionLayout | None:
        """Images of a family whose pixel_values rows are tiles, every image's tiles in prompt order,
        with no tile count per image given: placeholders at most `joined` positions apart belong to one
        image (1: an image is one unbroken run). Separators: the tokens between an image's placeholders,
        `before` tokens ahead of it and the one closing it (begin, tile and end markers)."""
        is_image = self.image_mask(input_ids, pixel_values)
        if is_image is None:
            return None
        if int(is_image.sum()) != pixel_values.shape[0] * per_tile:
            raise InputError(f"{int(is_image.sum())} image tokens but pixel_values holds {pixel_values.shape[0]} "
                             f"tiles of {per_tile} tokens each")
        per_sample = []
        for row in is_image:
            at = row.nonzero()[:, 0]
            images = runs_of(at, joined)
            per_sample.append([(f"image {j}", image) for j, image in enumerate(images)])
        layout = blocks_layout(per_sample, torch.zeros_like(is_image))
        layout.separators = markers_around(layout.pos, is_image, before=before, after=1)
        return layout

    def sized_images(self, input_ids, image_sizes, pixel_values) -> tuple[torch.Tensor, int] | None:
        """(B, S) image-token mask and images per sample, for families whose processor gives one
        image_sizes row per image; None when the prompt has no image tokens."""
        is_image = self.image_mask(input_ids, None if image_sizes is None else pixel_values,
                                   "pixel_values / image_sizes")
        if is_image is None:
            return None
        b = input_ids.shape[0]
        if image_sizes.shape[0] % b:
            raise InputError(f"{image_sizes.shape[0]} images (image_sizes rows) for {b} samples: give each "
                             "sample as many images")
        return is_image, image_sizes.shape[0] // b

    def separators(self, input_ids) -> torch.Tensor:
        marks = torch.zeros_like(input_ids, dtype=torch.bool)
        for attr in self.separator_tokens:
            tok = self.token_id(attr)
            if tok is not None:
                marks |= input_ids == tok
        return marks

    def merged_embeds(self, input_ids, **inputs) -> torch.Tensor:
        """(B, S, D) prompt embeddings with every vision feature written at its placeholder, as the
        model's forward merges them (features from the model's own get_image_features /
        get_video_features, in prompt order)."""
        return self._merge(input_ids, self._outputs(self.body(), **inputs))

    def merged_inputs(self, input_ids, **inputs) -> dict[str, torch.Tensor]:
        """The prefill graph's inputs from the prompt, by name: inputs_embeds (merged_embeds), and
        whatever else a family's language model reads of the vision features (Qwen3-VL's DeepStack)."""
        return {"inputs_embeds": self.merged_embeds(input_ids, **inputs)}

    def deepstack_layers(self) -> list[nn.Module]:
        """The LM layers whose outputs get vision features added at the vision tokens, in order (the
        prefill then takes them as deepstack_embeds); none but in Qwen3-VL."""
        return []

    def _merge(self, input_ids, outputs) -> torch.Tensor:
        """Token embeddings with each (placeholder token id, get_*_features output) written in."""
        embeds = self.embed(input_ids)
        for token, out in outputs:
            at, feats = input_ids == token, _flat(out)
            if int(at.sum()) != feats.shape[0]:
                raise InputError(f"{int(at.sum())} placeholder tokens (id {token}) for {feats.shape[0]} "
                                 "vision features: the input_ids do not match the pixel inputs")
            embeds = embeds.masked_scatter(at[..., None], feats.to(embeds.dtype))
        return embeds

    def _outputs(self, body, **inputs):
        """(placeholder token id, what get_image_features / get_video_features returned) per modality
        present, images first."""
        out = []
        if inputs.get("pixel_values") is not None:
            kw = self._feature_kwargs(body, "get_image_features", self.image_feature_inputs, inputs)
            out.append((self.image_token_id(), self.image_features(body, inputs["pixel_values"], **kw)))
        if inputs.get("pixel_values_videos") is not None:
            kw = self._feature_kwargs(body, "get_video_features", self.video_feature_inputs, inputs)
            out.append((self.video_token_id(), self.video_features(body, inputs["pixel_values_videos"], **kw)))
        return out

    def _feature_kwargs(self, body, method: str, names, inputs) -> dict:
        kw = {k: inputs[k] for k in names if inputs.get(k) is not None}
        if body is not None:        # None: a runner without the model (graphprune.targets.ort's exports)
            kw.update(feature_selection_kwargs(getattr(body, method), self.config()))
        return kw

    def image_features(self, body, pixel_values, **kw):
        """The features the images' placeholders take, in order (the model's own get_image_features)."""
        return body.get_image_features(pixel_values, **kw)

    def vision_feature_rows(self, **inputs) -> torch.Tensor:
        """(N, D) the features of the processor's vision `inputs` (pixel_values with image_sizes, ...,
        then pixel_values_videos), flattened in placeholder order, as merged_embeds writes them."""
        return torch.cat([_flat(out) for _, out in self._outputs(self.body(), **inputs)])

    def video_features(self, body, pixel_values_videos, **kw):
        """The features a video's placeholders take, in order (the model's own get_video_features)."""
        return body.get_video_features(pixel_values_videos, **kw)

    def attention_groups(self, attention_mask, **inputs) -> torch.Tensor | None:
        """(B, S) int64 bidirectional attention group of each prompt token (-1: causal only), from the
        processor's inputs (`inputs`): the input of a prefill captured with `attention_groups_input`;
        None for a causal LM."""
        return None

    def binding_window(self) -> int | None:
        """The LM's sliding window where it is shorter than the context (it can bind), else None."""
        text = self.text_config()
        window = sliding_window(text)
        if window is not None and window < text.max_position_embeddings:
            return window
        return None

    def check_run_length(self, tokens: int, prunes: bool = True) -> None:
        """Refuse a run of `tokens` sequence slots (padded prompt + generated tokens) that could reach
        the LM's sliding window, when the program prunes (`prunes`) or its prefill builds its own mask
        (`attention_groups_input`, which leaves the window out). Below the window it never binds, so
        pruned slots cannot move it. Past it, a pruned prefill windows over original positions and a
        decode step over cache slots, which pruning has shifted (measured on a LLaVA with a 16-token
        window: a decode step 0.61 from its own prefill's logits). An unpruned program whose prefill
        holds Hugging Face's windowed masks runs as Hugging Face does at any length."""
        window = self.binding_window()
        if window is None or tokens < window or not (prunes or self.attention_groups_input):
            return
        raise InputError(f"this run spans {tokens} tokens (padded prompt + new tokens) and {self.model_class}'s "
                         f"sliding-window layers attend within {window}: a pruned sequence would move that "
                         f"window, so runs must stay under {window} tokens; shorten the prompt or max_new_tokens")

    def _require(self, obj, element: str, hint: str = ""):
        if obj is None:
            raise UnsupportedModelError(self.model_class, element, hint)
        return obj


def _flat(out) -> torch.Tensor:
    """get_*_features output -> (N, D): pooler_output (or the tensor / list of tensors) flattened."""
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, (tuple, list)):
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats], 0)
    return feats.reshape(-1, feats.shape[-1])


def blocks_layout(per_sample: list[list[tuple]], separators: torch.Tensor,
                  modalities=MODALITIES) -> VisionLayout | None:
    """A VisionLayout from each sample's (unit label, prompt positions[, frames]) blocks, put in prompt
    order, of the units whose label starts with one of `modalities` (None: no such unit); every sample
    must have the same units and every unit the same token count."""
    per_sample = [[blk for blk in blocks if blk[0].split()[0] in modalities] for blocks in per_sample]
    if not any(per_sample):
        return None
    counts = [sum(int(blk[1].numel()) for blk in blocks) for blocks in per_sample]
    if len(set(counts)) != 1:
        raise InputError(f"samples carry different numbers of vision tokens {counts}; a batch needs the same "
                         "images (and videos) per sample, of one size, so budgets stay rectangular")
    ordered = [sorted(blocks, key=lambda blk: int(blk[1][0])) for blocks in per_sample]
    units = tuple(blk[0] for blk in ordered[0])
    for i, blocks in enumerate(ordered):
        if tuple(blk[0] for blk in blocks) != units:
            raise InputError(f"sample {i} has vision units {[blk[0] for blk in blocks]}, sample 0 {list(units)}: "
                             "a batch needs the same images and videos, in the same order, per sample")
    sizes = {int(blk[1].numel()) for blocks in ordered for blk in blocks}
    if len(sizes) != 1:
        raise InputError(f"vision units of different token counts {sorted(sizes)} ({', '.join(units)}): keep "
                         "budgets count per unit, so a prompt's images (and video frames) must be of one size")
    pos = torch.stack([torch.stack([blk[1] for blk in blocks]) for blocks in ordered])
    frames = torch.tensor([[blk[2] if len(blk) > 2 else 1 for blk in blocks] for blocks in ordered], device=pos.device)
    return VisionLayout(pos, units, separators, frames)


def whole_videos(frames: list[tuple]) -> list[tuple]:
    """("video j frame f", positions) blocks regrouped as one ("video j", positions, frames) per video."""
    videos: dict[str, list] = {}
    for label, pos in frames:
        videos.setdefault(label.split(" frame ")[0], []).append(pos)
    return [(label, torch.cat(parts), len(parts)) for label, parts in videos.items()]


def runs_of(pos: torch.Tensor, joined: int = 1) -> tuple[torch.Tensor, ...]:
    """Ascending prompt positions split into runs: a position more than `joined` after the previous
    one starts a new run (1: runs of consecutive positions)."""
    return pos.tensor_split(((pos[1:] - pos[:-1] > joined).nonzero()[:, 0] + 1).tolist())


def markers_around(pos: torch.Tensor, is_vision: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """(B, S) bool: the tokens in each unit's span widened by `before` / `after` tokens (first to last
    of its positions) that are not vision tokens: the begin, row / tile and end markers a processor
    writes around and between a unit's placeholders, when the config does not name their ids."""
    index = torch.arange(is_vision.shape[1], device=is_vision.device)
    first, last = pos.amin(-1, keepdim=True), pos.amax(-1, keepdim=True)          # (B, units, 1)
    return ((index >= first - before) & (index <= last + after)).any(1) & ~is_vision


def token_types(attention_mask, token_type_ids) -> torch.Tensor | None:
    """The processor's token_type_ids checked against the prompt's (B, S) (None when not given)."""
    if token_type_ids is None:
        return None
    if not isinstance(token_type_ids, torch.Tensor) or token_type_ids.shape != attention_mask.shape:
        got = tuple(token_type_ids.shape) if isinstance(token_type_ids, torch.Tensor) else type(token_type_ids).__name__
        raise InputError(f"token_type_ids {got} must be a tensor shaped like input_ids {tuple(attention_mask.shape)}, "
                         "as the processor returns it")
    return token_type_ids.to(attention_mask.device)


def check_video_unit(video_unit: str) -> str:
    if video_unit not in VIDEO_UNITS:
        raise InputError(f'video_unit must be "frame" or "video", got {video_unit!r}')
    return video_unit


def feature_layers(config) -> int | None:
    """Vision encoder layers that feed a LLaVA-style model's features (its vision_feature_layer), or None."""
    layer, vc = getattr(config, "vision_feature_layer", None), getattr(config, "vision_config", None)
    if not isinstance(layer, int) or vc is None:
        return None
    return layer % (vc.num_hidden_layers + 1)
