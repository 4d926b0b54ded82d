"""Fuzzing the public API (issue 17): pipeline strings, pass options, model inputs and decoding
options drawn by hypothesis. Every outcome is either a correct run or one of graphprune's own
errors whose message names what was wrong; no raw exception escapes. Correct means: the unpruned
model matches Hugging Face's logits / greedy decode, a pipeline that pruned nothing matches the
unpruned logits, and a pruned run keeps every real text token."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphprune as gp
from graphprune.errors import GraphpruneError, InputError
from graphprune.rewrite.pipeline import load_builtin_methods
from graphprune.rewrite.registry import PASSES, PIPELINES
from graphprune.tools import zoo

load_builtin_methods()

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

OPTION_NAMES = sorted({"keep", "layer", "layers", "stage", "positions", "seed", "tau", "window", "mode", "capacity",
                       "ratio", "gamma", "alpha", "criterion", "vision_pivots", "text_pivots", "dominant", "w1",
                       "iterations", "bogus"})
VALUES = st.one_of(st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([None, True, "keep", "compact", "vision", "prefill", "static", "exact", "bogus",
                                    (2,), (1, 3), (3, 2), [], 0.5, 1.0, 0.0]))
METHODS = sorted(PASSES) + sorted(PIPELINES) + ["nosuch", "__import__", "lambda"]


@st.composite
def pipeline_specs(draw):
    steps = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(METHODS))
        opts = draw(st.dictionaries(st.sampled_from(OPTION_NAMES), VALUES, max_size=3))
        body = ", ".join(f"{k}={v!r}" for k, v in opts.items())
        steps.append((name, opts, draw(st.sampled_from([f"{name}({body})", f"{name}({body}", f"{name}[{body}]",
                                                        f"{name}({body})" if not opts else name]))))
    sep = draw(st.sampled_from([" | ", "; ", "|", " || "]))
    return sep.join(text for _, _, text in steps), steps


def real_text_positions(ids, mask, image_id):
    return [set(((ids[b] != image_id) & mask[b].bool()).nonzero()[:, 0].tolist()) for b in range(ids.shape[0])]


def assert_correct_run(out, base, ex, model):
    """A run that pruned nothing equals the unpruned logits; any run keeps every real text token."""
    if out.report.pruned_nothing:
        torch.testing.assert_close(out.logits, base.logits, atol=1e-5, rtol=1e-5)
    text = real_text_positions(ex.input_ids, ex.attention_mask, model.config.image_token_id)
    last = out.cache[-1]
    for b in range(ex.input_ids.shape[0]):
        kept = set(last.index[b][last.mask[b].bool()].tolist())
        assert text[b] <= kept, f"sample {b} lost text tokens {sorted(text[b] - kept)}"
    assert torch.isfinite(out.logits).all()


def assert_names_something(err, candidates):
    msg = str(err)
    assert any(c and c in msg for c in candidates), f"{type(err).__name__}: {msg!r} names none of {candidates}"


@pytest.fixture(scope="module")
def llava_case(llava):
    model, program = llava
    ex = zoo.llava_example(model, batch=2, pad=(0, 2), seed=5)
    base = gp.prune(model, program=program)(**ex.as_kwargs())
    return model, program, ex, base


@FUZZ
@given(pipeline_specs())
def test_fuzz_pipeline_strings(llava_case, drawn):
    model, program, ex, base = llava_case
    spec, steps = drawn
    try:
        pruned = gp.prune(model, spec, program=program)
        out = pruned(**ex.as_kwargs())
    except GraphpruneError as e:
        candidates = [spec[:40]] + [n for n, _, _ in steps] + [k for _, o, _ in steps for k in o]
        candidates += [f"{k}={v!r}" for _, o, _ in steps for k, v in o.items()] + ["empty step", "pipeline"]
        assert_names_something(e, candidates)
        return
    assert_correct_run(out, base, ex, model)


@FUZZ
@given(method=st.sampled_from(sorted(PASSES) + sorted(PIPELINES)),
       options=st.dictionaries(st.sampled_from(OPTION_NAMES), VALUES, max_size=4))
def test_fuzz_method_options(llava_case, method, options):
    model, program, ex, base = llava_case
    try:
        out = gp.prune(model, method, program=program, **options)(**ex.as_kwargs())
    except GraphpruneError as e:
        assert_names_something(e, [method] + list(options) + [f"{k}={v!r}" for k, v in options.items()])
        return
    assert_correct_run(out, base, ex, model)


@st.composite
def llava_inputs(draw, model):
    """Processor-like inputs, then at most a few mutations; returns (kwargs, what must be in the error or None)."""
    batch = draw(st.integers(1, 3))
    pads = tuple(draw(st.lists(st.integers(0, 4), min_size=batch, max_size=batch)))
    ex = zoo.llava_example(model, batch=batch, pad=pads, seed=draw(st.integers(0, 3)),
                           images_per_sample=draw(st.sampled_from([1, 1, 2])))
    ids, mask, px = ex.input_ids.clone(), ex.attention_mask.clone(), ex.pixel_values.clone()
    image_id = model.config.image_token_id
    expect = None
    kind = draw(st.sampled_from(["ok", "ok", "mask_dtype", "right_pad", "drop_image_tokens", "split_block",
                                 "pixel_nan", "pixel_size", "pixel_dtype", "ids_dtype", "ids_1d", "no_pixels",
                                 "stray_image_token", "mask_value"]))
    if kind == "mask_dtype":
        mask = mask.to(draw(st.sampled_from([torch.bool, torch.int32, torch.float32, torch.float64])))
    elif kind == "right_pad":
        n = draw(st.integers(1, 3))
        ids = torch.cat([ids, torch.zeros(batch, n, dtype=ids.dtype)], 1)
        mask = torch.cat([mask, torch.zeros(batch, n, dtype=mask.dtype)], 1)
        expect = "left"
    elif kind in ("drop_image_tokens", "split_block"):
        row = ids[0]
        pos = (row == image_id).nonzero()[:, 0]
        at = int(pos[draw(st.integers(1, len(pos) - 1))])
        if kind == "drop_image_tokens":
            keep = torch.ones(ids.shape[1], dtype=torch.bool)
            keep[at] = False
            ids, mask = ids[:, keep], mask[:, keep]
            expect = "image tokens"
        else:
            filler = torch.full((batch, 2), 7, dtype=ids.dtype)
            ids = torch.cat([ids[:, :at], filler, ids[:, at:]], 1)
            mask = torch.cat([mask[:, :at], mask[:, at:at + 1].expand(batch, 2), mask[:, at:]], 1)
            expect = "contiguous"
    elif kind == "pixel_nan":
        px.view(-1)[draw(st.integers(0, px.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        expect = "NaN"
    elif kind == "pixel_size":
        size = draw(st.sampled_from([56, 70, 98, 112]))
        px = torch.randn(px.shape[0], 3, size, draw(st.sampled_from([size, 84])))
        expect = "pixel_values of shape"
    elif kind == "pixel_dtype":
        px = px.to(draw(st.sampled_from([torch.float64, torch.int64, torch.uint8])))
        expect = None if px.dtype.is_floating_point else "floating-point"
    elif kind == "ids_dtype":
        ids = ids.to(draw(st.sampled_from([torch.float32, torch.int32, torch.bool])))
        expect = None if ids.dtype == torch.int32 else "input_ids"
    elif kind == "ids_1d":
        ids, mask = ids[0], None
        expect = "input_ids"
    elif kind == "no_pixels":
        px = None
        expect = "pixel_values"
    elif kind == "stray_image_token":
        ids[-1, -1] = image_id
        expect = "image tokens"
    elif kind == "mask_value":
        mask = mask * draw(st.sampled_from([2, -1]))
        expect = "attention_mask"
    kw = dict(input_ids=ids, pixel_values=px)
    if mask is not None:
        kw["attention_mask"] = mask
    return kw, expect


@settings(FUZZ, max_examples=25)
@given(data=st.data(), spec=st.sampled_from([None, "fastv(layer=2, keep=9)", "cls_topk(keep=12)", "dart(keep=8)",
                                             "random(keep=0.5) | vtw(layer=3)"]))
def test_fuzz_model_inputs(llava, data, spec):
    model, program = llava
    kw, expect = data.draw(llava_inputs(model))
    pruned = gp.prune(model, spec, program=program)
    try:
        out = pruned(**kw)
    except InputError as e:
        assert expect is not None, f"valid input refused: {e}"
        assert expect in str(e), f"{expect!r} not in {str(e)!r}"
        return
    assert expect is None, f"bad input ({expect}) ran"
    mask = kw.get("attention_mask")
    real = (torch.ones_like(kw["input_ids"]) if mask is None else mask).bool()
    if spec is None:                            # unpruned: Hugging Face's logits at every real token
        hf = model(input_ids=kw["input_ids"].long(), attention_mask=real.long(), pixel_values=kw["pixel_values"]).logits
        torch.testing.assert_close(out.logits[real], hf[real], atol=1e-4, rtol=1e-4)
    else:
        ex = zoo.Example(kw["input_ids"].long(), real.long(), kw["pixel_values"])
        assert_correct_run(out, out, ex, model)


@FUZZ
@given(max_new_tokens=st.one_of(st.integers(-1, 4), st.floats(0, 4), st.none(), st.booleans()),
       do_sample=st.sampled_from([False, True, "yes"]),
       temperature=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-1, 2)),
       top_k=st.one_of(st.none(), st.integers(-2, 200), st.floats(0, 3)),
       top_p=st.one_of(st.none(), st.floats(-1, 2), st.just(math.nan)))
def test_fuzz_generate_options(llava_case, max_new_tokens, do_sample, temperature, top_k, top_p):
    model, program, ex, base = llava_case
    pruned = gp.prune(model, program=program)
    opts = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    stop = {} if do_sample is False else dict(eos_token_id=[])      # greedy: HF's own stopping rule
    try:
        ids = pruned.generate(**ex.as_kwargs(), **opts, generator=torch.Generator().manual_seed(0), **stop)
    except InputError as e:
        assert_names_something(e, list(opts))
        return
    if do_sample is False:                      # greedy: Hugging Face's own decode
        assert torch.equal(ids, model.generate(**ex.as_kwargs(), max_new_tokens=max_new_tokens, do_sample=False))
    else:
        assert ids.shape == (2, ex.input_ids.shape[1] + max_new_tokens)


@settings(FUZZ, max_examples=12)
@given(batch=st.integers(1, 2), pad=st.integers(0, 3), layout=st.sampled_from(["ok", "cut", "split", "right"]),
       keep=st.integers(1, 20))
def test_fuzz_qwen2vl_layouts(qwen, batch, pad, layout, keep):
    model, program = qwen
    ex = zoo.qwen2vl_example(model, batch=batch, pad=(pad,))
    ids, mask = ex.input_ids, ex.attention_mask
    img = model.config.image_token_id
    pos = (ids[-1] == img).nonzero()[:, 0]
    if layout == "cut":
        keep_cols = torch.ones(ids.shape[1], dtype=torch.bool)
        keep_cols[pos[3]] = False
        ids, mask = ids[:, keep_cols], mask[:, keep_cols]
    elif layout == "split":
        at = int(pos[5])
        ids = torch.cat([ids[:, :at], torch.full((batch, 1), 7), ids[:, at:]], 1)
        mask = torch.cat([mask[:, :at], torch.ones(batch, 1, dtype=mask.dtype), mask[:, at:]], 1)
    elif layout == "right":
        ids = torch.cat([ids, torch.zeros(batch, 2, dtype=ids.dtype)], 1)
        mask = torch.cat([mask, torch.zeros(batch, 2, dtype=mask.dtype)], 1)
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=ex.pixel_values, image_grid_thw=ex.image_grid_thw,
              mm_token_type_ids=(ids == img).int())
    try:
        out = gp.prune(model, "fastv(layer=2, keep=%d)" % keep, program=program)(**kw)
    except GraphpruneError as e:
        assert layout != "ok" or keep > 16, f"valid input refused: {e}"
        assert_names_something(e, ["image tokens", "contiguous", "left", f"keep={keep}"])
        return
    assert layout == "ok" and keep <= 16
    ref = zoo.Example(ids, mask, None)
    base = gp.prune(model, program=program)(**kw)
    assert_correct_run(out, base, ref, model)
