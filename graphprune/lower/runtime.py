"""Runtime: run the rewritten graphs as a model with forward() and generate().

    pruned = graphprune.prune(model, "fastv", layer=2, keep=64)
    out = pruned(**inputs)                 # prefill logits of the kept tokens + per-layer caches
    ids = pruned.generate(**inputs, max_new_tokens=32)      # transformers' generate, every option
    print(pruned.report.table())

Inputs are what the Hugging Face processor returns (image tokens already expanded). PrunedModel is
a transformers GenerationMixin model: `forward` runs the pruned prefill on a prompt and the decode
graph on tokens fed after it, with the per-layer caches in a PrunedCache (graphprune.lower.cache).
"""
from __future__ import annotations

import inspect
import linecache
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.utils import ModelOutput

from graphprune import tokenops
from graphprune.anatomy.read import read_anatomy
from graphprune.compat import generate_cache_name, is_later_generate_step
from graphprune.errors import GraphVerificationError, InputError, NothingPrunedWarning, PassConfigError
from graphprune.families.base import MODALITIES, VisionLayout, check_video_unit
from graphprune.lower.cache import PrunedCache
from graphprune.lower.causal import use_causal_kernel
from graphprune.lower.inplace import write_in_place
from graphprune.lower.inputs import check_generate_options, check_model_inputs
from graphprune.lower.report import Report
from graphprune.lower.saving import load_checkpoint, save_pruned
from graphprune.rewrite.kv_cache import key_masks_optional, shrink_kv, static_kv
from graphprune.rewrite.pipeline import (
    BudgetStep,
    Program,
    as_passes,
    follow_budgets,
    load_builtin_methods,
    run_pipeline,
)
from graphprune.rewrite.positions import LAYER_POSITIONS, layer_lengths, per_layer_rotary


@dataclass
class PrunedOutput(ModelOutput):
    """What forward returns; transformers' generate reads `logits` and the cache by the name its
    version gives it: `cache` from 5.24, `past_key_values` before (both fields there, one cache)."""
    logits: torch.Tensor | None = None     # (B, S_kept, vocab): logits of every token the last layer kept
    cache: PrunedCache | None = None       # per-layer caches (after prefill, or with the fed tokens)
    if generate_cache_name() == "past_key_values":
        # the same cache by its name before 5.24 (5.24's ModelOutput maps this name to `cache` itself)
        past_key_values: PrunedCache | None = None
    positions: torch.Tensor | None = None  # position ids of the prompt as fed to the LM (prefill only)
    kept: torch.Tensor | None = None       # (B, S_kept) original prompt index of each row of `logits` (prefill)
    report: Report | None = None


def _cache_fields(cache: PrunedCache) -> dict:
    # transformers 5.24's ModelOutput renames a past_key_values argument to cache (and refuses both)
    return {"cache": cache} if generate_cache_name() == "cache" else {"cache": cache, "past_key_values": cache}


@dataclass
class _Prompt:
    embeds: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    vision_pos: torch.Tensor       # (B, images, tokens)
    index: torch.Tensor            # (B, S) index of each LM token in the processor's prompt
    text_index: torch.Tensor       # (B, T) positions of the instruction tokens after the last image
    text_mask: torch.Tensor        # (B, T) which of them are real (the rest pads a shorter instruction)
    protected: torch.Tensor | None = None     # (B, images, tokens) key set of a vision-stage pass
    patches_kept: torch.Tensor | None = None
    unit_frames: torch.Tensor | None = None   # (B, images) frames each unit holds (None: 1 each)
    lm_inputs: dict = field(default_factory=dict)   # other LM inputs by name (deepstack_embeds, attention_groups)
    notes: list = field(default_factory=list)
    grid_free: str = ""            # why some unit is not one square patch grid (Family.grid_free); "" if each is

    @classmethod
    def assemble(cls, embeds, feats, positions, attention_mask, vision_pos, index, passes,
                 protected=None, patches_kept=None, unit_frames=None, lm_inputs=None, grid_free="",
                 placeholders=None) -> "_Prompt":
        """Write the image features at the vision positions, lay out the instruction (after the vision
        blocks' last placeholder slot: `placeholders` (B, S) bool, those slots), and let every pass check
        the prompt it will see."""
        text_index, text_mask = text_layout(vision_pos, embeds.shape[1], block_end(placeholders))
        if unit_frames is None:
            unit_frames = torch.ones(vision_pos.shape[:2], dtype=torch.long, device=vision_pos.device)
        prompt = cls(tokenops.put_tokens(embeds, vision_pos, feats), positions, attention_mask, vision_pos, index,
                     text_index, text_mask, protected, patches_kept, unit_frames, lm_inputs or {}, grid_free=grid_free)
        for p in passes:
            p.check_prompt(prompt)
        return prompt

    def prefill_inputs(self) -> dict:
        """Every input a rewritten prefill graph may take, by placeholder name."""
        return dict(inputs_embeds=self.embeds, position_ids=self.position_ids, attention_mask=self.attention_mask,
                    vision_pos=self.vision_pos, vision_protected=self.protected, text_index=self.text_index,
                    text_mask=self.text_mask, unit_frames=self.unit_frames, **self.lm_inputs)


def text_layout(vision_pos: torch.Tensor, seq_len: int, block_end: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) positions of the tokens after each sample's last vision token (and after block_end (B,), the
    last slot of its vision blocks, where given), left-aligned, and a mask of the real ones (left padding
    puts every sample's end at seq_len - 1)."""
    start = vision_pos.reshape(vision_pos.shape[0], -1).amax(1) + 1          # (B,)
    if block_end is not None:
        start = torch.maximum(start, block_end + 1)
    count = seq_len - start
    t = max(int(count.max()), 1)
    ar = torch.arange(t, device=vision_pos.device)
    mask = ar[None] < count[:, None]
    index = torch.where(mask, start[:, None] + ar[None], torch.full_like(mask, seq_len - 1, dtype=torch.long))
    return index, mask


def placeholder_slots(family, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) bool: the slots holding the image or video placeholder token, prunable or not (LLaVA-NeXT's
    image_newline slots hold the image token too)."""
    # the accessors, not config reads: a model-less runner's family (ONNX Runtime) knows them from its manifest
    ids = [t for t in (family.image_token_id(), family.video_token_id()) if t is not None]
    return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))


def block_end(placeholders: torch.Tensor | None) -> torch.Tensor | None:
    """(B,) the last placeholder slot of each sample (-1: none); None without placeholders."""
    if placeholders is None:
        return None
    ar = torch.arange(placeholders.shape[1], device=placeholders.device)
    return torch.where(placeholders, ar, -1).amax(1)


def deepstack_embeds(rows: torch.Tensor, vision_pos: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """The prefill's deepstack_embeds (levels, B, S, D): each vision token's DeepStack rows (B, n, k, levels,
    D), in the order of its features, written at its slot in vision_pos (B, n, k); zero at every other
    token, which the model adds nothing to."""
    zeros = embeds.new_zeros(embeds.shape)
    return torch.stack([tokenops.put_tokens(zeros, vision_pos, rows[..., level, :]) for level in range(rows.shape[-2])])


def check_budgets(results, tokens_per_image: int) -> None:
    """Integer budgets larger than the vision tokens an image has at that point fail, before work."""
    follow_budgets(BudgetStep.of_results(results), tokens_per_image, "of this prompt")


class PrunedModel(nn.Module, GenerationMixin):
    """The rewritten graphs as a Hugging Face generation model: `forward` runs the pruned prefill
    on a prompt (an empty cache) and the decode graph on tokens fed after it (a filled cache);
    transformers' own `generate` drives it, so every generation option works as on the model."""

    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    _is_stateful = False
    # decode steps may pass no key masks when every key is real (set per model from its decode graph;
    # False for runners whose decode takes masks always, such as ONNX Runtime's)
    _maskless_decode = False
    _boxed_decode = None                   # (decode_exec, its copy taking a list it clears): _consuming_decode

    def __init__(self, model, program: Program, pipeline: list, base: Program, attention: str = "sdpa",
                 linear: str = "aten", video_unit: str = "frame"):
        super().__init__()
        self.model = model
        self.config = model.config
        self.generation_config = model.generation_config
        self.video_unit = check_video_unit(video_unit)     # what a video's keep counts: each frame, or the video
        self.program = program          # the rewritten stages
        self.base = base                # the captured, unpruned stages (text-only prompts)
        self.pipeline = pipeline
        self.family = program.family
        decode = program.stages["decode"].copy()       # the program keeps its captured decode step
        self.decode_gm = shrink_kv(decode.gm, read_anatomy(decode.gm, "decode", self.family.model_class))
        # compact positions between layers: each layer's new token continues that layer's own numbering
        prefill_gm = program.stages["prefill"].gm
        self.layer_positions = prefill_gm is not None and prefill_gm.meta.get("graphprune_decode_positions") == "cache_length"
        if self.layer_positions:
            self.decode_gm = per_layer_rotary(self.decode_gm, read_anatomy(self.decode_gm, "decode",
                                                                           self.family.model_class))
        self.num_layers = program.anatomy["prefill"].num_layers
        self._static_gm = None             # static-cache decode step, built on first use
        self._static_fn = None             # what runs it: its lowered copy, or compile_decode's compiled one
        self.report: Report | None = None
        self.results = program.results
        self.attention, self.linear = attention, linear
        # {stage: what runs}: the program's graphs, lowered copies (flash attention, packed linear
        # weights), or ONNX Runtime sessions (OrtPrunedModel); graphprune.tools.instrument swaps in
        # wrappers here. The program and decode_gm stay as rewritten: reports and exports read them.
        self.packed_linears = 0            # linears the lowering moved to packed weights (linear="packed")
        self.executables = {k: self._lower(getattr(program.stages.get(k), "gm", None), stage=k)
                            for k in ("vision", "prefill")}
        self.decode_exec = self._lower(self.decode_gm, attention="sdpa")
        self._maskless_decode = key_masks_optional(self.decode_exec)     # all-real keys: no key masks built
        self._text_exec = None             # the unpruned prefill lowered, for text-only prompts (on first use)
        self._bucket_execs = {}            # shape bucket -> its vision stage lowered (bucketed families)
        if linear == "packed" and not self.packed_linears:
            from graphprune.targets.packed_linear import MIN_ELEMENTS
            warnings.warn(f'linear="packed": no linear weight of this model has {MIN_ELEMENTS} elements or more, '
                          "where packing starts to pay; every graph keeps aten.linear", RuntimeWarning, stacklevel=3)

    # -- what transformers asks of a generation model ----------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    @classmethod
    def can_generate(cls) -> bool:
        return True

    @classmethod
    def is_remote_code(cls) -> bool:
        return False

    def get_input_embeddings(self):
        return self.family.language_model().get_input_embeddings()

    @contextmanager
    def _optimize_model_for_decode(self):
        yield                 # transformers switches MoE kernels here; the captured graphs are fixed

    def save_pretrained(self, directory, **save_kwargs) -> None:
        """The model's checkpoint (safetensors) plus graphprune.json, the pipeline applied;
        graphprune.from_pretrained(directory) loads it and re-applies the pipeline."""
        save_pruned(self, directory, **save_kwargs)

    def _lower(self, gm: torch.fx.GraphModule | None, attention: str | None = None,
               stage: str = "decode") -> torch.fx.GraphModule | None:
        """gm itself, or a copy with flash-attn as its attention (else, for a prefill, the mask-free
        causal kernel where the prompt allows it: graphprune.lower.causal) and/or oneDNN-packed
        linear weights; a prefill's elementwise ops write into dead operands (graphprune.lower.inplace)."""
        attention = attention or self.attention
        if gm is None or (attention != "flash" and self.linear != "packed" and stage != "prefill"):
            return gm
        low = torch.fx.GraphModule(gm, gm.graph.__deepcopy__())
        low.meta.update(gm.meta)
        if attention == "flash":            # flash's varlen kernel runs causal masks mask-free itself
            from graphprune.targets.flash import use_flash_attention
            use_flash_attention(low)
        elif stage == "prefill":
            use_causal_kernel(low, self.family.text_config())
        if self.linear == "packed":
            from graphprune.targets.packed_linear import pack_linear_weights
            self.packed_linears += pack_linear_weights(low)
        if stage == "prefill":              # after packing: its linears allocate their outputs too
            write_in_place(low)
        return low

    def _text_prefill(self) -> torch.fx.GraphModule:
        """The unpruned prefill, lowered like the pruned one (text-only prompts run it)."""
        if self._text_exec is None:
            self._text_exec = self._lower(self.base.stages["prefill"].gm, stage="prefill")
        return self._text_exec

    # -- prompt preparation -----------------------------------------------------------------
    def _layout(self, input_ids: torch.Tensor, **inputs) -> VisionLayout | None:
        """The prunable vision units of the prompt (None: none), of the kinds every pass prunes: a
        pipeline holding a videos-only pass (evs) lays out the videos only, the images staying whole."""
        modalities = ("video",) if self._videos_only() else MODALITIES
        layout = self.family.vision_layout(input_ids, video_unit=self.video_unit, modalities=modalities, **inputs)
        if modalities != MODALITIES and bool((input_ids == self.family.image_token_id()).any()):
            only = [repr(p) for p in self.pipeline if p.units == "videos"]
            others = [repr(p) for p in self.pipeline if p.units != "videos"]
            if others:
                raise InputError(f"the prompt has images, which {', '.join(only)} prunes nothing of (it prunes "
                                 f"videos only), so {', '.join(others)} would see the videos only too; prune "
                                 f"prompts with images by {', '.join(only)} alone, or without it")
        return layout

    def _videos_only(self) -> bool:
        return any(p.units == "videos" for p in self.pipeline)

    def _image_features(self, inputs, layout: VisionLayout, input_ids):
        """Prompt embeddings (None: plain token embeddings), features (B, n, k, D), what the vision
        stage kept: original patch indices, validity and key set (images, k) each, or None when it
        kept every patch, and the family's other LM inputs by name."""
        vision_pos = layout.pos
        b, n, v = vision_pos.shape
        vision = self.program.stages["vision"]
        if self.program.vision_passes:     # captured per shape bucket: each unit's pixels, of one bucket
            bucket, pixel_values = self.family.vision_stage_inputs(layout, video_unit=self.video_unit, **inputs)
            if bucket not in self._bucket_execs:
                self._bucket_execs[bucket] = self._lower(self.program.vision_stage(bucket).gm, stage="vision")
            executable = self._bucket_execs[bucket]
        elif vision.gm is None:              # the model's own get_image_features / get_video_features
            lm_inputs = self.family.merged_inputs(input_ids, **inputs)
            embeds = lm_inputs.pop("inputs_embeds")
            return embeds, tokenops.token_features(embeds, vision_pos), None, None, None, lm_inputs
        else:
            pixel_values, executable = inputs.get("pixel_values"), self.executables["vision"]
        if pixel_values is None:
            raise InputError("the prompt has image tokens but no pixel_values were given")
        if pixel_values.shape[0] != b * n:
            raise InputError(f"{pixel_values.shape[0]} images for {b} samples x {n} image blocks")
        inputs = {"pixel_values": pixel_values}
        names = {p.name for p in executable.graph.find_nodes(op="placeholder")}
        if "text_embeds" in names:     # text-guided vision passes: each image sees its sample's instruction
            # the instruction starts after the vision block: a placeholder slot that is no prunable token
            # (LLaVA-NeXT's image_newline closing an image) is no instruction text (as in the prefill)
            text_index, text_mask = text_layout(vision_pos, input_ids.shape[1],
                                                block_end(placeholder_slots(self.family, input_ids)))
            emb = self.family.embed(input_ids.gather(1, text_index))
            inputs["text_embeds"] = emb.repeat_interleave(n, 0)
            inputs["text_mask"] = text_mask.repeat_interleave(n, 0)
        outs = _call(executable, **inputs)
        feats = outs["features"]
        lm_inputs = {}
        if "deepstack_features" in outs:        # Qwen3-VL: the kept tokens' DeepStack rows (each selection took them)
            rows = outs["deepstack_features"]
            if rows.shape[1] != feats.shape[1]:
                raise GraphVerificationError(f"the vision stage returns DeepStack rows for {rows.shape[1]} tokens per "
                                             f"unit and features for {feats.shape[1]}")
            lm_inputs["deepstack_rows"] = rows.reshape(b, n, -1, *rows.shape[2:])
        return (None, feats.reshape(b, n, -1, feats.shape[-1]), outs.get("patches_kept"), outs.get("patches_valid"),
                outs.get("patches_protected"), lm_inputs)

    def _prompt(self, input_ids, attention_mask, **inputs) -> _Prompt | None:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        layout = self._layout(input_ids, **inputs)
        if layout is None:
            return None
        vision_pos = layout.pos
        b, n, v = vision_pos.shape
        check_budgets(self.results, v)
        positions = self.family.positions(input_ids, attention_mask, **inputs)
        groups = self.family.attention_groups(attention_mask, **inputs)
        embeds, feats, kept, valid, protected, lm_inputs = self._image_features(inputs, layout, input_ids)
        index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if kept is not None:                     # a vision-stage pass kept (or merged into) k of v patches
            k = kept.shape[-1]
            chosen = vision_pos.gather(2, kept.reshape(b, n, k))
            keep, new_pos = tokenops._apply_choice(vision_pos, chosen, index, n * k)
            if self._vision_positions() == "compact":   # features fill the image's slots in their own order
                new_pos = new_pos.sort(-1).values     # (a no-op unless a vision pass reordered them)
            input_ids, attention_mask, index = (t.gather(1, keep) for t in (input_ids, attention_mask, index))
            groups = None if groups is None else groups.gather(1, keep)
            index = index.scatter(1, new_pos.reshape(b, -1), chosen.reshape(b, -1))
            if valid is not None:                # static capacity: invalid slots act as padding in the LLM
                attention_mask = attention_mask.scatter(1, new_pos.reshape(b, -1),
                                                        attention_mask.gather(1, new_pos.reshape(b, -1))
                                                        * valid.reshape(b, -1).to(attention_mask.dtype))
            if self._vision_positions() == "keep":
                positions = tokenops.take_tokens(positions, keep, positions.dim() - 2, (positions.dim() - 1,))
            else:
                positions = self.family.positions(input_ids, attention_mask)
            vision_pos = new_pos
        if protected is not None:
            protected = protected.reshape(b, n, -1)
        if embeds is None:
            embeds = self.family.embed(input_ids)
            if self.program.vision_passes:      # the vision graph gave the units' tokens; separators are the family's
                separators = layout.separators if kept is None else layout.separators.gather(1, keep)
                embeds = self.family.separator_embeds(embeds, input_ids, separators)
        if "deepstack_rows" in lm_inputs:
            lm_inputs["deepstack_embeds"] = deepstack_embeds(lm_inputs.pop("deepstack_rows"), vision_pos, embeds)
        return _Prompt.assemble(embeds, feats, positions, attention_mask, vision_pos, index,
                                self.pipeline, protected, kept, layout.frames,
                                lm_inputs if groups is None else {**lm_inputs, "attention_groups": groups},
                                self.family.grid_free(layout, **inputs), placeholder_slots(self.family, input_ids))

    def _vision_inputs(self, **inputs) -> dict:
        """The processor outputs this family reads (the rest is refused, naming what it accepts)."""
        inputs = {k: v for k, v in inputs.items() if v is not None}
        unused = sorted(set(inputs) - set(self.family.vision_inputs))
        if unused:
            raise InputError(f"unexpected inputs {unused}; {self.family.model_class} ({self.family.name} family) "
                             f"takes input_ids, attention_mask, {', '.join(self.family.vision_inputs)}")
        return inputs

    def _vision_positions(self) -> str:
        for r in self.results:        # a key set (Protect) removes nothing: the selecting passes number the tokens
            if r.info["stage"] == "vision" and r.info["rule"] != "Protect":
                return r.info["positions"]
        return "keep"

    # -- forward: prefill on an empty cache, decode on a filled one ----------------------------------
    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                mm_token_type_ids=None, past_key_values: PrunedCache | None = None, use_cache: bool = True,
                return_dict: bool = True, cache: PrunedCache | None = None, **extra) -> PrunedOutput:
        """A prompt (no cache, or an empty one): the pruned prefill; logits of the kept tokens and
        the filled cache. Tokens continuing a conversation (a filled PrunedCache): the decode step
        over each layer's own cache, one token at a time, logits of every fed token; the image
        inputs of a cached conversation are not used again (its image is in the cache).
        `cache`: the same as past_key_values (its name from transformers 5.24).
        `extra`: the family's other processor outputs (pixel_values_videos, image_sizes, ...)."""
        alias = self.family.image_pixels_alias     # the family's processor may name the images otherwise
        if alias and extra.get(alias) is not None:
            if pixel_values is not None:
                raise InputError(f"pixel_values and {alias} name the same images; pass one of them")
            pixel_values = extra.pop(alias)
        inputs = self._vision_inputs(pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                                     mm_token_type_ids=mm_token_type_ids, **extra)
        if not use_cache:
            raise InputError("a pruned model decodes through its per-layer caches; use_cache=False is not supported")
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise InputError("cache and past_key_values name the same thing; pass one of them")
        cache = cache if cache is not None else past_key_values
        cache = PrunedCache() if cache is None else cache
        if not isinstance(cache, PrunedCache):
            raise InputError(f"past_key_values must be a graphprune PrunedCache (what this model returns), "
                             f"got {type(cache).__name__}")
        if cache.layers:
            return self._continue(cache, input_ids, attention_mask, pixel_values)
        input_ids, attention_mask = check_model_inputs(self.family, input_ids, attention_mask, pixel_values,
                                                       image_grid_thw, mm_token_type_ids)
        self._check_run_length(input_ids.shape[1])
        prompt = self._prompt(input_ids, attention_mask, **inputs)
        if prompt is None:                      # text-only prompt (or images and a videos-only pipeline)
            gm = self._text_prefill()
            note = "text-only prompt (no vision tokens): ran unpruned"
            lm_inputs = self.family.merged_inputs(input_ids)
            positions = self.family.positions(input_ids, attention_mask)
            if self._videos_only() and bool((input_ids == self.family.image_token_id()).any()):
                note = "no video in the prompt, and the pipeline prunes videos only: ran unpruned"
                warnings.warn(f"{' | '.join(map(repr, self.pipeline))} prunes videos only and the prompt has "
                              "none: every token kept", NothingPrunedWarning, stacklevel=2)
                lm_inputs = self.family.merged_inputs(input_ids, **inputs)
                positions = self.family.positions(input_ids, attention_mask, **inputs)
            outs = _call(gm, position_ids=positions, attention_mask=attention_mask,
                         attention_groups=self.family.attention_groups(attention_mask, **inputs), **lm_inputs)
            index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            return self._finish(cache, outs, attention_mask, positions, index, None, [note], input_ids.shape[1],
                                attention_mask.sum(1))
        outs = _call(self.executables["prefill"], **prompt.prefill_inputs())
        return self._finish(cache, outs, prompt.attention_mask, prompt.position_ids, prompt.index, prompt, [],
                            input_ids.shape[1], attention_mask.sum(1))

    def _finish(self, cache, outs, attention_mask, positions, index, prompt, notes, seen: int,
                prompt_tokens) -> PrunedOutput:
        seq = torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)
        layers, layer_index, layer_valid = [], seq, None
        for i in range(self.num_layers):
            layer_index = outs.get(f"tokens_from_layer_{i}", layer_index)
            layer_valid = outs.get(f"valid_from_layer_{i}", layer_valid)
            own_index = outs.get(f"kv_tokens_{i}", layer_index)          # output-aware cache cuts
            own_valid = outs.get(f"kv_valid_{i}", layer_valid if own_index is layer_index else None)
            mask = attention_mask.gather(1, own_index)
            if own_valid is not None:
                mask = mask * own_valid.to(mask.dtype)
            layers.append((outs[f"k_{i}"], outs[f"v_{i}"], mask, index.gather(1, own_index)))
        # the next token's position: one past the prompt's largest (every M-RoPE axis alike)
        last = positions.amax(0) if positions.dim() == 3 else positions
        cache.fill(layers, seen=seen, next_position=last.amax(-1) + 1)
        kept = index.gather(1, layer_index)
        vision = 0 if prompt is None else prompt.vision_pos.shape[1] * prompt.vision_pos.shape[2]
        self.report = Report.build(self, cache, vision, prompt, notes, prompt_tokens)
        if self.report.pruned_nothing and prompt is not None and self.pipeline:
            warnings.warn(f"{self.report.pipeline} pruned nothing on this prompt: every layer ran on every "
                          "prompt token (report.pruned_nothing)", NothingPrunedWarning, stacklevel=3)
        return PrunedOutput(logits=outs["logits"], **_cache_fields(cache), positions=positions, kept=kept,
                            report=self.report)

    def _continue(self, cache: PrunedCache, input_ids, attention_mask, pixel_values) -> PrunedOutput:
        """Feed tokens after a cached prompt (generated ones, or a follow-up question). Image inputs
        are not read again: the cached prompt's image is in the cache; a new image is refused."""
        t = input_ids.shape[1]
        if attention_mask is None:
            fed = torch.ones_like(input_ids)
        elif attention_mask.shape[1] != cache.seen + t:
            raise InputError(f"attention_mask covers {attention_mask.shape[1]} positions; the cache holds "
                             f"{cache.seen} and {t} tokens are fed: it must cover both ({cache.seen + t})")
        else:
            fed = attention_mask[:, -t:]
        if pixel_values is not None and bool((input_ids == self.family.image_token_id()).any()):
            raise InputError("the tokens fed after a cached prompt hold a new image; a PrunedCache holds one pruned "
                             "prompt with its images: start a new conversation (no past_key_values) for a new image")
        self._check_run_length(cache.seen + t)
        cache.room(t)
        logits = [self.decode_step(cache, input_ids[:, j], mask=fed[:, j])[0] for j in range(t)]
        return PrunedOutput(logits=torch.stack(logits, 1), **_cache_fields(cache))

    def _check_run_length(self, tokens: int) -> None:
        self.family.check_run_length(tokens, prunes=bool(self.pipeline))

    def decode_step(self, cache: PrunedCache, token: torch.Tensor, position: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None):
        """One decode step: `token` (B,) at `position` (B, 1) (default: where the cache stands), key
        mask `mask` (B,) (default ones) -> (next-token logits (B, V), the cache with the token in it)."""
        fed_all_real = mask is None
        mask = torch.ones_like(token) if mask is None else mask
        if position is None:
            position = cache.next_position[:, None]
        if self.family.position_axes == 3 and position.dim() == 2:
            position = position[None].expand(3, -1, -1)
        embeds = self.family.embed(token[:, None])
        layer_positions = self._layer_positions(cache)
        if cache.static:
            logits = self._static_step(cache, embeds, position, mask, layer_positions)
        else:
            if any(layer.keys is None for layer in cache):
                raise InputError(_LOST_CACHE)
            # every cached key and the new one real (no padding): attend without masks, as transformers does
            maskless = self._maskless_decode and cache.keys_all_real and (fed_all_real or bool(mask.all()))
            cache.keys_all_real = maskless
            args = {"inputs_embeds": embeds, "position_ids": position, **layer_positions}
            for i, layer in enumerate(cache):
                args[f"past_{2 * i}"], args[f"past_{2 * i + 1}"] = layer.keys, layer.values
                args[f"kv_mask_{i}"] = (None if maskless else
                                        torch.cat([layer.mask, mask[:, None].to(layer.mask.dtype)], 1))
                layer.keys = layer.values = None        # handed to the step, which frees them as it goes
            try:
                outs = self._consuming_decode(args)
            except Exception as e:
                if hasattr(e, "add_note"):         # Python >= 3.11
                    e.add_note(_LOST_CACHE)
                raise
            names = self.decode_gm.meta["graphprune_outputs"]
            columns = cache[0].new_columns(mask)      # the same for every layer: built once, not per layer
            for i, layer in enumerate(cache):
                layer.append(outs[names[1 + 2 * i]], outs[names[2 + 2 * i]], *columns)
            logits = outs["logits"][:, -1]
        cache.seen += 1
        cache.next_position = cache.next_position + mask.to(cache.next_position.dtype)
        return logits, cache

    def _consuming_decode(self, args: dict) -> dict:
        """The dynamic decode graph on `args` (by placeholder name), which it takes over: run with the
        boxed calling convention, the graph drops each layer's past keys / values once it has
        concatenated the new token onto them, as transformers' cache does layer by layer. Holding every
        layer's old cache until the step ends made each concatenation ~1.4x slower on the speed model
        (the new buffers land on memory untouched for a whole step), the 5-6% by which graphprune's
        step trailed transformers'. A step that fails part-way has freed some layers' keys / values and
        not written the new ones: the cache holds none (see decode_step), and says so when used again."""
        exe = self.decode_exec
        if self._boxed_decode is None or self._boxed_decode[0] is not exe:
            self._boxed_decode = (exe, _boxed_copy(exe))
        gm = self._boxed_decode[1]
        if gm is None:          # a runner of another kind (ONNX Runtime, a proxy), or no boxed codegen here
            return _call(exe, **args)
        box = [args.pop(n.name) for n in gm.graph.find_nodes(op="placeholder")]
        return dict(zip(exe.meta["graphprune_outputs"], _as_tuple(gm(box))))

    def _static_step(self, cache: PrunedCache, embeds, position, mask, layer_positions) -> torch.Tensor:
        """The static decode graph writes the token into each layer's buffer in place."""
        gm = self._static_graph()
        if self._static_fn is None:                  # eager: lowered like the dynamic decode step
            self._static_fn = self._lower(gm, attention="sdpa")
        device = cache[0].keys.device
        args = {"inputs_embeds": embeds, "position_ids": position,
                "kv_write_pos": torch.tensor(cache.lengths(), device=device), **layer_positions}
        for i, layer in enumerate(cache):
            layer.mask[:, layer.length] = mask.to(layer.mask.dtype)
            args[f"past_{2 * i}"], args[f"past_{2 * i + 1}"] = layer.keys, layer.values
            args[f"kv_mask_{i}"] = layer.mask
        out = self._static_fn(*[args[n.name] for n in gm.graph.find_nodes(op="placeholder")])
        for layer in cache:
            layer.length += 1
        return out[0][:, -1]

    def _layer_positions(self, cache) -> dict:
        # compact positions between layers: each layer's new token takes that layer's real cache length
        return {LAYER_POSITIONS: layer_lengths(cache)} if self.layer_positions else {}

    def compile_decode(self, mode: str = "reduce-overhead", backend: str = "inductor"):
        """Compile the static-cache decode step (every shape fixed: CUDA graphs on a GPU with
        mode="reduce-overhead"); generate(static_cache=True) then uses it."""
        self._static_fn = torch.compile(self._static_graph(), mode=mode, backend=backend, dynamic=False)
        return self

    def _static_graph(self) -> torch.fx.GraphModule:
        if self._static_gm is None:
            gm = torch.fx.GraphModule(self.decode_gm, self.decode_gm.graph.__deepcopy__())
            gm.meta.update(self.decode_gm.meta)
            self._static_gm = static_kv(gm, read_anatomy(gm, "decode", self.family.model_class))
        return self._static_gm

    # -- generation: transformers' generate over forward ---------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 mm_token_type_ids=None, *, static_cache: bool = False, generator: torch.Generator | None = None,
                 **kwargs):
        """transformers' `generate` (every option: GenerationConfig, logits processors, stopping
        criteria and stop strings, streamers, beam search, return_dict_in_generate, ...) over the
        pruned prefill and the per-layer cache decode.

        static_cache=True decodes with fixed-size per-layer buffers written in place (what
        compile_decode / CUDA graphs need). generator: sampling draws from a global RNG seeded from
        it (transformers samples from the global RNG), which is restored afterwards. A follow-up
        turn passes the previous turn's `past_key_values` with the whole conversation's input_ids."""
        given = {k: kwargs[k] for k in ("max_new_tokens", "do_sample", "temperature") if kwargs.get(k) is not None}
        check_generate_options(**{"max_new_tokens": 1, "do_sample": False, "temperature": 1.0, **given},
                               top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"),
                               eos_token_id=kwargs.get("eos_token_id"), pad_token_id=kwargs.get("pad_token_id"))
        for name, why in _UNSUPPORTED.items():
            if kwargs.get(name) or getattr(kwargs.get("generation_config"), name, None):
                raise InputError(f"{name}: {why}")
        beams = kwargs.get("num_beams") or getattr(kwargs.get("generation_config"), "num_beams", 1) or 1
        if beams > 1 and kwargs.get("eos_token_id") == []:
            raise InputError(f"eos_token_id=[] with num_beams={beams}: transformers' beam search needs an end "
                             "token (it fails inside); give one (or leave eos_token_id unset), or use num_beams=1")
        if input_ids is not None:
            self._check_run_length(input_ids.shape[1] + self._new_tokens(input_ids, kwargs))
        cache = kwargs.pop("past_key_values", None)
        if kwargs.get("cache") is not None:        # its name from transformers 5.24
            cache = kwargs.pop("cache")
        if cache is None:
            cache = PrunedCache(capacity=self._new_tokens(input_ids, kwargs) if static_cache else 0)
        elif static_cache and not cache.static:
            raise InputError("static_cache=True with a dynamic past_key_values; pass PrunedCache(capacity=n) or neither")
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                      image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids)
        inputs = {k: v for k, v in inputs.items() if v is not None}
        with _sampling_rng(generator, self.device):
            out = super().generate(**inputs, **{generate_cache_name(): cache}, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        if self.report is not None and input_ids is not None:
            self.report.with_decode(cache, sequences.shape[1] - input_ids.shape[1])
        return out

    def prepare_inputs_for_generation(self, *args, **kwargs) -> dict:
        """transformers' own preparation, less what generate hands every model but forward does not
        take (the stop-string tokenizer, ...); generate has already checked the user's kwargs."""
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        vision = self.family.vision_inputs
        if is_later_generate_step(inputs):
            return {k: v for k, v in inputs.items() if k in _FORWARD_INPUTS and k not in vision}
        return {k: v for k, v in inputs.items() if k in _FORWARD_INPUTS or k in vision}

    def _validate_model_kwargs(self, model_kwargs: dict) -> None:
        """transformers checks generate's kwargs against forward's named parameters; the family's
        processor outputs (pixel_values_videos, image_sizes, ...) reach forward through **extra."""
        super()._validate_model_kwargs({k: v for k, v in model_kwargs.items() if k not in self.family.vision_inputs})

    def _new_tokens(self, input_ids, kwargs) -> int:
        """How many tokens a generate call may add (what a static cache makes room for)."""
        config = kwargs.get("generation_config") or self.generation_config
        new = kwargs.get("max_new_tokens", config.max_new_tokens)
        if new is None:
            new = kwargs.get("max_length", config.max_length) - input_ids.shape[1]
        return max(int(new), 1)

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beam search / num_return_sequences repeat each sample; its images and videos go with it
        (transformers' row-wise repeat would interleave the images of a multi-image sample, or
        Qwen2-VL's patch rows)."""
        vision = {k: model_kwargs.pop(k) for k in _VISION_ROWS if model_kwargs.get(k) is not None}
        batch = input_ids.shape[0]
        input_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids,
                                                                         **model_kwargs)
        if expand_size > 1:
            vision = _repeat_vision_rows(vision, batch, expand_size)
        return input_ids, {**model_kwargs, **vision}


# generate options a pruned model refuses, and why
_UNSUPPORTED = {
    "assistant_model": "assisted decoding rolls the cache back, and a pruned cache cannot be cropped",
    "prompt_lookup_num_tokens": "prompt-lookup decoding rolls the cache back, and a pruned cache cannot be cropped",
    "output_attentions": "the rewritten graphs compute attention inside SDPA and return no attention maps",
    "output_hidden_states": "the rewritten graphs return logits and caches, not hidden states",
    "cache_implementation": "the pruned model brings its own cache (PrunedCache; static_cache=True for its static variant)",
    "prefill_chunk_size": "the pruned prefill selects tokens over the whole prompt; it cannot run in chunks",
}
_FORWARD_INPUTS = set(inspect.signature(PrunedModel.forward).parameters) - {"self", "extra"}


def _repeat_vision_rows(inputs: dict, batch: int, times: int) -> dict:
    """Repeat each sample's images and videos `times` times, sample by sample. Per modality, the
    pixel rows are one block per item (an image or a video: grid_thw.prod() patch rows with a grid,
    else one row) and every sample has as many items, in sample order; per-item inputs (grids,
    image_sizes, second_per_grid_ts) are repeated the same way."""
    out = dict(inputs)
    for pixels, per_item in _VISION_ROWS_BY_MODALITY:
        if inputs.get(pixels) is None:
            continue
        grid = inputs.get(per_item[0])
        rows = inputs[pixels].shape[0]
        items = grid.shape[0] if grid is not None else rows
        if items % batch:
            raise InputError(f"{pixels} holds {items} images / videos for {batch} samples: beam search and "
                             "num_return_sequences need as many per sample")
        rows_per_item = grid.prod(-1) if grid is not None else torch.ones(items, dtype=torch.long)
        blocks = inputs[pixels].split(rows_per_item.reshape(batch, -1).sum(1).tolist())
        out[pixels] = torch.cat([block for block in blocks for _ in range(times)])
        for name in per_item:
            value = inputs.get(name)
            if value is not None:
                value = torch.as_tensor(value)
                out[name] = value.reshape(batch, -1, *value.shape[1:]).repeat_interleave(times, 0).flatten(0, 1)
    return out


# pixel inputs and their per-item inputs (the first one, where present, is the item's patch grid)
_VISION_ROWS_BY_MODALITY = (("pixel_values", ("image_grid_thw", "image_sizes")),
                            ("pixel_values_videos", ("video_grid_thw", "second_per_grid_ts")))
_VISION_ROWS = tuple(k for pixels, per_item in _VISION_ROWS_BY_MODALITY for k in (pixels, *per_item))


@contextmanager
def _sampling_rng(generator: torch.Generator | None, device: torch.device):
    """Sampling in transformers draws from the global RNG: seed it from `generator`, restore it after."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


_LOST_CACHE = ("this cache lost its keys / values: a decode step over it failed part-way, after it had "
               "consumed them (each layer's old cache is freed as the step goes); it cannot be decoded from "
               "again. Run the prompt again (or decode from a copy: cache.copy() before the step)")

# fx's code generator for a graph that takes one list of inputs and clears it (torch >= 2.5; private)
_BOXED = getattr(torch.fx.graph, "_BoxedCodeGen", None)


def _boxed_copy(exe) -> torch.fx.GraphModule | None:
    """A copy of the graph module `exe` taking one list of inputs that it clears as it goes (fx's
    private _BoxedCodeGen); None for a runner that is no graph module, or where this torch's fx has
    no such code generator or builds it otherwise (the step then holds its inputs to the end, as
    before: slower, the same results)."""
    if not isinstance(exe, torch.fx.GraphModule) or _BOXED is None:
        return None
    try:
        boxed = torch.fx.GraphModule(exe, exe.graph.__deepcopy__())
        boxed.graph.set_codegen(_BOXED())
        boxed.recompile()
    except Exception as e:         # a private API: its absence or change costs speed, never a wrong step
        warnings.warn(f"decode steps keep each layer's old cache until the step ends: fx's boxed calling "
                      f"convention failed here ({type(e).__name__}: {e})", RuntimeWarning, stacklevel=4)
        return None
    return boxed


def _as_tuple(x):
    return x if isinstance(x, (tuple, list)) else (x,)


class StageCall:
    """Stands in for a stage's GraphModule in `_call`: its placeholders and output names, another
    callable (the graph compiled, timed, replayed, ...)."""

    def __init__(self, gm, call):
        self.gm, self.call = gm, call
        self.graph, self.meta = gm.graph, gm.meta

    def __call__(self, *args):
        return self.call(*args)


def _call(gm, **inputs) -> dict:
    """Run a stage graph with inputs by placeholder name; outputs by name (a later output of the
    same name, from a later pass, wins)."""
    args = [inputs[n.name] for n in gm.graph.find_nodes(op="placeholder")]
    return dict(zip(gm.meta["graphprune_outputs"], _as_tuple(gm(*args))))


class _CapturedProgram:
    """A model's captured program, kept on the model itself (model.__dict__) so that it lives
    exactly as long as the model: a module-level cache kept every model ever pruned alive. Copies
    and pickles of the model start without one (they capture their own)."""
    ATTR = "_graphprune_captured"

    def __init__(self, program: Program | None = None, placement: frozenset = frozenset()):
        self.program = program
        self.placement = placement         # the (device, dtype) pairs of the weights it was captured with

    def __deepcopy__(self, memo):
        return _CapturedProgram()

    def __reduce__(self):
        return _CapturedProgram, ()

    @classmethod
    def of(cls, model) -> Program:
        """The program captured from `model`, captured again once the model moved to another device or
        dtype: the graphs hold copies of its buffers (position ids, rotary tables), which .to() does not move."""
        placement = frozenset((p.device, p.dtype) for p in model.parameters())
        held = model.__dict__.get(cls.ATTR)
        if held is None or held.program is None or held.placement != placement:
            held = cls(Program.capture(model), placement)
            model.__dict__[cls.ATTR] = held
        return held.program


def forget_dead_graph_sources() -> int:
    """Drop the source text torch.fx keeps for every graph it ever compiled (its linecache loader
    never forgets, about 0.2 MiB per prune() of a tiny model) once no live GraphModule runs it."""
    from torch.fx import graph_module
    live, seen, todo = set(), set(), [torch.fx.GraphModule]
    while todo:                           # each GraphModule instance has a class of its own
        for cls in todo.pop().__subclasses__():
            if cls not in seen:
                seen.add(cls)
                todo.append(cls)
                live.update(v.__code__.co_filename for v in vars(cls).values() if hasattr(v, "__code__"))
    cache = getattr(getattr(graph_module, "_loader", None), "eval_cache", None)
    if not isinstance(cache, dict):         # a torch without that loader: nothing to sweep
        return 0
    dead = [k for k in cache if k.startswith("<eval_with_key>") and k not in live]
    for k in dead:
        del cache[k]
        linecache.cache.pop(k, None)
    return len(dead)


def prune(model, method=None, *, program: Program | None = None, debug: bool = False, attention: str = "auto",
          linear: str = "aten", video_unit: str | None = None, **options) -> PrunedModel:
    """Prune a Hugging Face VLM with a method name (+ options), a pipeline string/TOML file, or passes.

    All options are validated, the model captured and the graphs rewritten before this returns;
    nothing runs on data until the pruned model is called. `method=None` or `[]` gives the
    unpruned captured model (useful as the baseline). `attention`: "auto" (flash-attn for the
    vision and prefill layers when it imports and the model is on CUDA, else SDPA), "sdpa", "flash".
    `linear`: "aten" (the graphs' own linears) or "packed" (float32 CPU models: weights packed once
    for oneDNN, faster and closer to proportional to the tokens kept, at twice the linear layers'
    weight memory; see graphprune.targets.packed_linear).
    `video_unit`: what `keep` counts for video: "frame" (each frame keeps `keep` tokens, default) or
    "video" (each whole video keeps `keep`; the default with a videos-only pass such as evs, which
    refuses "frame"); images always count per image.
    """
    if video_unit is not None:
        check_video_unit(video_unit)
    attention = _attention_kind(model, attention)
    check_linear(model, linear)
    load_builtin_methods()
    passes = [] if method is None else as_passes(method, **options)
    video_unit = resolve_video_unit(passes, video_unit)
    forget_dead_graph_sources()
    if program is None:
        program = _CapturedProgram.of(model)
    _check_static_budgets(program, passes)
    rewritten = run_pipeline(program, passes, debug=debug)
    return PrunedModel(model, rewritten, passes, program, attention, linear, video_unit)


def from_pretrained(directory, *, attention: str = "auto", **model_kwargs) -> PrunedModel:
    """Load a directory written by PrunedModel.save_pretrained and re-apply its pipeline
    (safetensors weights, a known model family, no remote code). model_kwargs go to the model's
    from_pretrained (dtype, device_map, ...); attention is resolved for this machine again."""
    model, spec = load_checkpoint(directory, **model_kwargs)
    pipeline = " | ".join(spec["pipeline"]) or None
    return prune(model, pipeline, attention=attention, linear=spec.get("linear", "aten"))


def resolve_video_unit(passes, video_unit: str | None) -> str:
    """What a video's keep counts: as asked, else "video" for a videos-only pass, else "frame"."""
    whole = [repr(p) for p in passes if p.units == "videos"]
    if whole and video_unit == "frame":
        raise PassConfigError(f'{", ".join(whole)} keeps a budget over each whole video, scoring each frame against '
                              'the one before it; video_unit="frame" would split videos into frames: give '
                              'video_unit="video" (or leave it unset)')
    return video_unit or ("video" if whole else "frame")


def _attention_kind(model, attention: str) -> str:
    from graphprune.targets.flash import flash_available
    if attention not in ("auto", "sdpa", "flash"):
        raise InputError(f'attention must be "auto", "sdpa" or "flash", got {attention!r}')
    device = next(model.parameters()).device
    if attention == "flash" and not flash_available(device):
        raise InputError(f"attention='flash' needs the flash_attn package and a CUDA model (this one is on {device}); "
                         "pip install 'graphprune[gpu]', or use attention='auto'")
    if attention == "auto":
        return "flash" if flash_available(device) else "sdpa"
    return attention


LINEAR_KINDS = ("aten", "packed")        # prune(linear=...): how the lowered graphs run their linears


def check_linear(model, linear: str) -> None:
    from graphprune.targets.packed_linear import packing_available
    if linear not in LINEAR_KINDS:
        raise InputError(f'linear must be "aten" or "packed", got {linear!r}')
    if linear == "aten":
        return
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        raise InputError(f'linear="packed" packs float32 CPU weights; this model is {p.dtype} on {p.device}. '
                         'Use linear="aten" (the default), or move the model with model.float().cpu()')
    if not packing_available():
        raise InputError('linear="packed" needs oneDNN, which this torch build lacks (torch.backends.mkldnn); '
                         'use linear="aten"')


def _check_static_budgets(program: Program, passes) -> None:
    """Budgets larger than the vision tokens an image has (when the patch grid is fixed) or than an
    earlier pass leaves fail here, before any rewriting; a pipeline that cannot prune warns."""
    vision = program.anatomy.get("vision")
    grid = None if vision is None else vision.grid
    tokens = None if grid is None else grid[0] * grid[1]
    where = "" if grid is None else f"({grid[0]}x{grid[1]} patch grid)"
    if passes and not follow_budgets(BudgetStep.of_passes(passes), tokens, where):
        why = "" if any(s.rule in ("TopK", "Choose", "WithdrawAll") for s in BudgetStep.of_passes(passes)) else \
            ": none of its passes drops a token (they protect tokens or cut caches to what later passes keep)"
        budget = f" at or above the {tokens} vision tokens per image {where}" if tokens and not why else ""
        warnings.warn(f"{' | '.join(map(repr, passes))} prunes nothing{why}{budget}; the report will say "
                      "pruned_nothing", NothingPrunedWarning, stacklevel=3)
