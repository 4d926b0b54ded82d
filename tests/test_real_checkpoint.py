"""graphprune bench on "real checkpoint" inputs, end to end and offline: --model as a local
save_pretrained directory of a LLaVA model with its HF processor (not graphprune's VQA vocab), and
as a hub id resolved from the local Hugging Face cache; --data as a JSONL file of images + questions.

The checkpoint is built here: graphprune.tools.zoo.tiny_llava (6x6 patch grid, vocab 160, <image> = 150)
and a word-level tokenizer / CLIP image processor / LlavaProcessor over the questions' words. The
unpruned accuracy is checked against plain transformers calls (batch 1, no padding) on the files.
"""
import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("PIL")       # the HF image processor needs Pillow
from PIL import Image  # noqa: E402

from graphprune.cli import main  # noqa: E402
from graphprune.tools import vqa, zoo  # noqa: E402
from graphprune.tools.images import write_png  # noqa: E402

VOCAB_SAMPLES = range(8)         # the tokenizer knows the words of the first 8 synthetic test questions
SAMPLES = (5, 6, 3, 2)           # the data set: 4 of them (left padding: their questions differ in length)
SEED = 4                         # tiny_llava seed: greedy first words differ across the items (margins > 0.5)
PROMPT = "USER: <image>\n{} ASSISTANT:"
HUB_ID = "graphprune-test/tiny-llava"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")      # ids 0..3 = the model's pad / bos / eos (+ unk)
BENCH_ARGS = ["--methods", "fastv", "--budgets", "8", "--n", "4", "--repeats", "1", "--time-batch", "2",
              "--threads", "1", "--quiet"]


@contextlib.contextmanager
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _processor(questions):
    """A LlavaProcessor: word-level tokenizer that prepends <s>, CLIP 84-px image processor."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted({w for q in questions for w in q.replace("?", " ").split()})
    names = list(SPECIALS) + ["USER", "ASSISTANT", ":", "?", "\n"] + words
    assert len(names) < 150
    vocab = {name: i for i, name in enumerate(names)}
    vocab.update({f"w{i}": i for i in range(len(names), 160) if i != 150})   # every model id decodes
    vocab["<image>"] = 150
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", "removed")]
                                                + [pre_tokenizers.Split(c, "isolated") for c in ("\n", ":", "?")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>",
                                                extra_special_tokens={"image_token": "<image>"})
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 84}, crop_size={"height": 84, "width": 84})
    return transformers.LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=14,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _first_word(text: str) -> str:
    return (text.split() or [""])[0].strip(".,!?").lower()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """{model: save_pretrained dir (model + processor), data: JSONL, refs: reference first words,
    expected: (accuracy, by type)}."""
    root = tmp_path_factory.mktemp("real_ckpt")
    samples = [vqa.sample_at("test", i) for i in SAMPLES]
    model_dir, data_dir = root / "model", root / "data"
    data_dir.mkdir()
    model = zoo.tiny_llava(SEED)
    processor = _processor([vqa.sample_at("test", i).question for i in VOCAB_SAMPLES])
    with torch.no_grad():     # sharp attention: else a random LM's next token hardly depends on the image / prompt
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(10.0)
            layer.self_attn.k_proj.weight.mul_(10.0)
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    for i, s in enumerate(samples):
        write_png(str(data_dir / f"img{i}.png"), s.image)

    # independent reference: plain transformers on the saved files, one item at a time, no padding
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    # use_kernels=False: the model's own modules (transformers 5.25 swaps in hub kernels by default)
    ref_model = LlavaForConditionalGeneration.from_pretrained(model_dir, local_files_only=True,
                                                              use_kernels=False).eval()
    ref_proc = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    refs = []
    with _one_thread(), torch.no_grad():
        for i, s in enumerate(samples):
            with Image.open(data_dir / f"img{i}.png") as im:
                x = ref_proc(images=im.convert("RGB"), text=PROMPT.format(s.question), return_tensors="pt")
            assert x["input_ids"][0, 0] == 1 and (x["input_ids"] == 150).sum() == 36 and x["attention_mask"].all()
            out = ref_model.generate(**x, max_new_tokens=8, do_sample=False)
            refs.append(_first_word(ref_proc.tokenizer.decode(out[0, x["input_ids"].shape[1]:],
                                                              skip_special_tokens=True)))
    # answers: the reference's own word for items 0-2 (type "a", "a", "b"), a wrong one for item 3 ("b").
    # Unless the first three words all agree, no constant or input-blind answer scores 3/4.
    assert len(set(refs[:3])) > 1 and all(refs), f"degenerate reference answers {refs}: pick another SEED"
    answers = refs[:3] + ["no-such-answer"]
    with open(data_dir / "q.jsonl", "w") as f:
        for i, (s, a, t) in enumerate(zip(samples, answers, "aabb")):
            f.write(json.dumps({"image": f"img{i}.png", "question": s.question, "answer": a, "type": t}) + "\n")
    return {"model": str(model_dir), "data": str(data_dir / "q.jsonl"), "refs": refs,
            "expected": (0.75, {"a": 1.0, "b": 0.5})}


def _check_result(res, ckpt, model_name):
    assert res["model"] == model_name
    assert res["source"] == "pretrained (local files)"         # the HF-processor path, not graphprune's VQA dir
    assert res["questions"] == 4
    rows = {(r["method"], r["budget"]): r for r in res["cells"]}
    assert list(rows) == [("unpruned", "-"), ("fastv", "8")]
    base, fastv = rows[("unpruned", "-")], rows[("fastv", "8")]
    accuracy, by_type = ckpt["expected"]
    assert base["accuracy"] == accuracy, (base, ckpt["refs"])
    assert base["accuracy_by_type"] == by_type
    assert base["vision_tokens_kept"] == base["vision_tokens_into_llm"] == 36
    assert fastv["vision_tokens_kept"] == 8 and fastv["vision_tokens_into_llm"] == 36
    assert 0.0 <= fastv["accuracy"] <= 1.0
    assert fastv["flops"] < base["flops"] and fastv["kv_bytes"] < base["kv_bytes"]
    assert res["timing"]["batch"] == 2 and res["timing"]["repeats"] == 1


def test_local_directory_with_processor(ckpt, tmp_path, capsys):
    out = tmp_path / "bench.json"
    with _one_thread():         # --threads 1 sets torch's global thread count; restore it afterwards
        rc = main(["bench", "--model", ckpt["model"], "--data", ckpt["data"], *BENCH_ARGS, "--json", str(out)])
    assert rc == 0
    assert f"model: {ckpt['model']}" in capsys.readouterr().out
    _check_result(json.loads(out.read_text()), ckpt, ckpt["model"])


def _hub_cache(root, model_dir):
    """HF cache layout: models--ORG--NAME/{snapshots/<commit>/files, refs/main}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + HUB_ID.replace("/", "--"))
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def _cli(args, hub):
    # what the `graphprune` console script runs (graphprune.cli:main), in a fresh interpreter so
    # that the hub cache location comes from the environment
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("HF_HOME", None)
    return subprocess.run([sys.executable, "-c", "import sys; from graphprune.cli import main; sys.exit(main())",
                           *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_hub_id_from_local_cache(ckpt, tmp_path):
    hub = _hub_cache(tmp_path / "hub", ckpt["model"])
    out = tmp_path / "bench.json"
    p = _cli(["bench", "--model", HUB_ID, "--data", ckpt["data"], *BENCH_ARGS, "--json", str(out)], hub)
    assert p.returncode == 0, p.stderr
    _check_result(json.loads(out.read_text()), ckpt, HUB_ID)

    missing = "graphprune-test/not-cached"
    out2 = tmp_path / "missing.json"
    p = _cli(["bench", "--model", missing, "--data", ckpt["data"], *BENCH_ARGS, "--json", str(out2)], hub)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("graphprune: error: ") and repr(missing) in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and not p.stdout and not out2.exists()
