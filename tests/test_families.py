"""Every supported family beyond LLaVA-1.5 end to end, on tiny random-weight models with the token
layouts their processors write: keep-everything equals Hugging Face, FastV and DART equal the
independent reference (tests/reference.py runs the decoder layers by hand), batches with left
padding equal each sample alone, separators are never dropped. One row per (family, prompt kind):
adding a family adds a row to CASES."""
from __future__ import annotations

import math

import pytest
import reference as R
import reference_dart as D
import reference_families as RF
import reference_mustdrop as RM
import reference_visiontrim as RV
import torch
from checks import assert_same_run

import graphprune as gp
from graphprune.compat import rope_config, transformers_major
from graphprune.errors import InputError, UnsupportedModelError
from graphprune.families import family_of
from graphprune.rewrite.pipeline import Program
from graphprune.tools import family_zoo

STEPS = 16

# (id, family, items each sample shows in prompt order, video_unit)
CASES = [
    ("llava-2images", "llava", ("image", "image"), "frame"),         # 6x6 patches each, captured vision stage
    ("qwen2_vl-video", "qwen2_vl", ("video",), "frame"),
    ("qwen2_5_vl-image", "qwen2_5_vl", ("image",), "frame"),
    ("qwen2_5_vl-image+video", "qwen2_5_vl", ("image", "video"), "frame"),
    ("qwen2_5_vl-video-per-video", "qwen2_5_vl", ("video",), "video"),
    # (images alone: test_qwen3_vl_deepstack_adds_follow_the_kept_tokens; videos alone: test_evs)
    # each video frame its own <t seconds> <|vision_start|> ... <|vision_end|> block; DeepStack at LM layers 0, 1
    ("qwen3_vl-image+video", "qwen3_vl", ("image", "video"), "frame"),
    ("llava_next-anyres", "llava_next", ("image",), "frame"),
    ("llava_onevision-video", "llava_onevision", ("video",), "frame"),
    # an image (8x8 base + 8 rows of 14 = 176 tokens) and an 11-frame video counted per video (11 x 4x4 pooled)
    ("llava_onevision-image+video-per-video", "llava_onevision", ("image", "video"), "video"),
    # 16 pooled tokens per image, each image one bidirectional attention block (token_type_ids)
    ("gemma3-2images", "gemma3", ("image", "image"), "frame"),
]
IDS = [c[0] for c in CASES]
NO_SEPARATORS = ("llava", "video_llava", "paligemma")     # their processors write placeholders only

_MODELS: dict = {}


def _model(family):
    if family == "qwen3_vl":
        import transformers
        if not hasattr(transformers, "Qwen3VLForConditionalGeneration"):
            pytest.skip(f"Qwen3-VL is newer than transformers {transformers.__version__}")
    if family not in _MODELS:
        model = family_zoo.build(family)
        _MODELS[family] = (model, Program.capture(model))
    return _MODELS[family]


def _example(model, items, batch=2, pad=(0, 2)):
    # mixed prompts counted per video: as many frames as make a video the size of the image
    frames = {"llava_onevision": 11, "llava_next_video": 12}.get(model.config.model_type, 4) if len(items) > 1 else 4
    return family_zoo.example(model, batch=batch, pad=pad, items=items, frames=frames)


def _hf_logits(model, ex):
    kw = ex.as_kwargs()
    if family_of(model).position_axes == 1:               # generate()'s positions for left padding
        # (PaliGemma's prepare_inputs_for_generation adds 1: its positions count from 1)
        kw["position_ids"] = (ex.attention_mask.cumsum(-1) - 1).clamp(min=0) + (model.config.model_type == "paligemma")
    with torch.no_grad():
        return model(**kw).logits


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_keep_everything_equals_hf(case):
    _, family, items, unit = case
    model, program = _model(family)
    ex = _example(model, items)
    pruned = gp.prune(model, None, program=program, video_unit=unit)
    out = pruned(**ex.as_kwargs())
    real = ex.attention_mask.bool()
    torch.testing.assert_close(out.logits[real], _hf_logits(model, ex)[real], atol=1e-5, rtol=1e-5)
    ids = pruned.generate(**ex.as_kwargs(), max_new_tokens=STEPS, eos_token_id=[])
    with torch.no_grad():
        hf = model.generate(**ex.as_kwargs(), max_new_tokens=STEPS, do_sample=False, eos_token_id=None,
                            min_new_tokens=STEPS)
    assert torch.equal(ids[:, -STEPS:], hf[:, -STEPS:])


BEAM_CASES = ["qwen2_vl-video", "qwen2_5_vl-image+video", "qwen3_vl-image+video", "llava_next-anyres",
              "llava_onevision-image+video-per-video"]


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in BEAM_CASES], ids=BEAM_CASES)
def test_beam_search_repeats_each_sample_with_its_images_and_videos(case):
    """num_beams / num_return_sequences repeat every sample with its pixel rows (Qwen patch rows per
    grid, LLaVA-NeXT crops, OneVision frames) and per-item inputs (grids, image_sizes,
    second_per_grid_ts): keep-everything equals the model's own beam search."""
    _, family, items, unit = case
    model, program = _model(family)
    # transformers 4.x's own Qwen2-VL generate numbers left-padded decode steps differently (see
    # test_generation_hf): unpadded rows there
    pad = (0, 0) if family.startswith("qwen") and transformers_major() < 5 else (0, 2)
    kw = _example(model, items, pad=pad).as_kwargs()
    opts = dict(max_new_tokens=6, num_beams=2, num_return_sequences=2, do_sample=False, eos_token_id=None,
                min_new_tokens=6, return_dict_in_generate=True, output_scores=True)
    ours = gp.prune(model, None, program=program, video_unit=unit).generate(**kw, **opts)
    with torch.no_grad():
        theirs = model.generate(**kw, **opts)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores, atol=1e-5, rtol=1e-5)


def _reference(model, ex, unit, selects):
    emb, am, pos, vm = RF.family_inputs(model, ex)
    return R.lm_generate(model, emb, am, pos, selects=selects, vision_mask=vm, max_new_tokens=STEPS,
                         deepstack=RF.deepstack(model, ex), groups=RF.attention_groups(model, ex),
                         text_mask=RF.instruction_mask(model, ex)), vm


def _methods(units):
    return [("fastv", dict(layer=2, keep=5), {2: RF.fastv_units_select(5, units)}),
            ("dart", dict(layer=2, keep=6, order="score"), {2: D.dart_select(6, images=units)}),
            ("random", dict(layer=1, keep=3, seed=2), {1: D.random_select(3, seed=2, images=units)}),
            ("vtw", dict(layer=2), {2: R.vtw_select()})]


@pytest.mark.parametrize("method", ["fastv", "dart", "random", "vtw"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_llm_methods_equal_reference(case, method):
    _, family, items, unit = case
    model, program = _model(family)
    ex = _example(model, items)
    units = RF.units_of(model, ex, unit)
    name, opts, selects = next(m for m in _methods(units) if m[0] == method)
    ref, vm = _reference(model, ex, unit, selects)
    pruned = gp.prune(model, name, program=program, video_unit=unit, **opts)
    out = pruned(**ex.as_kwargs())
    assert torch.equal(out.kept, ref["keep"])                         # the kept set, every sample
    assert out.cache.lengths() == ref["kv_lens"]                      # per-layer KV lengths
    for i, c in enumerate(out.cache):
        assert torch.equal(c.mask.bool(), ref["kv_valid"][i]), f"layer {i} cache validity"
    real = out.cache[-1].mask.bool()
    torch.testing.assert_close(out.logits[real], ref["prefill_logits"][real], atol=1e-5, rtol=1e-5)
    ids = pruned.generate(**ex.as_kwargs(), max_new_tokens=STEPS, eos_token_id=[])
    assert torch.equal(ids[:, -STEPS:], ref["tokens"])
    kept_vision = vm.gather(1, out.kept).sum(1)
    assert kept_vision.tolist() == [units * opts.get("keep", 0)] * 2   # keep counts per unit (vtw: none)
    # separators (vision start/end, image_newline slots) are all kept
    seps = family_of(model).vision_layout(ex.input_ids, video_unit=unit, **_mm(ex)).separators
    for b in range(2):
        assert set(seps[b].nonzero()[:, 0].tolist()) <= set(out.kept[b].tolist())
        assert (int(seps[b].sum()) > 0) == (family not in NO_SEPARATORS)


def test_qwen3_vl_deepstack_adds_follow_the_kept_tokens():
    """FastV at layer 1 of Qwen3-VL, whose DeepStack still adds vision features to the output of layer 1
    (levels at layers 0 and 1): the pruned prefill adds level 1 at the kept tokens only, as the
    reference does. Leaving level 1 out changes the result, so the adds after the cut are exercised.
    On a prompt of images alone (the model's image-only DeepStack branch): keep-everything = HF too."""
    model, program = _model("qwen3_vl")
    ex = _example(model, ("image", "image"))
    real = ex.attention_mask.bool()
    torch.testing.assert_close(gp.prune(model, None, program=program)(**ex.as_kwargs()).logits[real],
                               _hf_logits(model, ex)[real], atol=1e-5, rtol=1e-5)
    units = RF.units_of(model, ex)
    emb, am, pos, vm = RF.family_inputs(model, ex)
    deepstack = RF.deepstack(model, ex)
    assert deepstack.shape[0] == 2 and bool(deepstack[1][vm].abs().gt(0).all()) and not bool(deepstack[1][~vm].any())
    selects = {1: RF.fastv_units_select(4, units)}
    ref = R.lm_generate(model, emb, am, pos, selects=selects, vision_mask=vm, max_new_tokens=STEPS, deepstack=deepstack)
    pruned = gp.prune(model, "fastv", layer=1, keep=4, program=program)
    out = pruned(**ex.as_kwargs())
    assert "deepstack_embeds" in pruned.results[0].info["rerouted"]      # gathered with the kept tokens
    assert torch.equal(out.kept, ref["keep"])
    real = out.cache[-1].mask.bool()
    torch.testing.assert_close(out.logits[real], ref["prefill_logits"][real], atol=1e-5, rtol=1e-5)
    assert torch.equal(pruned.generate(**ex.as_kwargs(), max_new_tokens=STEPS, eos_token_id=[])[:, -STEPS:],
                       ref["tokens"])
    level_0_only = deepstack.clone()
    level_0_only[1] = 0
    other = R.lm_generate(model, emb, am, pos, selects=selects, vision_mask=vm, max_new_tokens=1,
                          deepstack=level_0_only)
    assert (other["prefill_logits"][real] - out.logits[real]).abs().max() > 1e-2


@pytest.mark.parametrize("family, items", [("gemma3", ("image", "image")), ("paligemma", ("image",))])
def test_bidirectional_groups_matter(family, items):
    """The attention groups change the answer on these prompts: FastV's run equals the reference with
    the family's bidirectional groups and differs from the reference without them (causal), so a lost
    or misplaced group mask fails the reference tests above."""
    model, program = _model(family)
    ex = _example(model, items)
    units = RF.units_of(model, ex)
    name, opts, selects = _methods(units)[0]
    out = gp.prune(model, name, program=program, **opts)(**ex.as_kwargs())
    emb, am, pos, vm = RF.family_inputs(model, ex)
    grouped = R.lm_generate(model, emb, am, pos, selects=selects, vision_mask=vm, max_new_tokens=1,
                            groups=RF.attention_groups(model, ex))
    causal = R.lm_generate(model, emb, am, pos, selects=selects, vision_mask=vm, max_new_tokens=1)
    real = out.cache[-1].mask.bool()
    torch.testing.assert_close(out.logits[real], grouped["prefill_logits"][real], atol=1e-5, rtol=1e-5)
    assert float((out.logits[real] - causal["prefill_logits"][real]).abs().max()) > 1e-2


def test_gemma3_without_token_type_ids_attends_causally():
    """Hugging Face's Gemma 3 attends causally when no token_type_ids are given; so does the pruned model."""
    model, program = _model("gemma3")
    ex = _example(model, ("image", "image"))
    ex.token_type_ids = None
    real = ex.attention_mask.bool()
    out = gp.prune(model, None, program=program)(**ex.as_kwargs())
    torch.testing.assert_close(out.logits[real], _hf_logits(model, ex)[real], atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match=r"token_type_ids \(2, 5\) must be a tensor shaped like input_ids"):
        gp.prune(model, None, program=program)(**ex.as_kwargs(), token_type_ids=torch.zeros(2, 5, dtype=torch.long))


def test_gemma3_runs_reaching_the_sliding_window_are_refused():
    """Its 128-token sliding window is shorter than its 512 positions: the model is accepted, and a
    run that could reach the window is refused before any work, naming both lengths."""
    model, program = _model("gemma3")
    kw = _example(model, ("image", "image")).as_kwargs()          # 57 tokens
    pruned = gp.prune(model, "fastv", layer=2, keep=5, program=program)
    with pytest.raises(InputError, match="spans 185 tokens .* attend within 128"):
        pruned.generate(**kw, max_new_tokens=128, eos_token_id=[])
    with pytest.raises(InputError, match="spans 130 tokens"):
        pruned(input_ids=torch.randint(3, 140, (1, 130)))


MUSTDROP_CASES = ["llava-2images", "qwen2_vl-video", "qwen2_5_vl-image+video", "qwen3_vl-image+video", "llava_next-anyres", "llava_onevision-video",
                  "gemma3-2images"]


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in MUSTDROP_CASES], ids=MUSTDROP_CASES)
def test_mustdrop_filter_and_cache_equal_reference(case):
    """MustDrop's LLM stages on each kind of unit: the dual-attention filter at layers 2 and 3 (static
    capacity 4 per unit, the rule's validity kept as key masks) and the output-aware cache over
    layers 1..2, against the reference filter run by hand (tests/reference_mustdrop.py)."""
    _, family, items, unit = case
    model, program = _model(family)
    ex = _example(model, items)
    units = RF.units_of(model, ex, unit)
    sel = RM.filter_select(1 / 16, 1.0, "static", 4, images=units)
    emb, am, pos, vm = RF.family_inputs(model, ex)
    ref = R.lm_generate(model, emb, am, pos, selects={2: sel, 3: sel}, cut_to_final=(1, 3), vision_mask=vm,
                        max_new_tokens=STEPS, deepstack=RF.deepstack(model, ex), groups=RF.attention_groups(model, ex),
                        text_mask=RF.instruction_mask(model, ex))
    pruned = gp.prune(model, "mustdrop_filter(layers=(2, 3), gamma=0.0625, alpha=1.0, mode='static', capacity=4, "
                             "placement='before', positions='keep') | mustdrop_cache(layers=(1, 3), placement='before')",
                      program=program, video_unit=unit)
    out = assert_same_run(pruned, ex, ref, STEPS, kept=ref["keep"])
    for i, c in enumerate(out.cache):
        assert torch.equal(c.mask.bool(), ref["kv_valid"][i]), f"layer {i} cache validity"
    assert vm.gather(1, out.kept).sum(1).tolist() == [units * 4] * 2        # capacity 4 slots per unit
    assert not bool(out.cache[3].mask.bool().all())                          # the rule invalidated some


# units that are square patch grids: LLaVA-1.5's 6 x 6, the others 4 x 4 (Gemma 3: its 8 x 8 patches
# average-pooled)
VISIONTRIM_CASES = ["llava-2images", "qwen2_vl-video", "qwen2_5_vl-image+video", "qwen3_vl-image+video", "llava_onevision-video", "gemma3-2images"]


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in VISIONTRIM_CASES], ids=VISIONTRIM_CASES)
def test_visiontrim_llm_equals_reference_on_unit_grids(case):
    """VisionTrim between LLM layers where each unit is a full patch grid (a Qwen image or video frame
    after the 2 x 2 merge, a OneVision pooled frame): 3 dominant tokens by DVTS and 2 text-guided
    cluster centres per unit, merged in place, against tests/reference_visiontrim.py."""
    _, family, items, unit = case
    model, program = _model(family)
    ex = _example(model, items)
    emb, am, pos, vm = RF.family_inputs(model, ex)
    grid = math.isqrt(int(vm[0].sum()) // RF.units_of(model, ex, unit))
    ref = R.lm_generate(model, emb, am, pos, selects={2: RV.visiontrim_llm_select(5, grid=grid)}, vision_mask=vm,
                        max_new_tokens=STEPS, deepstack=RF.deepstack(model, ex), groups=RF.attention_groups(model, ex),
                        text_mask=RF.instruction_mask(model, ex))
    pruned = gp.prune(model, "visiontrim", program=program, keep=5, stage="llm", layer=2, video_unit=unit)
    assert_same_run(pruned, ex, ref, STEPS, kept=ref["keep"])


def check_visiontrim_llm_refuses(case, why, **example):
    """visiontrim_llm on a prompt whose units are not one square patch grid each stops before any work,
    saying why, rather than laying their tokens on a wrong grid."""
    _, family, items, unit = case
    model, program = _model(family)
    ex = family_zoo.example(model, batch=2, pad=(0, 2), items=items, **example) if example else _example(model, items)
    pruned = gp.prune(model, "visiontrim", program=program, keep=5, stage="llm", layer=2, video_unit=unit)
    with pytest.raises(InputError, match=why):
        pruned(**ex.as_kwargs())
    assert pruned.report is None                      # no prefill ran


@pytest.mark.parametrize("case, why", [
    ("llava_next-anyres", "LlavaNextForConditionalGeneration's image 0 is its base view's patch grid followed by "
                          "its anyres crops' rows"),
    ("qwen2_5_vl-video-per-video", r"video 0 is 2 frames' grids one after another \(video_unit='video'\)")],
    ids=["llava_next-anyres", "qwen2_5_vl-video-per-video"])
def test_visiontrim_llm_refuses_units_that_are_not_one_grid(case, why):
    check_visiontrim_llm_refuses(next(c for c in CASES if c[0] == case), why)


def test_visiontrim_llm_refuses_a_square_count_of_a_non_square_grid():
    # a 4 x 16 patch image merges to 2 x 8 = 16 tokens: a square count, not a square grid
    check_visiontrim_llm_refuses(next(c for c in CASES if c[0] == "qwen2_5_vl-image"),
                                 "Qwen2_5_VLForConditionalGeneration's image 0 is a 2 x 8 token grid",
                                 grid=(4, 16))


def _mm(ex):
    return {k: v for k, v in ex.as_kwargs().items() if k not in ("input_ids", "attention_mask")}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_batch_equals_samples_alone(case):
    _, family, items, unit = case
    model, program = _model(family)
    ex = _example(model, items)
    pruned = gp.prune(model, "fastv", layer=2, keep=5, program=program, video_unit=unit)
    batch = pruned(**ex.as_kwargs())
    ids = pruned.generate(**ex.as_kwargs(), max_new_tokens=8, eos_token_id=[])
    for b in range(2):
        one = ex.sample(b)
        alone = pruned(**one.as_kwargs())
        real = batch.cache[-1].mask[b].bool()
        torch.testing.assert_close(batch.logits[b][real], alone.logits[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(ids[b, -8:], pruned.generate(**one.as_kwargs(), max_new_tokens=8, eos_token_id=[])[0, -8:])


def test_layout_units_and_separators():
    model, _ = _model("qwen2_5_vl")
    ex = _example(model, ("image", "video"))
    fam = family_of(model)
    per_frame = fam.vision_layout(ex.input_ids, **_mm(ex))
    assert per_frame.units == ("image 0", "video 0 frame 0", "video 0 frame 1")
    per_video = None
    with pytest.raises(InputError, match="different token counts"):     # image 16 tokens, video 32
        per_video = fam.vision_layout(ex.input_ids, video_unit="video", **_mm(ex))
    assert per_video is None
    cfg = model.config
    starts = (ex.input_ids == cfg.vision_start_token_id) | (ex.input_ids == cfg.vision_end_token_id)
    assert torch.equal(per_frame.separators, starts)
    model, _ = _model("llava_next")
    ex = _example(model, ("image",))
    lay = family_of(model).vision_layout(ex.input_ids, **_mm(ex))
    _, _, _, vm = RF.family_inputs(model, ex)
    assert torch.equal(lay.separators, (ex.input_ids == cfg.image_token_id) & ~vm)
    assert lay.pos.shape == (2, 1, 16 + 4 * 8)            # base 4x4 + 4 unpadded rows of 8 (+ newline each)


def test_qwen3_vl_frames_are_blocks_between_time_stamps():
    """Qwen3-VL writes each video frame as its own <|vision_start|> ... <|vision_end|> block after a
    time stamp (text): the units still come from video_grid_thw, a frame per unit or the video whole."""
    model, _ = _model("qwen3_vl")
    ex = _example(model, ("image", "video"))
    fam, cfg = family_of(model), model.config
    per_frame = fam.vision_layout(ex.input_ids, **_mm(ex))
    assert per_frame.units == ("image 0", "video 0 frame 0", "video 0 frame 1")
    for b in range(2):
        for unit in per_frame.pos[b]:
            assert torch.equal(unit, torch.arange(int(unit[0]), int(unit[0]) + 16))
            assert [int(ex.input_ids[b, unit[0] - 1]), int(ex.input_ids[b, unit[-1] + 1])] == \
                [cfg.vision_start_token_id, cfg.vision_end_token_id]
        between = ex.input_ids[b, per_frame.pos[b, 1, -1] + 2:per_frame.pos[b, 2, 0] - 1]
        assert between.tolist() == family_zoo._seconds_text(1.25)          # frame 1: frames 2, 3 at 2 fps
    markers = (ex.input_ids == cfg.vision_start_token_id) | (ex.input_ids == cfg.vision_end_token_id)
    assert torch.equal(per_frame.separators, markers) and int(markers[0].sum()) == 6
    per_video = fam.vision_layout(ex.input_ids, video_unit="video", modalities=("video",), **_mm(ex))
    assert per_video.units == ("video 0",) and per_video.frames.tolist() == [[2], [2]]
    assert torch.equal(per_video.pos[:, 0], per_frame.pos[:, 1:].flatten(1))


def test_bad_video_inputs_fail_before_work():
    model, program = _model("qwen2_5_vl")
    ex = _example(model, ("video",))
    pruned = gp.prune(model, "fastv", layer=2, keep=5, program=program)
    kw = ex.as_kwargs()
    kw["video_grid_thw"] = kw["video_grid_thw"].clone()
    kw["video_grid_thw"][:, 0] = 3
    with pytest.raises(InputError, match="video_grid_thw"):
        pruned(**kw)
    with pytest.raises(InputError, match="video_unit"):
        gp.prune(model, "fastv", program=program, video_unit="clip")
    llava_next, program = _model("llava_next")
    with pytest.raises(InputError, match="unexpected inputs.*pixel_values_videos"):
        gp.prune(llava_next, None, program=program)(**_example(llava_next, ("image",)).as_kwargs(),
                                                      pixel_values_videos=torch.zeros(1))


def _tiny(cls_name, config_name, **cfg):
    import transformers
    config = getattr(transformers, config_name)(**cfg)
    return getattr(transformers, cls_name)(config)


def test_refused_families_say_why():
    mllama = _tiny("MllamaForConditionalGeneration", "MllamaConfig",
                   vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_global_layers=1,
                                      num_attention_heads=2, image_size=28, patch_size=14, vision_output_dim=64,
                                      intermediate_layers_indices=[0]),
                   text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=1, vocab_size=64, cross_attention_layers=[1],
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0, **rope_config(10000.0)))
    with pytest.raises(UnsupportedModelError, match="mllama.*cross-attention"):
        gp.prune(mllama, "fastv")
    import transformers
    if not hasattr(transformers, "Qwen3_5Config"):
        return                         # Qwen3.5 is newer than this transformers
    cfg = transformers.Qwen3_5Config(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    stub = torch.nn.Module()
    stub.config = cfg                  # the family is refused from the config, before any part is read
    with pytest.raises(UnsupportedModelError, match="qwen3_5.*linear_attention.*hybrid"):
        family_of(stub)
    stub.config = type("Config", (), {"model_type": "my_vlm"})()
    with pytest.raises(UnsupportedModelError, match="'my_vlm' is not a family.*llava_next.*Adding a family"):
        family_of(stub)


def test_recognised_by_model_type_not_class_name():
    from transformers import LlavaNextForConditionalGeneration
    model, _ = _model("llava_next")

    class MyLlavaNext(LlavaNextForConditionalGeneration):
        pass
    mine = MyLlavaNext(model.config)
    assert family_of(mine).name == "llava_next"
    body = family_of(model.model)                   # the body, as a torch.compile frame holds it
    assert isinstance(body.lm_head(), torch.nn.Identity) and body.language_model() is model.model.language_model


def test_inspect_shows_units_spans_and_separators(capsys):
    import json

    from graphprune.cli import main
    assert main(["inspect", "tiny-llava-next", "--no-decode", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    model, _ = _model("llava_next")
    ex = family_zoo.example(model, items=("image",))
    slots = (ex.input_ids[0] == model.config.image_token_id).nonzero()[:, 0]
    _, _, _, vm = RF.family_inputs(model, ex)
    newline = [int(i) for i in slots if not vm[0, i]]
    [sample] = d["prompt"]["vision_units"]
    assert sample["units"] == [{"unit": "image 0", "span": [int(slots[0]), int(slots[-1])], "tokens": 48}]
    assert sample["separators"] == [[i, model.config.image_token_id] for i in newline] and len(newline) == 4
    assert main(["inspect", "tiny-qwen2.5vl", "--no-decode"]) == 0
    out = capsys.readouterr().out
    assert "image 0 [7, 23) 16 tokens, video 0 frame 0 [27, 43) 16 tokens, video 0 frame 1 [43, 59) 16 tokens" in out
    assert "6 (id 148), 23 (id 149), 26 (id 148), 59 (id 149)" in out


@pytest.mark.parametrize("name,family,items", [("tiny-qwen2.5vl", "qwen2_5_vl", ("image", "video")),
                                                ("tiny-llava-onevision", "llava_onevision", ("video",))])
def test_inspect_costs_every_vision_unit(capsys, name, family, items):
    # the cost line read image-token runs only: video frames were costed as text tokens
    import json

    from graphprune.cli import main
    assert main(["inspect", name, "--no-decode", "--json", "--method", "fastv(layer=2, keep=4)"]) == 0
    d = json.loads(capsys.readouterr().out)
    model, program = _model(family)
    ex = family_zoo.example(model, items=items)
    layout = family_of(model).vision_layout(ex.input_ids, **{k: v for k, v in ex.as_kwargs().items()
                                                             if k not in ("input_ids", "attention_mask")})
    s, (units, v) = ex.input_ids.shape[1], layout.pos.shape[1:]
    expected = [s, s] + [s - units * (v - 4)] * 2
    assert [r["tokens"] for r in d["cost"]["layers"]] == expected and units > 1
    pruned = gp.prune(model, "fastv(layer=2, keep=4)", program=program)
    pruned(**ex.as_kwargs())
    assert pruned.report.tokens_per_layer == expected


def test_support_matrix_reads_junit(tmp_path):
    import support_matrix
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite>'
                   '<testcase name="test_keep_everything_equals_hf[llava_next-anyres]"/>'
                   '<testcase name="test_llm_methods_equal_reference[llava_next-anyres-dart]"><failure/></testcase>'
                   '<testcase name="test_llm_methods_equal_reference[qwen2_vl-video-fastv]"/>'
                   '<testcase name="test_visiontrim_llm_refuses_units_that_are_not_one_grid[llava_next-anyres]"/>'
                   '<testcase name="test_layout_units_and_separators"/></testsuite></testsuites>')
    table = support_matrix.results(str(xml))
    assert table == {"llava_next-anyres": {"keep-everything = HF (logits, 16 greedy tokens)": "pass",
                                           "dart = reference": "FAIL", "visiontrim_llm = reference": "refused"},
                     "qwen2_vl-video": {"fastv = reference": "pass"}}
    md = support_matrix.markdown(table)
    assert "| llava_next-anyres | pass | - | FAIL | - | - | - |" in md and "generated by" in md
