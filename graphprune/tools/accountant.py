"""Cost accountant: what a pruning pipeline saves on a full-size model, without its weights.

    from graphprune.tools.accountant import account
    r = account("llava-1.5-7b", "vtw(layer=16)", text_tokens=64)
    r["totals"]["flops"], r["ratio"]["flops"], r["layers"][20]["kv_bytes"]

The model is built from a shipped config (graphprune/tools/configs/*.json, or any config JSON /
already built model) on the meta device, captured by graphprune like any other model, and
rewritten by the pipeline. The rewritten graphs are then run under FakeTensorMode
(graphprune.anatomy.cost) on inputs laid out like a real prompt, batch 1:

    [text_tokens // 2 text][vision tokens of image 1]...[vision tokens of image n][rest of the text]

Per decoder layer it reports the tokens the layer runs on, its matmul FLOPs and its KV-cache
bytes; plus the vision stage (LLaVA) and the unpruned baseline for ratios. Nothing is
computed for real, so a 7B model costs seconds (most of it the export).

FLOPs are 2 per multiply-add of linear / matmul / SDPA / conv nodes (graphprune.anatomy.cost):
causal attention is counted over the S(S+1)/2 scores a causal kernel computes, bidirectional or
key-masked attention (the vision encoder, Gemma 3 / PaliGemma groups, static-capacity slots) over
the full S x S square; norms, activations, RoPE, softmax and the small token-selection ops are not
counted.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from graphprune.errors import GraphpruneError

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32}


# -- configs and meta models ---------------------------------------------------------------------

def shipped_configs() -> list[str]:
    """Names of the configs shipped with graphprune (usable as `--config NAME`)."""
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".json"))


def config_path(name_or_path: str) -> str:
    if os.path.isfile(name_or_path):
        return name_or_path
    path = os.path.join(CONFIG_DIR, name_or_path + ("" if name_or_path.endswith(".json") else ".json"))
    if os.path.isfile(path):
        return path
    raise GraphpruneError(f"unknown config {name_or_path!r}: give a config JSON file or one of the shipped "
                          f"configs: {', '.join(shipped_configs())}")


def load_config(name_or_path: str):
    """A transformers config from a shipped config name or a config.json path."""
    from transformers import AutoConfig
    path = config_path(name_or_path)
    with open(path) as f:
        d = json.load(f)
    if "model_type" not in d:
        raise GraphpruneError(f"{path}: a Hugging Face config.json with a 'model_type' key was expected")
    try:
        return AutoConfig.for_model(**d)
    except (ValueError, TypeError) as e:
        raise GraphpruneError(f"{path}: transformers cannot build a config from it: {e}") from None


def model_class_for(config):
    """The XForConditionalGeneration class of this config, for a family graphprune reads (by model_type)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from graphprune.families import supported_model_types
    if config.model_type not in supported_model_types():
        raise GraphpruneError(f"graphprune has no model family for model_type {config.model_type!r} "
                              f"(architectures {getattr(config, 'architectures', None)}); it reads: "
                              f"{', '.join(supported_model_types())}")
    names = [a for a in (getattr(config, "architectures", None) or []) if a.endswith("ForConditionalGeneration")]
    return getattr(transformers, names[0] if names else MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[config.model_type])


def meta_model(name_or_path: str, dtype: str = "float16"):
    """The full-size model of a config on the meta device (no memory, no weights), SDPA attention."""
    cfg = load_config(name_or_path)
    cls = model_class_for(cfg)
    with torch.device("meta"):
        model = cls._from_config(cfg, attn_implementation="sdpa", dtype=_dtype(dtype))
    return model.eval()


_META: dict = {}


def meta_program(name_or_path: str, dtype: str = "float16", stages=("vision", "prefill")):
    """(model, Program) of a config on the meta device; cached per config, stages captured on demand.

    The decode stage is not needed for prefill accounting (and takes longer to export than the
    other two together), so it is only captured when asked for.
    """
    key = (os.path.abspath(config_path(name_or_path)), str(_dtype(dtype)))
    if key not in _META:
        _META[key] = (meta_model(name_or_path, dtype), None)
    model, program = _META[key]
    program = capture_stages(model, stages, program)
    _META[key] = (model, program)
    return model, program


def capture_stages(model, stages, program=None):
    """Capture the missing `stages` of model into program (a new Program when None)."""
    from graphprune.rewrite.pipeline import Program
    missing = [s for s in stages if program is None or s not in program.stages]
    new = Program.capture(model, missing)
    if program is None:
        return new
    program.stages.update(new.stages)
    program.anatomy.update(new.anatomy)
    return program


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


# -- prompt layout ---------------------------------------------------------------------------------

@dataclass
class Layout:
    """Token layout of one sample: [prefix][image 1][between]...[image n][suffix]. An "image" is a
    vision unit (an image, a video frame or a whole video: what a budget counts). A layout read off a
    real prompt gives each unit's span (`unit_spans`): gaps of any size, and separator tokens inside
    a span (image_newline rows) count as text."""
    prefix: int
    images: int
    tokens_per_image: int           # prunable vision tokens per unit
    suffix: int
    between: int = 0                # text tokens between consecutive units (synthetic layouts)
    unit_spans: tuple | None = None  # (start, end) of each unit in the prompt (layouts of real prompts)

    @property
    def length(self) -> int:
        if self.unit_spans:
            return self.unit_spans[-1][1] + self.suffix
        return self.prefix + self.suffix + self.between * max(self.images - 1, 0) + self.images * self.tokens_per_image

    @property
    def text(self) -> int:
        return self.length - self.images * self.tokens_per_image

    def spans(self) -> list[tuple[int, int]]:
        if self.unit_spans:
            return [tuple(s) for s in self.unit_spans]
        out, start = [], self.prefix
        for _ in range(self.images):
            out.append((start, start + self.tokens_per_image))
            start += self.tokens_per_image + self.between
        return out

    def to_dict(self) -> dict:
        return {"text_before": self.prefix, "vision": [list(s) for s in self.spans()],
                "text_between": self.between if not self.unit_spans else
                [b[0] - a[1] for a, b in zip(self.unit_spans, self.unit_spans[1:])],
                "text_after": self.suffix, "length": self.length}


def synthetic_layout(text_tokens: int, images: int, tokens_per_image: int) -> Layout:
    if text_tokens < 1:
        raise ValueError(f"text_tokens must be >= 1 (the last prompt token is text), got {text_tokens}")
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    if tokens_per_image < 1:
        raise ValueError(f"image tokens must be >= 1, got {tokens_per_image}")
    prefix = text_tokens // 2
    return Layout(prefix, images, tokens_per_image, text_tokens - prefix)


def layout_of(vision_units: list[dict], length: int) -> list[Layout]:
    """The layout of each sample of a processor-style prompt of `length` tokens, from the vision units
    its family finds in it (images, video frames: `graphprune inspect`'s "vision_units")."""
    out = []
    for sample in vision_units:
        units = sample["units"]
        if not units:
            out.append(Layout(length, 0, 0, 0))
            continue
        sizes = {u["tokens"] for u in units}
        if len(sizes) != 1:
            raise ValueError("vision units of different token counts cannot be costed as one layout: "
                             + ", ".join(f"{u['unit']} {u['tokens']}" for u in units))
        spans = tuple(tuple(u["span"]) for u in units)
        out.append(Layout(spans[0][0], len(units), sizes.pop(), length - spans[-1][1], unit_spans=spans))
    return out


def default_image_tokens(model) -> int:
    """Vision tokens per image entering the LLM for a 336x336 image (LLaVA: fixed by its grid)."""
    vc = model.config.vision_config
    patch = vc.patch_size
    size = getattr(vc, "image_size", None) or 336
    merge = getattr(vc, "spatial_merge_size", 1) or 1
    return (size // patch // merge) ** 2


# -- accounting ------------------------------------------------------------------------------------

def account(config_name_or_path, method: str | None = None, text_tokens: int = 64, images: int = 1, *,
            image_tokens: int | None = None, dtype: str = "float16") -> dict:
    """Per-layer tokens, prefill FLOPs and KV-cache bytes of `method` on a full-size model.

    config_name_or_path: a shipped config name ("llava-1.5-7b", "qwen2-vl-7b") or a config
    JSON path; the model is built on the meta device in `dtype` (which also sets the KV-cache
    bytes). image_tokens: vision tokens per image (Qwen2-VL; default 144, a 336x336 image);
    LLaVA's count is fixed by its patch grid.
    """
    model, program = meta_program(config_name_or_path, dtype)
    out = account_model(model, method, program=program, text_tokens=text_tokens, images=images,
                        image_tokens=image_tokens, dtype=dtype)
    out["model"] = os.path.basename(config_path(config_name_or_path))[:-5]
    return out


def account_model(model, method=None, *, program=None, layout: Layout | None = None, text_tokens: int = 64,
                  images: int = 1, image_tokens: int | None = None, dtype=None, baseline: bool = True) -> dict:
    """account() for a model object (real or meta) and an optional captured program.

    layout: the prompt layout (default: the synthetic one from text_tokens / images /
    image_tokens). dtype: of the KV cache (default: the model's).
    """
    from graphprune.lower.runtime import _check_static_budgets
    from graphprune.rewrite.pipeline import as_passes, load_builtin_methods, run_pipeline

    load_builtin_methods()
    passes = [] if method is None else as_passes(method)
    if program is None:
        program = capture_stages(model, ("vision", "prefill"))
    kv_dtype = _dtype(dtype) if dtype is not None else next(model.parameters()).dtype
    vision_anat = program.anatomy.get("vision")
    grid_tokens = vision_anat.grid[0] * vision_anat.grid[1] if vision_anat is not None and vision_anat.grid else None
    if layout is None:
        if grid_tokens is not None and image_tokens is not None and image_tokens != grid_tokens:
            raise ValueError(f"{type(model).__name__}: vision tokens per image are fixed by its "
                             f"{vision_anat.grid[0]}x{vision_anat.grid[1]} patch grid ({grid_tokens}); "
                             "image_tokens cannot change them")
        per_image = grid_tokens or image_tokens or default_image_tokens(model)
        layout = synthetic_layout(text_tokens, images, per_image)
    _check_static_budgets(program, passes)
    pruned = run_pipeline(program, passes)
    plan = _token_plan(pruned.results, layout, grid_tokens, pruned.anatomy["prefill"].num_layers)
    res = _measure(model, pruned, layout, plan, kv_dtype)
    res.update(model=type(model).__name__, model_class=type(model).__name__,
               method=" | ".join(repr(p) for p in passes) or None, dtype=str(kv_dtype).replace("torch.", ""),
               dtype_bytes=_bytes(kv_dtype), batch=1, layout=layout.to_dict())
    res["layout"]["vision_tokens_per_image_llm"] = plan["vision_llm"]
    if baseline:
        if passes:
            base = account_model(model, None, program=program, layout=layout, dtype=kv_dtype, baseline=False)
            res["baseline"] = base["totals"]
        else:
            res["baseline"] = dict(res["totals"])
        res["ratio"] = {k: (res["totals"][k] / res["baseline"][k] if res["baseline"][k] else None)
                        for k in ("flops", "llm_flops", "prefill_flops", "kv_bytes")}
    return res


def _token_plan(results, layout: Layout, grid_tokens, num_layers: int) -> dict:
    """What the accountant can check before running: the layout fits the encoder, and no pass keeps
    a data-dependent number of tokens (the graphs then have no static cost)."""
    if grid_tokens is not None and layout.tokens_per_image != grid_tokens:
        raise ValueError(f"the layout has {layout.tokens_per_image} vision tokens per image, the vision "
                         f"encoder makes {grid_tokens}")
    for r in results:
        if r.info["keep"] == "data-dependent":
            raise GraphpruneError(f"{r.info['pass']} keeps a data-dependent number of tokens, so it has no static "
                                  "cost; account it with mode='static' (a fixed capacity)")
    return {"vision_llm": layout.tokens_per_image}


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _run(gm, inputs: dict):
    """FLOPs per layer (graphprune.anatomy.cost) and fake outputs of one call of gm, by placeholder name."""
    from graphprune.anatomy.cost import run_fake
    try:
        flops, outs = run_fake(gm, **inputs)
    except KeyError as e:
        raise GraphpruneError(f"the accountant does not know how to make {e.args[0]}") from None
    return flops, dict(zip(gm.meta.get("graphprune_outputs", []), outs))


def _measure(model, pruned, layout: Layout, plan: dict, kv_dtype) -> dict:
    fam = pruned.family
    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    notes = []
    # vision stage
    vision_st = pruned.stages.get("vision")
    vision = {"captured": vision_st is not None and vision_st.gm is not None}
    if vision["captured"]:
        vc = model.config.vision_config
        px = torch.empty(layout.images, vc.num_channels, vc.image_size, vc.image_size, device=device, dtype=dtype)
        vin = {"pixel_values": px}
        if "text_embeds" in {n.name for n in vision_st.gm.graph.find_nodes(op="placeholder")}:
            width = fam.text_config().hidden_size
            vin.update(text_embeds=torch.empty(layout.images, max(layout.suffix, 1), width, device=device, dtype=dtype),
                       text_mask=torch.ones(layout.images, max(layout.suffix, 1), device=device, dtype=torch.bool))
        vflops, vouts = _run(vision_st.gm, vin)
        got = int(vouts["features"].shape[1])
        plan["vision_llm"] = got
        vision.update(images=layout.images, tokens_out=got, flops=sum(vflops.values()),
                      flops_encoder=sum(v for k, v in vflops.items() if isinstance(k, int)),
                      flops_projector=vflops.get("head", 0), flops_other=vflops.get("other", 0))
    else:
        vision.update(reason=vision_st.eager if vision_st is not None else "not captured", flops=0)
        notes.append("vision encoder runs eagerly (not captured): its FLOPs are not counted; totals are the "
                     "LLM prefill only")
    # prefill
    v = plan["vision_llm"]
    s = layout.text + layout.images * v
    hidden = fam.text_config().hidden_size
    pos = torch.empty(1, s, device=device, dtype=torch.long)
    if fam.position_axes > 1:
        pos = torch.empty(fam.position_axes, 1, s, device=device, dtype=torch.long)
    inputs = {"inputs_embeds": torch.empty(1, s, hidden, device=device, dtype=dtype), "position_ids": pos,
              "attention_mask": torch.empty(1, s, device=device, dtype=torch.long),
              "vision_pos": torch.empty(1, layout.images, v, device=device, dtype=torch.long),
              "vision_protected": None,
              "text_index": torch.empty(1, max(layout.suffix, 1), device=device, dtype=torch.long),
              "text_mask": torch.empty(1, max(layout.suffix, 1), device=device, dtype=torch.bool)}
    pflops, pouts = _run(pruned.stages["prefill"].gm, inputs)
    rows, kv_total = [], 0
    n = pruned.anatomy["prefill"].num_layers
    ran_on = s
    for i in range(n):
        k = pouts[f"k_{i}"]
        if f"tokens_from_layer_{i}" in pouts:
            ran_on = int(pouts[f"tokens_from_layer_{i}"].shape[1])
        kv_heads, kv_len, head_dim = int(k.shape[1]), int(k.shape[2]), int(k.shape[3])
        kv = 2 * kv_heads * head_dim * kv_len * _bytes(kv_dtype)
        kv_total += kv
        rows.append({"layer": i, "tokens": ran_on, "vision_tokens": ran_on - layout.text, "kv_tokens": kv_len,
                     "flops": pflops.get(i, 0), "kv_bytes": kv})
    llm = sum(r["flops"] for r in rows)
    head = pflops.get("head", 0)
    other = sum(f for k, f in pflops.items() if not isinstance(k, int) and k != "head")
    prefill = llm + head + other
    totals = {"llm_flops": llm, "head_flops": head, "other_flops": other, "prefill_flops": prefill,
              "vision_flops": vision["flops"], "flops": prefill + vision["flops"], "kv_bytes": kv_total,
              "tokens_in": s, "tokens_out": rows[-1]["tokens"] if rows else s}
    notes.append("FLOPs: 2 per multiply-add of linear/matmul/SDPA/conv; causal attention over the S(S+1)/2 "
                 "scores a causal kernel computes, other attention over the full S x S square; norms, activations, "
                 "RoPE and token selection not counted")
    notes.append("head_flops: lm_head over every kept prompt position, as HF prefill computes it")
    notes.append(f"KV bytes: 2 (k, v) x kv_heads x head_dim x tokens x {_bytes(kv_dtype)} bytes "
                 f"({str(kv_dtype).replace('torch.', '')}), batch 1")
    return {"vision": vision, "layers": rows, "totals": totals, "notes": notes,
            "kv_heads": kv_heads if rows else None, "head_dim": head_dim if rows else None}


def format_table(res: dict) -> str:
    """The per-layer cost table of an account() result, aligned for a terminal."""
    lay, t, v = res["layout"], res["totals"], res["vision"]
    per_image = lay["vision"][0][1] - lay["vision"][0][0] if lay["vision"] else 0
    fu, fs = _unit([r["flops"] for r in res["layers"]], FLOP_UNITS)
    ku, ks = _unit([r["kv_bytes"] for r in res["layers"]], BYTE_UNITS)
    lines = [f"method: {res['method'] or '(unpruned)'}   KV dtype: {res['dtype']}   batch: {res['batch']}",
             f"prompt: {lay['length']} tokens = {lay['text_before']} text + {len(lay['vision'])} image(s) x "
             f"{per_image} vision + {lay['text_after']} text"
             + (f" (+ {lay['text_between']} text between images)" if lay["text_between"] and len(lay["vision"]) > 1
                else "") + f"; vision tokens per image entering the LLM: {lay['vision_tokens_per_image_llm']}",
             f"{'layer':>5} {'tokens':>7} {'vision':>7} {fu:>10} {'KV ' + ku:>10}"]
    for r in res["layers"]:
        lines.append(f"{r['layer']:>5} {r['tokens']:>7} {r['vision_tokens']:>7} {r['flops'] / fs:>10.2f} "
                     f"{r['kv_bytes'] / ks:>10.2f}")
    lines.append(f"{'all':>5} {'':>7} {'':>7} {t['llm_flops'] / fs:>10.2f} {t['kv_bytes'] / ks:>10.2f}")
    lines.append(f"prefill: layers {_fmt(t['llm_flops'], FLOP_UNITS)} + lm_head {_fmt(t['head_flops'], FLOP_UNITS)}"
                 + (f" + other {_fmt(t['other_flops'], FLOP_UNITS)}" if t["other_flops"] else "")
                 + f" = {_fmt(t['prefill_flops'], FLOP_UNITS)}")
    if v["captured"]:
        lines.append(f"vision stage ({v['images']} image(s) -> {v['tokens_out']} tokens each): "
                     f"{_fmt(v['flops'], FLOP_UNITS)}")
    else:
        lines.append("vision stage: runs eagerly, not counted")
    lines.append(f"total: {_fmt(t['flops'], FLOP_UNITS)}; KV cache {_fmt(t['kv_bytes'], BYTE_UNITS)}")
    if res.get("ratio") and res["method"]:
        r, b = res["ratio"], res["baseline"]
        lines.append(f"vs unpruned: total {_pct(r['flops'])} of {_fmt(b['flops'], FLOP_UNITS)}, decoder layers "
                     f"{_pct(r['llm_flops'])}, KV cache {_pct(r['kv_bytes'])} of {_fmt(b['kv_bytes'], BYTE_UNITS)}")
    lines += [f"note: {n}" for n in res["notes"]]
    return "\n".join(lines)


FLOP_UNITS = [("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3), ("FLOPs", 1)]
BYTE_UNITS = [("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1)]


def _unit(values, units):
    top = max(values, default=0)
    for name, scale in units[1:]:          # table columns: at most G / Gi
        if top >= scale:
            return name, scale
    return units[-1]


def _fmt(x, units) -> str:
    for name, scale in units:
        if abs(x) >= scale:
            return f"{x / scale:.4g} {name}"
    return f"{x} {units[-1][0]}"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
