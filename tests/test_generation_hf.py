"""Generation through transformers: a pruned model's `generate` is transformers' own, so its
options (GenerationConfig, logits processors, stop strings, streamers, beam search, scores) work
and agree with an independent reference driven by the same `generate`:

* keep-everything (`gp.prune(model)`) equals the unpruned Hugging Face model's `model.generate`;
* FastV equals tests/reference_generation.ReferenceVLM (plain PyTorch, no graphprune) under
  transformers' `generate` with the same options.

Multi-turn: "the same pruning" for a follow-up means the first turn's selection stays: every
layer keeps the prompt tokens it kept in turn 1 (the image is neither re-encoded nor re-pruned),
and every token after the prompt (the answer, the follow-up question, the new answer) is kept
in every layer. The reference re-runs the whole conversation as one prompt through
tests/reference.py with that selection fixed (the turn-1 kept indices, computed by the
reference's own FastV, plus every later index).
"""
import threading
import warnings

import numpy as np
import pytest
import reference as R
import torch
from reference_generation import ReferenceVLM
from transformers import GenerationConfig, TextIteratorStreamer, TextStreamer

import graphprune as gp
from graphprune.compat import transformers_major
from graphprune.lower.runtime import StageCall
from graphprune.tools.zoo import llava_example, qwen2vl_example

NEW = 8


def tiny_tokenizer(tokenizer_class=None):
    """A word-level tokenizer over the tiny models' 160 ids ("w<id>"), built in code, as
    `tokenizer_class` (a fast tokenizer class; PreTrainedTokenizerFast by default)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    special = {0: "<pad>", 1: "<s>", 2: "</s>", 148: "<vision_start>", 149: "<vision_end>", 150: "<image>",
               151: "<video>", 152: "<unk>"}
    vocab = {special.get(i, f"w{i}"): i for i in range(160)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(special.values()))
    tok.add_tokens(["abcdef"])       # stop-string matching reads token strings after this probe word
    return (tokenizer_class or PreTrainedTokenizerFast)(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", model_input_names=["input_ids", "attention_mask"])


def _kwargs(family, model, **kw):
    return (llava_example if family == "llava" else qwen2vl_example)(model, **kw).as_kwargs()


def _same(ours, theirs, scores=True):
    assert torch.equal(ours.sequences, theirs.sequences)
    if scores:
        assert len(ours.scores) == len(theirs.scores)
        for a, b in zip(ours.scores, theirs.scores):
            finite = torch.isfinite(b)
            assert torch.equal(finite, torch.isfinite(a))
            torch.testing.assert_close(a[finite], b[finite], atol=1e-5, rtol=1e-5)


OPTIONS = {
    "config": dict(generation_config=GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=2,
                                                      pad_token_id=0)),
    "processors": dict(max_new_tokens=NEW, repetition_penalty=1.8, min_length=0, bad_words_ids=[[7], [9]],
                       no_repeat_ngram_size=2),
    "min_length": dict(max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=2),
    "beams": dict(max_new_tokens=NEW, num_beams=2, num_return_sequences=2, length_penalty=0.5),
}


@pytest.mark.parametrize("family", ["llava", "qwen"])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_keep_everything_equals_hf_generate(llava, qwen, family, option):
    model, program = llava if family == "llava" else qwen
    # transformers 4.x's own Qwen2-VL generate numbers decode steps of left-padded rows differently
    # from 5.x (its M-RoPE decode positions were reworked, e.g. huggingface/transformers#40490); the
    # padded case is checked against the plain-PyTorch reference below, on every version
    pad = (0, 0) if family == "qwen" and transformers_major() < 5 else (0, 2)
    kw = _kwargs(family, model, batch=2, pad=pad)
    pruned = gp.prune(model, program=program)
    opts = dict(OPTIONS[option], return_dict_in_generate=True, output_scores=True)
    ours, theirs = pruned.generate(**kw, **opts), model.generate(**kw, **opts)
    _same(ours, theirs)
    if option == "beams":
        torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores, atol=1e-5, rtol=1e-5)


FASTV = {"llava": ("fastv(layer=2, keep=9)", 9), "qwen": ("fastv(layer=2, keep=4)", 4)}


@pytest.mark.parametrize("family", ["llava", "qwen"])
@pytest.mark.parametrize("option", ["config", "processors", "beams"])
def test_fastv_equals_reference_under_hf_generate(llava, qwen, family, option):
    model, program = llava if family == "llava" else qwen
    spec, keep = FASTV[family]
    kw = _kwargs(family, model, batch=2, pad=(0, 3))
    opts = dict(OPTIONS[option], return_dict_in_generate=True, output_scores=True)
    ours = gp.prune(model, spec, program=program).generate(**kw, **opts)
    theirs = ReferenceVLM(model, R.fastv_select(keep), 2).generate(**kw, **opts)
    _same(ours, theirs)


def test_bool_attention_mask_and_left_padding(llava):
    model, program = llava
    kw = _kwargs("llava", model, batch=2, pad=(0, 4), seed=5)
    pruned = gp.prune(model, FASTV["llava"][0], program=program)
    as_long = pruned.generate(**kw, max_new_tokens=NEW, eos_token_id=[])
    as_bool = pruned.generate(**{**kw, "attention_mask": kw["attention_mask"].bool()}, max_new_tokens=NEW,
                              eos_token_id=[])
    ref = ReferenceVLM(model, R.fastv_select(9), 2).generate(**kw, max_new_tokens=NEW, eos_token_id=[])
    assert torch.equal(as_long, ref) and torch.equal(as_bool, ref)


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_stop_string_streamers(llava, qwen, family, capsys):
    model, program = llava if family == "llava" else qwen
    tok = tiny_tokenizer()
    kw = _kwargs(family, model, batch=1, seed=1)
    pruned = gp.prune(model, FASTV[family][0], program=program)
    reference = ReferenceVLM(model, R.fastv_select(FASTV[family][1]), 2)
    free = pruned.generate(**kw, max_new_tokens=NEW, eos_token_id=[])[0, -NEW:]
    stop = tok.convert_ids_to_tokens(int(free[3]))
    first = free.tolist().index(int(free[3]))           # where the stop string first appears
    runs = {}
    for name, m in (("ours", pruned), ("reference", reference)):
        ids = m.generate(**kw, max_new_tokens=NEW, eos_token_id=[], stop_strings=[stop], tokenizer=tok,
                         streamer=TextStreamer(tok, skip_prompt=True))
        runs[name] = (ids, capsys.readouterr().out)
    assert torch.equal(runs["ours"][0], runs["reference"][0])
    new = runs["ours"][0][0, kw["input_ids"].shape[1]:]
    assert torch.equal(new, free[:first + 1])                               # stopped at the stop string
    assert runs["ours"][1] == runs["reference"][1] == tok.decode(new) + "\n"

    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    worker = threading.Thread(target=pruned.generate, kwargs=dict(**kw, max_new_tokens=NEW, eos_token_id=[],
                                                                  streamer=streamer))
    worker.start()
    text = "".join(streamer)
    worker.join()
    assert text == tok.decode(free)


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_follow_up_reuses_the_pruned_cache_and_equals_the_rerun(llava, qwen, family):
    model, program = llava if family == "llava" else qwen
    spec, keep = FASTV[family]
    ex = (llava_example if family == "llava" else qwen2vl_example)(model, batch=2, pad=(0, 3), seed=4)
    kw = ex.as_kwargs()
    pruned = gp.prune(model, spec, program=program)
    turn1 = pruned.generate(**kw, max_new_tokens=4, eos_token_id=[], return_dict_in_generate=True)

    # the reference's own FastV on the first prompt: its tokens and the prompt indices each sample kept
    emb, mask, pos, vm = (R.llava_inputs if family == "llava" else R.qwen2vl_inputs)(model, ex)
    ref1 = R.lm_generate(model, emb, mask, pos, select=R.fastv_select(keep), select_layer=2, max_new_tokens=4,
                         vision_mask=vm)
    s = ex.input_ids.shape[1]
    assert torch.equal(turn1.sequences[:, s:], ref1["tokens"])

    question = torch.randint(3, 140, (2, 5), generator=torch.Generator().manual_seed(9))
    ids = torch.cat([turn1.sequences, question], 1)
    attention = torch.cat([ex.attention_mask, torch.ones(2, ids.shape[1] - s, dtype=torch.long)], 1)
    calls = []
    for stage in ("vision", "prefill"):
        graph = pruned.executables[stage]
        if graph is not None:
            pruned.executables[stage] = StageCall(graph, lambda *a, g=graph, n=stage: calls.append(n) or g(*a))
    follow = dict(kw, input_ids=ids, attention_mask=attention)
    if family == "qwen":
        follow["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
    turn2 = pruned.generate(**follow, past_key_values=turn1.past_key_values, max_new_tokens=4, eos_token_id=[],
                            return_dict_in_generate=True, output_scores=True)
    assert calls == []                                  # neither the image nor the prompt ran again

    # the re-run: the whole conversation as one prompt, turn 1's selection fixed, later tokens kept
    conv = type(ex)(ids, attention, ex.pixel_values, ex.image_grid_thw, follow.get("mm_token_type_ids"))
    emb, mask, pos, vm = (R.llava_inputs if family == "llava" else R.qwen2vl_inputs)(model, conv)
    fixed = torch.cat([ref1["keep"], torch.arange(s, ids.shape[1]).expand(2, -1)], 1)
    ref2 = R.lm_generate(model, emb, mask, pos, select=lambda ctx: fixed, select_layer=2, max_new_tokens=4,
                         vision_mask=vm)
    assert torch.equal(turn2.sequences[:, ids.shape[1]:], ref2["tokens"])
    for ours, theirs in zip(turn2.scores, ref2["step_logits"]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_follow_up_with_a_new_image_is_refused(llava):
    model, program = llava
    ex = llava_example(model)
    pruned = gp.prune(model, FASTV["llava"][0], program=program)
    first = pruned.generate(**ex.as_kwargs(), max_new_tokens=2, return_dict_in_generate=True)
    ids = torch.cat([first.sequences, ex.input_ids], 1)
    with pytest.raises(gp.InputError, match="new image"):
        pruned.generate(input_ids=ids, pixel_values=ex.pixel_values, past_key_values=first.past_key_values,
                        max_new_tokens=2)


@pytest.mark.parametrize("option,match", [(dict(output_attentions=True), "attention maps"),
                                          (dict(prompt_lookup_num_tokens=3), "cannot be cropped"),
                                          (dict(cache_implementation="static"), "its own cache"),
                                          (dict(num_beams=2, eos_token_id=[]), r"eos_token_id=\[\] with num_beams=2")])
def test_unsupported_generate_options_fail_clearly(llava, option, match):
    model, program = llava
    pruned = gp.prune(model, FASTV["llava"][0], program=program)
    with pytest.raises(gp.InputError, match=match):
        pruned.generate(**llava_example(model).as_kwargs(), max_new_tokens=2, **option)


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_save_and_load_round_trip(llava, qwen, family, tmp_path):
    import json
    model, program = llava if family == "llava" else qwen
    spec = "cls_topk(keep=18) | fastv(layer=2, keep=6)" if family == "llava" else FASTV["qwen"][0]
    pruned = gp.prune(model, spec, program=program)
    pruned.save_pretrained(tmp_path)
    assert {p.suffix for p in tmp_path.iterdir()} <= {".json", ".safetensors"}        # nothing pickled
    assert json.loads((tmp_path / "graphprune.json").read_text())["pipeline"] == [repr(p) for p in pruned.pipeline]
    loaded = gp.from_pretrained(tmp_path)
    kw = _kwargs(family, model, batch=2, pad=(0, 2))
    a, b = pruned(**kw), loaded(**kw)
    assert torch.equal(a.kept, b.kept)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(pruned.generate(**kw, max_new_tokens=NEW), loaded.generate(**kw, max_new_tokens=NEW))


def tiny_processor(family):
    """The family's own processor class around the tiny tokenizer, with images sized so that one image
    fills 36 LLaVA image tokens (84 px, 14 px patches, CLS dropped) or 16 Qwen2-VL ones (112 px: 8 x 8
    patches merged 2 x 2)."""
    import transformers
    if family == "llava":
        tok = tiny_tokenizer()
        image_processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
        return transformers.LlavaProcessor(
            image_processor=image_processor(size={"shortest_edge": 84}, crop_size={"height": 84, "width": 84}),
            tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    # transformers 4.x's Qwen2VLProcessor takes only Qwen2 tokenizer classes (5.x: Qwen2Tokenizer is the fast one)
    tok = tiny_tokenizer(getattr(transformers, "Qwen2TokenizerFast", None) or transformers.Qwen2Tokenizer)
    tok.image_token, tok.video_token = "<image>", "<video>"
    pixels = 112 * 112
    with warnings.catch_warnings():       # 5.x without torchvision: "falling back to the PIL backend"
        warnings.simplefilter("ignore")
        image_processor = transformers.Qwen2VLImageProcessor(size={"shortest_edge": pixels, "longest_edge": pixels})
    return _image_only_qwen2vl_processor()(image_processor=image_processor, tokenizer=tok)


def _image_only_qwen2vl_processor():
    from transformers import Qwen2VLProcessor

    class ImageOnly(Qwen2VLProcessor):
        """Qwen2VLProcessor with no video processor: that one needs torchvision (not a test dependency),
        and transformers 5 fails looking up its class when it is None."""

        def check_argument_for_proper_class(self, name, argument):
            if name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(name, argument)
    return ImageOnly


PIPELINE_PROMPTS = {"llava": ("<s> w5 w17 <image> w33 w40 w41", 84, 36),
                    "qwen": ("<s> w5 w17 <vision_start> <image> <vision_end> w33 w40 w41", 112, 16)}


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_image_text_to_text_pipeline_answers(llava, qwen, family):
    from PIL import Image
    from transformers import pipeline
    model, program = llava if family == "llava" else qwen
    processor = tiny_processor(family)
    text, size, tokens = PIPELINE_PROMPTS[family]
    spec, keep = FASTV[family]
    pruned = gp.prune(model, spec, program=program)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    pipe = pipeline("image-text-to-text", model=pruned, processor=processor)
    answer = pipe(images=image, text=text, max_new_tokens=6, return_full_text=False)[0]["generated_text"]

    inputs = processor(images=image, text=text, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == tokens
    ids = pruned.generate(**inputs, max_new_tokens=6)
    ref = ReferenceVLM(model, R.fastv_select(keep), 2).generate(**inputs, max_new_tokens=6)
    assert torch.equal(ids, ref)
    expect = processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() == expect.strip() and expect.strip()
