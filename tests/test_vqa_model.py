"""The shipped trained VQA model (graphprune/tools/weights/vqa_llava): package data, offline load, accuracy."""
import json
import os

import pytest
import torch

from graphprune.tools import vqa, zoo

_DIR = zoo.vqa_weights_dir()
_HAVE = os.path.isfile(os.path.join(_DIR, "model.safetensors"))
needs_weights = pytest.mark.skipif(
    not _HAVE, reason=f"no shipped VQA weights in {_DIR}; train them with: {zoo.VQA_TRAIN_COMMAND}")


def test_weights_are_package_data():
    # pyproject ships graphprune/tools/weights/vqa_llava/* with the graphprune package
    tomllib = pytest.importorskip("tomllib")

    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        pp = tomllib.load(f)
    data = pp["tool"]["setuptools"]["package-data"]["graphprune.tools"]
    assert zoo.VQA_WEIGHTS + "/*" in data
    assert os.path.dirname(_DIR) == os.path.join(os.path.dirname(os.path.abspath(zoo.__file__)), "weights")


def test_missing_weights_error_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        zoo.vqa_llava(str(tmp_path))
    msg = str(e.value)
    assert "model.safetensors" in msg and "examples/train_vqa_model.py" in msg


@needs_weights
def test_shipped_files():
    for f in ("config.json", "model.safetensors", "train_meta.json"):
        assert os.path.isfile(os.path.join(_DIR, f)), f
    assert os.path.getsize(os.path.join(_DIR, "model.safetensors")) <= 20 * 2 ** 20
    with open(os.path.join(_DIR, "train_meta.json")) as f:
        meta = json.load(f)
    for k in ("command", "seed", "train_minutes", "test"):
        assert k in meta, k
    assert set(meta["test"]["per_type"]) == set(vqa.QTYPES)


@pytest.fixture(scope="module")
def shipped():
    return zoo.vqa_llava()


@needs_weights
def test_architecture(shipped):
    model, vocab = shipped
    cfg = model.config
    assert type(model).__name__ == "LlavaForConditionalGeneration" and not model.training
    assert cfg.vision_config.image_size == 336 and cfg.vision_config.patch_size == 14
    assert (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 == vqa.NUM_PATCHES
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.text_config.num_hidden_layers == 8
    assert cfg.image_token_id == vocab.image_id and cfg.text_config.vocab_size == len(vocab)
    assert model.config._attn_implementation == "sdpa"


@needs_weights
def test_accuracy_on_test_questions(shipped):
    """Greedy first answer token on the first 100 test questions (seed 0) beats every answer-blind
    baseline: random weights get 0/100 and the best constant answer ("yes") gets 11/100."""
    model, vocab = shipped
    torch.manual_seed(0)
    samples = vqa.generate("test", 100, seed=0)
    hits = 0
    for i in range(0, len(samples), 25):
        chunk = samples[i:i + 25]
        rows = [vocab.prompt_ids(s.question) for s in chunk]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), vocab.pad_id)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, width - len(r):] = torch.tensor(r)
            mask[b, width - len(r):] = 1
        px = vqa.pixel_values(torch.stack([s.image for s in chunk]))
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                           pixel_values=px, logits_to_keep=1).logits[:, -1]
        hits += sum(int(p == vocab.answer_id(s.answer)) for p, s in zip(logits.argmax(-1).tolist(), chunk))
    assert hits >= _MIN_HITS, f"{hits}/100 test questions answered correctly"


@needs_weights
def test_generate_answers_then_eos(shipped):
    model, vocab = shipped
    s = vqa.sample_at("test", 0)
    ids = torch.tensor([vocab.prompt_ids(s.question)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=vqa.pixel_values(s.image)[None], max_new_tokens=3, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    assert len(new) >= 1 and new[0] in {vocab.answer_id(a) for a in vqa.ANSWERS}


# The shipped model gets 88/100 here (90.5% on 1000 test questions, see train_meta.json "test",
# which meets the issue's >= 90% target). The floor leaves room for fp32 kernel differences between
# machines and checks "trained, and far better than any answer-blind baseline"; raise it when
# better weights ship.
_MIN_HITS = 80
