"""Tier-2 families end to end, on tiny random-weight models with the token layouts their processors
write, by the same checks as tier 1 (tests/test_families.py, whose test bodies run here on these
cases): keep-everything equals Hugging Face (fp32 logits, 16 greedy tokens), FastV / DART / random /
VTW equal the independent reference (kept sets, per-layer KV lengths, logits, 16 greedy tokens,
separators kept), a left-padded batch of 2 equals each sample alone. Plus what differs per family:
which tokens are its separators, and what the torch.compile backend does with it."""
from __future__ import annotations

import pytest
import test_families as tier1
import torch

import graphprune as gp
from graphprune.families import family_of
from graphprune.rewrite.pipeline import Program
from graphprune.tools import family_zoo

# (id, family, items each sample shows in prompt order, video_unit)
CASES = [
    ("mistral3-2images", "mistral3", ("image", "image"), "frame"),
    ("aya_vision-2images", "aya_vision", ("image", "image"), "frame"),
    # an anyres image (4x4 base + 4 rows of 8, each with a newline slot) and a 12-frame video of 2x2
    # pooled patches counted per video: 48 tokens each
    ("llava_next_video-image+video-per-video", "llava_next_video", ("image", "video"), "video"),
    # 17 tokens (4x4 patches + CLS) per image and per frame of the 4-frame video
    ("video_llava-image+video", "video_llava", ("image", "video"), "frame"),
    ("internvl-2images", "internvl", ("image", "image"), "frame"),              # 2 tiles of 16 each
    ("glm4v-2images", "glm4v", ("image", "image"), "frame"),                    # 8x8 patches merged 2x2: 16 each
    # 2 tiles and the global view of 16 tokens each per image
    ("idefics3-2images", "idefics3", ("image", "image"), "frame"),
    ("smolvlm-2images", "smolvlm", ("image", "image"), "frame"),
    ("paligemma-image", "paligemma", ("image",), "frame"),        # 16 tokens, then <bos> prompt "\n": the prefix
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_keep_everything_equals_hf(case):
    tier1.test_keep_everything_equals_hf(case)


@pytest.mark.parametrize("method", ["fastv", "dart", "random", "vtw"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_llm_methods_equal_reference(case, method):
    tier1.test_llm_methods_equal_reference(case, method)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_batch_equals_samples_alone(case):
    tier1.test_batch_equals_samples_alone(case)


SEPARATORS = [  # family, its marker ids in the zoo's prompts, prunable tokens per image
    ("mistral3", (family_zoo.MISTRAL3_BREAK, family_zoo.MISTRAL3_END), 12),                 # 3 rows of 4
    ("aya_vision", (family_zoo.AYA_START, family_zoo.AYA_END, family_zoo.AYA_TILE_1, family_zoo.AYA_GLOBAL), 32),
    ("internvl", (family_zoo.INTERNVL_START, family_zoo.INTERNVL_END), 32),                 # 2 tiles of 16
    ("idefics3", (family_zoo.IDEFICS3_FAKE, family_zoo.IDEFICS3_GLOBAL, family_zoo.IDEFICS3_NEWLINE,
                  *family_zoo.IDEFICS3_ROW_COL), 48),                                      # 2 tiles + global view
]


@pytest.mark.parametrize("family, markers, tokens", SEPARATORS, ids=[f[0] for f in SEPARATORS])
def test_images_and_separators_found_by_place(family, markers, tokens):
    """Markers whose ids the config does not name are found from the placeholders' layout: they are
    the separators exactly, and each image is its own unit of placeholders."""
    model, _ = tier1._model(family)
    ex = family_zoo.example(model, batch=2, pad=(0, 2), items=("image", "image"))
    layout = family_of(model).vision_layout(ex.input_ids, **tier1._mm(ex))
    ids = ex.input_ids
    assert torch.equal(layout.separators, torch.isin(ids, torch.tensor(markers)))
    assert layout.units == ("image 0", "image 1") and layout.pos.shape == (2, 2, tokens)
    assert bool((ids.gather(1, layout.pos.reshape(2, -1)) == model.config.image_token_id).all())
    first, second = layout.pos[0]
    assert not bool((ids[0, int(first[-1]) + 1:int(second[0])] == model.config.image_token_id).any())


@pytest.mark.parametrize("family", ["aya_vision", "internvl"])
def test_tiles_that_do_not_match_the_placeholders_are_refused(family):
    model, _ = tier1._model(family)
    ex = family_zoo.example(model, batch=1, items=("image", "image"))
    with pytest.raises(gp.InputError, match="64 image tokens but pixel_values holds 3 tiles of 16"):
        family_of(model).vision_layout(ex.input_ids, pixel_values=ex.pixel_values[:3])


@pytest.mark.parametrize("family, reason", [("mistral3", "IMG_BREAK"), ("aya_vision", "tiles"),
                                            ("video_llava", "two masked_scatters")])
def test_compile_backend_refuses_with_the_reason(family, reason):
    from test_dynamo import _compiled
    model, _ = tier1._model(family)
    kw = family_zoo.example(model, items=("image",)).as_kwargs()
    with pytest.raises(Exception, match=f"unsupported family for the torch.compile backend: .*{reason}"):
        with torch.no_grad():
            _compiled(model, "fastv(layer=2, keep=8)")(**kw)


def test_video_llava_takes_its_images_by_either_name():
    """Its image processor returns pixel_values_images (transformers 5.23 models also take
    pixel_values): the same run either way; both at once is refused."""
    model, program = tier1._model("video_llava")
    kw = family_zoo.example(model, batch=2, pad=(0, 2), items=("image", "video")).as_kwargs()
    pruned = gp.prune(model, "fastv", layer=2, keep=5, program=program)
    legacy = pruned(**kw)
    kw["pixel_values"] = kw.pop("pixel_values_images")
    renamed = pruned(**kw)
    assert torch.equal(legacy.kept, renamed.kept) and torch.equal(legacy.logits, renamed.logits)
    with pytest.raises(gp.InputError, match="pixel_values and pixel_values_images name the same images"):
        pruned(**kw, pixel_values_images=kw["pixel_values"])


def test_idefics3_compile_backend_refuses():
    """The backend refuses Idefics3 with its reason (compile_refused), or, where dynamo resumes the
    merge in a frame after a graph break with no module `self` to read the family from
    (transformers 5), at that graph break; the model never runs unpruned."""
    from test_dynamo import _compiled
    model, _ = tier1._model("idefics3")
    kw = family_zoo.example(model, items=("image",)).as_kwargs()
    with pytest.raises(Exception, match="could not apply fastv.*(graph break separates the image-feature merge|"
                                         "runs are tiles)"):
        with torch.no_grad():
            _compiled(model, "fastv(layer=2, keep=8)")(**kw)


@pytest.mark.parametrize("family, items, pipeline", [("internvl", ("image", "image"), "fastv(layer=2, keep=8)"),
                                                     pytest.param("internvl", ("image", "image"), "dart(layer=2, keep=8)",
                                                                  marks=pytest.mark.slow),
                                                     ("paligemma", ("image",), "fastv(layer=2, keep=8)")])
def test_compile_backend_equals_prune(family, items, pipeline):
    """Their merge frame holds every decoder layer and their image runs are their images: the
    torch.compile backend prunes them as graphprune.prune does (logits of the kept tokens, per-layer
    cache lengths); PaliGemma's prefix groups come from the frame's token_type_ids."""
    from test_dynamo import _compiled
    model, program = tier1._model(family)
    kw = family_zoo.example(model, batch=2, items=items).as_kwargs()
    want = gp.prune(model, pipeline, program=program)(**kw)
    with torch.no_grad():
        got = _compiled(model, pipeline)(**kw)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    assert [layer.keys.shape[2] for layer in got.past_key_values.layers] == want.cache.lengths()


def _windowed(family: str, window: int):
    """The tier-1/2 tiny `family` model with its LM's sliding window set to `window` tokens (LLaVA's
    Llama LM becomes the same weights as a Mistral LM, which has the window)."""
    model, _ = tier1._model(family)
    config = model.config.to_dict()
    if family == "llava":
        config["text_config"]["model_type"] = "mistral"
    config["text_config"]["sliding_window"] = window
    windowed = type(model)(model.config.__class__.from_dict(config)).eval()
    windowed.load_state_dict(model.state_dict())
    return windowed


@pytest.mark.parametrize("family", [pytest.param("llava", marks=pytest.mark.slow), "mistral3"])
def test_a_binding_sliding_window_accepts_runs_inside_it_and_refuses_longer_ones(family):
    """A window shorter than the context is accepted: inside it the model equals HF's windowed one
    (keep everything), and a run that could reach it is refused before any work, naming both lengths
    (a pruned prefill would window over original positions, a decode step over cache slots)."""
    model, _ = tier1._model(family)
    ex = family_zoo.example(model, items=("image",))
    s = ex.input_ids.shape[1]
    windowed = _windowed(family, s + 4)
    assert family_of(windowed).binding_window() == s + 4
    program = Program.capture(windowed)
    torch.testing.assert_close(gp.prune(windowed, None, program=program)(**ex.as_kwargs()).logits,
                               tier1._hf_logits(windowed, ex), atol=1e-5, rtol=0)
    pruned = gp.prune(windowed, "fastv", layer=2, keep=5, program=program)
    assert pruned.generate(**ex.as_kwargs(), max_new_tokens=3, do_sample=False).shape[1] == s + 3
    with pytest.raises(gp.InputError, match=f"spans {s + 4} tokens .* attend within {s + 4}"):
        pruned.generate(**ex.as_kwargs(), max_new_tokens=4, do_sample=False)
    # unpruned, past the window: Hugging Face's own windowed masks, captured, so its greedy tokens
    unpruned = gp.prune(windowed, None, program=program)
    want = windowed.generate(**ex.as_kwargs(), max_new_tokens=12, do_sample=False)
    assert torch.equal(unpruned.generate(**ex.as_kwargs(), max_new_tokens=12, do_sample=False), want)


def test_glm4v_videos_are_refused_up_front():
    """GLM-4.1V writes each video frame as its own image-token block with a time stamp: a layout this
    family does not read, so a video input is refused before any work, naming what it takes."""
    model, program = tier1._model("glm4v")
    kw = family_zoo.example(model, items=("image",)).as_kwargs()
    pruned = gp.prune(model, "fastv", layer=2, keep=5, program=program)
    with pytest.raises(gp.InputError, match="pixel_values_videos.*takes input_ids, attention_mask, pixel_values, "
                                            "image_grid_thw"):
        pruned(**kw, pixel_values_videos=kw["pixel_values"], video_grid_thw=kw["image_grid_thw"])


def test_idefics3_tiles_that_do_not_match_the_placeholders_are_refused():
    model, _ = tier1._model("idefics3")
    ex = family_zoo.example(model, batch=1, items=("image", "image"))
    with pytest.raises(gp.InputError, match=r"sample 0: image placeholders in runs of \[16, 16, 16, 16, 16, 16\] but "
                                            "pixel_values holds 5 tiles of 16"):
        family_of(model).vision_layout(ex.input_ids, pixel_values=ex.pixel_values.index_fill(1, torch.tensor([5]), 0))
    with pytest.raises(gp.InputError, match=r"pixel_values of shape \(6, 3, 112, 112\).*\(samples=1, tiles, C, H, W\)"):
        family_of(model).vision_layout(ex.input_ids, pixel_values=ex.pixel_values[0])


def test_paligemma_text_only_prompt_attends_over_its_prefix():
    """A prompt without images runs the unpruned prefill, which takes the attention groups too: the
    whole prefix bidirectional, as Hugging Face's PaliGemma (positions from 1)."""
    model, program = tier1._model("paligemma")
    ex = family_zoo.example(model, batch=2, pad=(0, 2), items=("image",))
    text = ex.input_ids != model.config.image_token_id
    kw = {"input_ids": ex.input_ids[text].view(2, -1), "attention_mask": ex.attention_mask[text].view(2, -1),
          "token_type_ids": ex.token_type_ids[text].view(2, -1)}
    real = kw["attention_mask"].bool()
    with torch.no_grad():
        hf = model(**kw, position_ids=(kw["attention_mask"].cumsum(-1) - 1).clamp(min=0) + 1).logits
    out = gp.prune(model, "fastv", layer=2, keep=5, program=program)(**kw)
    torch.testing.assert_close(out.logits[real], hf[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_mustdrop_filter_and_cache_equal_reference(case):
    tier1.test_mustdrop_filter_and_cache_equal_reference(case)


# units that are one square patch grid: a GLM-4.1V image (8x8 patches merged 2x2), a PaliGemma image
VISIONTRIM_CASES = ["glm4v-2images", "paligemma-image"]


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in VISIONTRIM_CASES], ids=VISIONTRIM_CASES)
def test_visiontrim_llm_equals_reference_on_unit_grids(case):
    tier1.test_visiontrim_llm_equals_reference_on_unit_grids(case)


NOT_GRIDS = [  # case, why its units are not one square patch grid
    ("mistral3-2images", r"Mistral3ForConditionalGeneration's image 0 is a 3 x 4 token grid, not a square one"),
    ("aya_vision-2images", r"AyaVisionForConditionalGeneration's image 0 is 2 tiles' grids one after another"),
    ("llava_next_video-image+video-per-video", r"image 0 is its base view's patch grid followed by its anyres"),
    ("video_llava-image+video", r"17 vision tokens per image do not form a square patch grid"),    # CLS + 4x4
    ("internvl-2images", r"InternVLForConditionalGeneration's image 0 is 2 tiles' grids one after another"),
    ("idefics3-2images", r"Idefics3ForConditionalGeneration's image 0 is 3 tiles' grids one after another"),
    ("smolvlm-2images", r"SmolVLMForConditionalGeneration's image 0 is 3 tiles' grids one after another"),
]


@pytest.mark.parametrize("case, why", NOT_GRIDS, ids=[c[0] for c in NOT_GRIDS])
def test_visiontrim_llm_refuses_units_that_are_not_one_grid(case, why):
    tier1.check_visiontrim_llm_refuses(next(c for c in CASES if c[0] == case), why)


def test_paligemma2_is_refused_up_front():
    """PaliGemma 2 (model_type paligemma, a Gemma 2 LM) while transformers runs Gemma 2 in eager
    attention only: refused when the family is read, naming why, not after a capture that finds no
    attention to prune."""
    from transformers import Gemma2Model
    if getattr(Gemma2Model, "_supports_sdpa", False):
        pytest.skip("this transformers runs Gemma 2 with SDPA: PaliGemma 2 wants a case of its own")
    text = dict(model_type="gemma2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=16,
                num_attention_heads=2, num_key_value_heads=1, vocab_size=160, sliding_window=128)
    model = tier1._tiny("PaliGemmaForConditionalGeneration", "PaliGemmaConfig", text_config=text, image_token_index=150,
                        vision_config=dict(family_zoo._siglip(56), projection_dim=32), projection_dim=32)
    with pytest.raises(gp.UnsupportedModelError, match=r"PaliGemmaForConditionalGeneration: could not find the "
                                                       r"paligemma family support\. its Gemma2Model language model "
                                                       r"\(gemma2: PaliGemma 2\) runs eager attention only"):
        gp.prune(model, "fastv", layer=2, keep=4)
