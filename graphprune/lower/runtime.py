"""Runtime: run the rewritten graphs as a model with forward() and generate().

    pruned = graphprune.prune(model, "fastv", layer=2, keep=64)
    out = pruned(**inputs)                 # prefill logits of the kept tokens + per-layer caches
    ids = pruned.generate(**inputs, max_new_tokens=32)
    print(pruned.report.table())

Inputs are what the Hugging Face processor returns (image tokens already expanded).
"""
from __future__ import annotations

import linecache
import warnings
from dataclasses import dataclass, field

import torch

from graphprune import tokenops
from graphprune.anatomy.read import read_anatomy
from graphprune.errors import InputError, NothingPrunedWarning
from graphprune.lower.inputs import check_generate_options, check_model_inputs
from graphprune.lower.report import Report
from graphprune.rewrite.kv_cache import KVCache, LayerCache, shrink_kv, static_kv
from graphprune.rewrite.pipeline import (
    BudgetStep,
    Program,
    as_passes,
    follow_budgets,
    load_builtin_methods,
    run_pipeline,
)


@dataclass
class PrunedOutput:
    logits: torch.Tensor            # (B, S_kept, vocab): logits of every token the last layer kept
    cache: KVCache                  # per-layer caches after prefill
    positions: torch.Tensor         # position ids of the prompt as fed to the LM
    kept: torch.Tensor              # (B, S_kept) original prompt index of each row of `logits`
    report: Report = None


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
    notes: list = field(default_factory=list)

    @classmethod
    def assemble(cls, embeds, feats, positions, attention_mask, vision_pos, index, passes,
                 protected=None, patches_kept=None) -> "_Prompt":
        """Write the image features at the vision positions, lay out the instruction, and let every
        pass check the prompt it will see."""
        text_index, text_mask = text_layout(vision_pos, embeds.shape[1])
        prompt = cls(tokenops.put_tokens(embeds, vision_pos, feats), positions, attention_mask, vision_pos, index,
                     text_index, text_mask, protected, patches_kept)
        for p in passes:
            p.check_prompt(prompt)
        return prompt

    def prefill_inputs(self) -> dict:
        """Every input a rewritten prefill graph may take, by placeholder name."""
        return dict(inputs_embeds=self.embeds, position_ids=self.position_ids, attention_mask=self.attention_mask,
                    vision_pos=self.vision_pos, vision_protected=self.protected, text_index=self.text_index,
                    text_mask=self.text_mask)


def text_layout(vision_pos: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) positions of the tokens after each sample's last vision token, left-aligned, and a
    mask of the real ones (left padding puts every sample's end at seq_len - 1)."""
    start = vision_pos.reshape(vision_pos.shape[0], -1).amax(1) + 1          # (B,)
    count = seq_len - start
    t = max(int(count.max()), 1)
    ar = torch.arange(t)
    mask = ar[None] < count[:, None]
    index = torch.where(mask, start[:, None] + ar[None], torch.full_like(mask, seq_len - 1, dtype=torch.long))
    return index, mask


def vision_layout(is_image: torch.Tensor) -> torch.Tensor | None:
    """(B, images, tokens) positions of the vision tokens, from a (B, S) image-token mask; None
    when there are none. Runs of consecutive image tokens are images."""
    counts = is_image.sum(1)
    if int(counts.max()) == 0:
        return None
    if not bool((counts == counts[0]).all()):
        raise InputError(f"samples carry different numbers of vision tokens {counts.tolist()}; "
                         "a batch needs the same images-per-sample and image size so budgets stay rectangular")
    b, s = is_image.shape
    pos = torch.arange(s, device=is_image.device).expand(b, s)[is_image].reshape(b, -1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    n_img = starts.sum(1)
    if not bool((n_img == n_img[0]).all()) or pos.shape[1] % int(n_img[0]):
        raise InputError("images in the batch have different token counts; batch images of one size together")
    n = int(n_img[0])
    return pos.reshape(b, n, pos.shape[1] // n)


def check_budgets(results, tokens_per_image: int) -> None:
    """Integer budgets larger than the vision tokens an image has at that point fail, before work."""
    follow_budgets(BudgetStep.of_results(results), tokens_per_image, "of this prompt")


class PrunedModel:
    def __init__(self, model, program: Program, pipeline: list, base: Program, attention: str = "sdpa",
                 linear: str = "aten"):
        self.model = model
        self.program = program          # the rewritten stages
        self.base = base                # the captured, unpruned stages (text-only prompts)
        self.pipeline = pipeline
        self.family = program.family
        decode = program.stages["decode"].copy()       # the program keeps its captured decode step
        self.decode_gm = shrink_kv(decode.gm, read_anatomy(decode.gm, "decode", self.family.model_class))
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
        self.executables = {k: self._lower(getattr(program.stages.get(k), "gm", None)) for k in ("vision", "prefill")}
        self.decode_exec = self._lower(self.decode_gm, attention="sdpa")
        if linear == "packed" and not self.packed_linears:
            from graphprune.targets.packed_linear import MIN_ELEMENTS
            warnings.warn(f'linear="packed": no linear weight of this model has {MIN_ELEMENTS} elements or more, '
                          "where packing starts to pay; every graph keeps aten.linear", RuntimeWarning, stacklevel=3)

    def _lower(self, gm: torch.fx.GraphModule | None, attention: str | None = None) -> torch.fx.GraphModule | None:
        """gm itself, or a copy with flash-attn as its attention and/or oneDNN-packed linear weights."""
        attention = attention or self.attention
        if gm is None or (attention != "flash" and self.linear != "packed"):
            return gm
        low = torch.fx.GraphModule(gm, gm.graph.__deepcopy__())
        low.meta.update(gm.meta)
        if attention == "flash":
            from graphprune.targets.flash import use_flash_attention
            use_flash_attention(low)
        if self.linear == "packed":
            from graphprune.targets.packed_linear import pack_linear_weights
            self.packed_linears += pack_linear_weights(low)
        return low

    # -- prompt preparation -----------------------------------------------------------------
    def _layout(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        return vision_layout(input_ids == self.family.image_token_id())

    def _image_features(self, pixel_values, image_grid_thw, vision_pos, input_ids):
        """Features (B, n, k, D) and what the vision stage kept: original patch indices, validity
        and key set (images, k) each, or None when it kept every patch."""
        b, n, v = vision_pos.shape
        vision = self.program.stages["vision"]
        if vision.gm is None:
            feats = self.family.image_features(pixel_values, image_grid_thw)
            return feats.reshape(b, n, -1, feats.shape[-1]), None, None, None
        if pixel_values is None:
            raise InputError("the prompt has image tokens but no pixel_values were given")
        if pixel_values.shape[0] != b * n:
            raise InputError(f"{pixel_values.shape[0]} images for {b} samples x {n} image blocks")
        inputs = {"pixel_values": pixel_values}
        names = {p.name for p in vision.gm.graph.find_nodes(op="placeholder")}
        if "text_embeds" in names:     # text-guided vision passes: each image sees its sample's instruction
            text_index, text_mask = text_layout(vision_pos, input_ids.shape[1])
            emb = self.family.embed(input_ids.gather(1, text_index))
            inputs["text_embeds"] = emb.repeat_interleave(n, 0)
            inputs["text_mask"] = text_mask.repeat_interleave(n, 0)
        outs = _call(self.executables["vision"], **inputs)
        feats = outs["features"]
        return (feats.reshape(b, n, -1, feats.shape[-1]), outs.get("patches_kept"), outs.get("patches_valid"),
                outs.get("patches_protected"))

    def _prompt(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None,
                mm_token_type_ids=None) -> _Prompt | None:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        vision_pos = self._layout(input_ids)
        if vision_pos is None:
            return None
        b, n, v = vision_pos.shape
        check_budgets(self.results, v)
        positions = self.family.positions(input_ids, attention_mask, image_grid_thw=image_grid_thw,
                                          mm_token_type_ids=mm_token_type_ids)
        feats, kept, valid, protected = self._image_features(pixel_values, image_grid_thw, vision_pos, input_ids)
        index = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        if kept is not None:                     # a vision-stage pass kept (or merged into) k of v patches
            k = kept.shape[-1]
            chosen = vision_pos.gather(2, kept.reshape(b, n, k))
            keep, new_pos = tokenops._apply_choice(vision_pos, chosen, index, n * k)
            input_ids, attention_mask, index = (t.gather(1, keep) for t in (input_ids, attention_mask, index))
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
        return _Prompt.assemble(self.family.embed(input_ids), feats, positions, attention_mask, vision_pos, index,
                                self.pipeline, protected, kept)

    def _vision_positions(self) -> str:
        for r in self.results:
            if r.info["stage"] == "vision":
                return r.info["positions"]
        return "keep"

    # -- prefill ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 mm_token_type_ids=None, **unused) -> PrunedOutput:
        return self.forward(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, **unused)

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                mm_token_type_ids=None, **unused) -> PrunedOutput:
        if unused:
            raise InputError(f"unexpected inputs {sorted(unused)}")
        input_ids, attention_mask = check_model_inputs(self.family, input_ids, attention_mask, pixel_values,
                                                       image_grid_thw, mm_token_type_ids)
        prompt = self._prompt(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids)
        if prompt is None:                      # text-only prompt: nothing to prune
            gm = self.base.stages["prefill"].gm
            positions = self.family.positions(input_ids, attention_mask)
            embeds = self.family.embed(input_ids)
            outs = _call(gm, inputs_embeds=embeds, position_ids=positions, attention_mask=attention_mask)
            index = torch.arange(input_ids.shape[1]).expand_as(input_ids)
            note = "text-only prompt (no vision tokens): ran unpruned"
            return self._finish(outs, attention_mask, positions, index, None, [note], attention_mask.sum(1))
        outs = _call(self.executables["prefill"], **prompt.prefill_inputs())
        return self._finish(outs, prompt.attention_mask, prompt.position_ids, prompt.index, prompt, [],
                            attention_mask.sum(1))

    def _finish(self, outs, attention_mask, positions, index, prompt, notes, prompt_tokens) -> PrunedOutput:
        seq = torch.arange(attention_mask.shape[1]).expand_as(attention_mask)
        cache, layer_index, layer_valid = KVCache(), seq, None
        for i in range(self.num_layers):
            layer_index = outs.get(f"tokens_from_layer_{i}", layer_index)
            layer_valid = outs.get(f"valid_from_layer_{i}", layer_valid)
            own_index = outs.get(f"kv_tokens_{i}", layer_index)          # output-aware cache cuts
            own_valid = outs.get(f"kv_valid_{i}", layer_valid if own_index is layer_index else None)
            mask = attention_mask.gather(1, own_index)
            if own_valid is not None:
                mask = mask * own_valid.to(mask.dtype)
            cache.append(LayerCache(outs[f"k_{i}"], outs[f"v_{i}"], mask, index.gather(1, own_index)))
        kept = index.gather(1, layer_index)
        vision = 0 if prompt is None else prompt.vision_pos.shape[1] * prompt.vision_pos.shape[2]
        self.report = Report.build(self, cache, vision, prompt, notes, prompt_tokens)
        if self.report.pruned_nothing and prompt is not None and self.pipeline:
            warnings.warn(f"{self.report.pipeline} pruned nothing on this prompt: every layer ran on every "
                          "prompt token (report.pruned_nothing)", NothingPrunedWarning, stacklevel=3)
        return PrunedOutput(outs["logits"], cache, positions, kept, self.report)

    # -- decode ---------------------------------------------------------------------------
    def decode_step(self, cache: KVCache, token: torch.Tensor, position: torch.Tensor):
        """One greedy-decode step through the per-layer caches: `token` (B,) at `position` (B, 1) ->
        (next-token logits (B, V), the cache with this token appended). `generate` loops over it."""
        embeds = self.family.embed(token[:, None])
        args = {"inputs_embeds": embeds, "position_ids": position}
        for i, c in enumerate(cache):
            args[f"past_{2 * i}"], args[f"past_{2 * i + 1}"] = c.keys, c.values
            args[f"kv_mask_{i}"] = torch.cat([c.mask, torch.ones_like(c.mask[:, :1])], 1)
        outs = _call(self.decode_exec, **args)
        return outs["logits"][:, -1], cache.append_step([outs[k] for k in self.decode_gm.meta["graphprune_outputs"][1:]])

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

    def _static_loop(self, cache: KVCache, max_new_tokens: int):
        """A decode step over per-layer buffers sized to what each layer kept + the tokens to generate."""
        lengths = cache.lengths()

        def grow(x, dim):
            pad = list(x.shape)
            pad[dim] = max_new_tokens
            return torch.cat([x, x.new_zeros(pad)], dim)
        keys, values = [grow(c.keys, 2) for c in cache], [grow(c.values, 2) for c in cache]
        masks = [grow(c.mask, 1) for c in cache]
        gm = self._static_graph()
        if self._static_fn is None:                  # eager: lowered like the dynamic decode step
            self._static_fn = self._lower(gm, attention="sdpa")
        step_fn = self._static_fn
        names = [n.name for n in gm.graph.find_nodes(op="placeholder")]

        def step(token, position, t):
            args = {"inputs_embeds": self.family.embed(token[:, None]), "position_ids": position,
                    "kv_write_pos": torch.tensor([n + t for n in lengths])}
            for i in range(len(lengths)):
                masks[i][:, lengths[i] + t] = 1
                args[f"past_{2 * i}"], args[f"past_{2 * i + 1}"], args[f"kv_mask_{i}"] = keys[i], values[i], masks[i]
            out = step_fn(*[args[n] for n in names])
            return out[0][:, -1]

        def final_cache(steps):
            done = KVCache()
            for i, c in enumerate(cache):
                n = lengths[i] + steps
                new = torch.full((c.index.shape[0], steps), -1, dtype=c.index.dtype)
                done.append(LayerCache(keys[i][:, :, :n], values[i][:, :, :n], masks[i][:, :n],
                                       torch.cat([c.index, new], 1)))
            return done
        return step, final_cache

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 mm_token_type_ids=None, *, max_new_tokens: int = 20, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None, static_cache: bool = False) -> torch.Tensor:
        """Greedy or sampled decoding through the per-layer caches; returns prompt + new tokens.

        static_cache=True decodes with fixed-size per-layer buffers written in place (the step's
        shapes never change: what compile_decode / CUDA graphs need)."""
        check_generate_options(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                               top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        gen = self.model.generation_config
        eos = gen.eos_token_id if eos_token_id is None else eos_token_id
        eos = set([eos] if isinstance(eos, int) else (eos or []))
        pad = pad_token_id if pad_token_id is not None else (gen.pad_token_id if gen.pad_token_id is not None else 0)
        out = self.forward(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids)
        report = self.report
        logits, cache = out.logits[:, -1], out.cache
        pos = out.positions
        next_pos = (pos.amax(dim=tuple(range(pos.dim() - 2))) if pos.dim() == 3 else pos).amax(-1, keepdim=True) + 1
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        new = []
        if static_cache:
            static_step, final_cache = self._static_loop(cache, max_new_tokens)
        for step in range(max_new_tokens):
            tok = _choose(logits, do_sample, temperature, top_k, top_p, generator)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            new.append(tok)
            done |= torch.isin(tok, torch.tensor(sorted(eos), dtype=tok.dtype)) if eos else done
            if bool(done.all()) or step + 1 == max_new_tokens:
                break
            p = next_pos + step
            p = p[None].expand(3, -1, -1) if self.family.position_axes == 3 else p
            if static_cache:
                logits = static_step(tok, p, step)
            else:
                logits, cache = self.decode_step(cache, tok, p)
        if static_cache:
            cache = final_cache(len(new) - 1)
        self.report = report.with_decode(cache, len(new))
        return torch.cat([input_ids, torch.stack(new, 1)], 1)


def _choose(logits, do_sample, temperature, top_k, top_p, generator):
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


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

    def __init__(self, program: Program | None = None):
        self.program = program

    def __deepcopy__(self, memo):
        return _CapturedProgram()

    def __reduce__(self):
        return _CapturedProgram, ()

    @classmethod
    def of(cls, model) -> Program:
        held = model.__dict__.get(cls.ATTR)
        if held is None or held.program is None:
            held = cls(Program.capture(model))
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
          linear: str = "aten", **options) -> PrunedModel:
    """Prune a Hugging Face VLM with a method name (+ options), a pipeline string/TOML file, or passes.

    All options are validated, the model captured and the graphs rewritten before this returns;
    nothing runs on data until the pruned model is called. `method=None` or `[]` gives the
    unpruned captured model (useful as the baseline). `attention`: "auto" (flash-attn for the
    vision and prefill layers when it imports and the model is on CUDA, else SDPA), "sdpa", "flash".
    `linear`: "aten" (the graphs' own linears) or "packed" (float32 CPU models: weights packed once
    for oneDNN, faster and closer to proportional to the tokens kept, at twice the linear layers'
    weight memory; see graphprune.targets.packed_linear).
    """
    attention = _attention_kind(model, attention)
    _check_linear(model, linear)
    load_builtin_methods()
    passes = [] if method is None else as_passes(method, **options)
    forget_dead_graph_sources()
    if program is None:
        program = _CapturedProgram.of(model)
    _check_static_budgets(program, passes)
    rewritten = run_pipeline(program, passes, debug=debug)
    return PrunedModel(model, rewritten, passes, program, attention, linear)


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


def _check_linear(model, linear: str) -> None:
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
