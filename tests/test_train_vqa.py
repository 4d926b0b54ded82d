"""Smoke test of examples/train_vqa_model.py: a few steps on a tiny config, save, reload."""
import importlib.util
import json
import os

import torch

from graphprune import vqa

_PATH = os.path.join(os.path.dirname(__file__), "..", "examples", "train_vqa_model.py")


def _load():
    spec = importlib.util.spec_from_file_location("train_vqa_model", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_save_reload(tmp_path):
    from transformers import LlavaForConditionalGeneration

    T = _load()
    vocab = vqa.Vocab()
    samples = vqa.generate("train", 4)
    cfg = T.CONFIGS["tiny"]
    n_img = (cfg["image_size"] // cfg["patch"]) ** 2
    batch = T.make_batch(samples, vocab, n_img, cfg["image_size"])

    # the same init as train() builds, to measure the loss on the batch before training
    with torch.no_grad():
        before = T.batch_loss(T.build_model(cfg, seed=0, vocab=vocab).train(), batch, vocab)[0].item()
    model, hist = T.train(cfg, steps=12, batch_size=4, lr=3e-3, warmup=2, samples=samples,
                          eval_n=0, log_every=4, log=lambda m: None)
    with torch.no_grad():
        after = T.batch_loss(model, batch, vocab)[0].item()
    assert after < before - 0.5, (before, after)
    assert hist["steps"] == 12 and len(hist["train"]) == 3

    cfgm = model.config
    assert cfgm.image_token_id == vocab.image_id
    assert cfgm.text_config.vocab_size == len(vocab)
    assert cfgm.text_config.num_hidden_layers == 8
    assert cfgm.vision_feature_layer == -2 and cfgm.vision_feature_select_strategy == "default"

    out = tmp_path / "m"
    T.save(model, str(out), hist)
    assert (out / "model.safetensors").exists()
    meta = json.loads((out / "train_meta.json").read_text())
    assert meta["special"]["image"] == vocab.image_id and len(meta["vocab"]) == len(vocab)

    loaded = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    with torch.no_grad():
        ref = T._forward(model, batch, keep=3)
        got = T._forward(loaded, batch, keep=3)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)

    acc = T.evaluate(loaded, samples, vocab)
    assert 0.0 <= acc["all"] <= 1.0 and set(acc) == {s.qtype for s in samples} | {"all"}
