"""graphprune inside vLLM (graphprune/targets/vllm_plugin.py, vllm_llava.py, vllm_checkpoint.py), on the shipped VQA model.

Runs where vLLM imports: the venv scripts/setup_vllm_env.sh creates (`. .venv-vllm/bin/activate &&
python -m pytest -q tests/test_vllm.py`); elsewhere (the main CI) the module is skipped. Each vLLM
configuration is one engine start in a child process (tests/vllm_generate.py), since vLLM loads the
plugin once per process and reads the pipeline from the environment.

References: unpruned, transformers' own `generate` on the same checkpoint; pruned, graphprune's
`gp.prune(model, pipeline).generate` on the same questions, batch 1 (whose vision-stage methods are
checked against hand-written references in test_reference_methods.py), and for cls_topk also the
hand-written FasterVLM selection of tests/reference.py decoded by transformers' language model.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed here; run scripts/setup_vllm_env.sh and run this file "
                                       "in .venv-vllm")

import torch  # noqa: E402

from graphprune.errors import PassConfigError  # noqa: E402

N_QUESTIONS = 6
MAX_NEW = 4
CHILD = os.path.join(os.path.dirname(__file__), "vllm_generate.py")
PIPELINES = {
    "cls_topk": "cls_topk(keep=64)",
    "random_vision": "random(stage='vision', keep=64, positions='compact', seed=3)",
    "keys_then_random": "mustdrop_keys | random(stage='vision', keep=64, positions='compact')",
    "divprune": "divprune(keep=64)",
    "visionzip": "visionzip(keep=64)",
}


@pytest.fixture(scope="module")
def served_dir(tmp_path_factory):
    from graphprune.targets.vllm_checkpoint import write_vllm_checkpoint
    return write_vllm_checkpoint(str(tmp_path_factory.mktemp("vqa_llava_vllm")))


@pytest.fixture(scope="module")
def shipped(served_dir):
    """The model vLLM serves, as transformers loads it from the served folder, its vocabulary and the questions."""
    from transformers import LlavaForConditionalGeneration

    from graphprune.tools import vqa
    from graphprune.tools.vqa_model import load_items
    model = LlavaForConditionalGeneration.from_pretrained(served_dir, attn_implementation="sdpa", local_files_only=True,
                                                          use_kernels=False)
    return model.eval(), vqa.Vocab(), load_items(None, N_QUESTIONS)


def test_served_folder_computes_the_shipped_model(shipped):
    """Widened heads, renamed keys: the served checkpoint's logits are the shipped model's."""
    from graphprune.tools import zoo
    served, vocab, items = shipped
    original, _ = zoo.vqa_llava()
    assert served.config.text_config.head_dim == 32 != original.config.text_config.head_dim
    for it in items[:2]:
        with torch.no_grad():
            a = original(**inputs_of(vocab, it)).logits
            b = served(**inputs_of(vocab, it)).logits
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


_SERVED: dict = {}          # (folder, pipeline) -> the child's result: one engine start per configuration


def run_vllm(model_dir, pipeline=None):
    key = (model_dir, pipeline)
    if key not in _SERVED:
        _SERVED[key] = _serve(model_dir, pipeline)
    return _SERVED[key]


def _serve(model_dir, pipeline):
    env = {k: v for k, v in os.environ.items() if k != "GRAPHPRUNE_VLLM_PIPELINE"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if pipeline is not None:
        env["GRAPHPRUNE_VLLM_PIPELINE"] = pipeline
    proc = subprocess.run([sys.executable, CHILD, model_dir, str(N_QUESTIONS)], env=env, capture_output=True,
                          text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    errors = "\n".join(line for line in proc.stderr.splitlines() if "Error" in line)
    raise AssertionError(f"vLLM child failed (exit {proc.returncode}):\n{errors[-4000:]}\n{proc.stderr[-2000:]}")


def answer(ids, eos):
    """Generated ids up to and including the first eos (vLLM and graphprune both stop there)."""
    ids = list(ids)
    return ids[:ids.index(eos) + 1] if eos in ids else ids


def inputs_of(vocab, item, image_tokens=576):
    from graphprune.tools import vqa
    ids = torch.tensor([vocab.prompt_ids(item.question, image_tokens)])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=vqa.pixel_values(item.image[None]))


def test_processor_matches_vqa_pixels_and_tokens(served_dir, shipped):
    """The folder vLLM serves turns an image and a question into graphprune's own pixels and ids."""
    from transformers import AutoProcessor

    from graphprune.tools import vqa
    _, vocab, items = shipped
    proc = AutoProcessor.from_pretrained(served_dir, local_files_only=True)
    image = items[0].image.permute(1, 2, 0).numpy()
    got = proc.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    assert torch.allclose(got, vqa.pixel_values(items[0].image[None]), atol=1e-6)
    for it in items:
        text = f"{vqa.PROMPT_USER} <image>\n{it.question} {vqa.PROMPT_ASSISTANT}"
        assert proc.tokenizer(text, add_special_tokens=False)["input_ids"] == vocab.prompt_ids(it.question, 1)[1:]


def test_unpruned_vllm_equals_transformers(served_dir, shipped):
    """Plugin installed, not enabled: vLLM serves its own LLaVA, answers as transformers generates them."""
    model, vocab, items = shipped
    out = run_vllm(served_dir)
    for it, got, n in zip(items, out["tokens"], out["prompt_len"]):
        inputs = inputs_of(vocab, it)
        ref = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        assert n == inputs["input_ids"].shape[1]
        assert answer(got, vocab.eos_id) == answer(ref.tolist(), vocab.eos_id), it.question


@pytest.mark.parametrize("method", sorted(PIPELINES))
def test_pruned_vllm_equals_graphprune(served_dir, shipped, method):
    """With the plugin on, each prompt carries the kept count of placeholders and the greedy answers equal
    graphprune's own pruned model's."""
    import graphprune as gp
    model, vocab, items = shipped
    out = run_vllm(served_dir, PIPELINES[method])
    pruned = gp.prune(model, PIPELINES[method])
    for it, got, n in zip(items, out["tokens"], out["prompt_len"]):
        assert n == len(vocab.prompt_ids(it.question, 64))
        inputs = inputs_of(vocab, it)
        ref = pruned.generate(**inputs, max_new_tokens=MAX_NEW)[0, inputs["input_ids"].shape[1]:]
        assert answer(got, vocab.eos_id) == answer(ref.tolist(), vocab.eos_id), it.question


def test_cls_topk_served_equals_hand_written_reference(served_dir, shipped):
    """cls_topk in vLLM against FasterVLM written out by hand: the CLS row of the feature layer's attention
    picks 64 patches, and transformers' language model decodes the compacted prompt."""
    import reference as R
    model, vocab, items = shipped
    out = run_vllm(served_dir, PIPELINES["cls_topk"])
    lm = model.model.language_model
    for it, got in zip(items, out["tokens"]):
        inputs = inputs_of(vocab, it)
        feats, _ = R.llava_image_features(model, inputs["pixel_values"], cls_keep=64)
        ids = torch.tensor([vocab.prompt_ids(it.question, 64)])
        embeds = lm.get_input_embeddings()(ids)
        embeds[ids == vocab.image_id] = feats.reshape(-1, feats.shape[-1])
        ref = []
        with torch.no_grad():
            for _ in range(MAX_NEW):
                logits = model.lm_head(lm(inputs_embeds=embeds).last_hidden_state[:, -1])
                tok = int(logits.argmax(-1))
                ref.append(tok)
                if tok == vocab.eos_id:
                    break
                embeds = torch.cat([embeds, lm.get_input_embeddings()(torch.tensor([[tok]]))], 1)
        assert answer(got, vocab.eos_id) == ref, it.question


@pytest.mark.parametrize("pipeline, says", [
    ("fastv(layer=2, keep=64)", "language model"),
    ("dart(keep=64)", "language model"),
    ("mustdrop_merge(capacity=64)", "mask single tokens"),
    ("mustdrop_merge(mode='exact')", "data-dependent"),
    ("random(stage='vision', keep=64)", "positions='compact'"),
    ("visiontrim_vision(keep=64)", "keeps them by design"),
    ("nosuchmethod(keep=3)", "unknown method"),
])
def test_register_refuses_what_vllm_cannot_serve(monkeypatch, pipeline, says):
    from graphprune.targets import vllm_plugin as plugin
    monkeypatch.setenv(plugin.PIPELINE_ENV, pipeline)
    with pytest.raises(PassConfigError, match=says.replace("(", r"\(").replace(")", r"\)")):
        plugin.register()


def test_register_without_pipeline_leaves_vllm_alone(monkeypatch):
    from vllm import ModelRegistry

    from graphprune.targets import vllm_plugin as plugin
    monkeypatch.delenv(plugin.PIPELINE_ENV, raising=False)
    before = ModelRegistry.models["LlavaForConditionalGeneration"]
    plugin.register()
    assert ModelRegistry.models["LlavaForConditionalGeneration"] is before
    assert "graphprune" not in repr(before)


def test_vllm_start_up_refuses_llm_stage_pipeline(served_dir):
    """The refusal reaches the user of LLM(...): the engine does not start."""
    env = dict(os.environ, GRAPHPRUNE_VLLM_PIPELINE="fastv(layer=2, keep=64)", VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([sys.executable, CHILD, served_dir, "1"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0 and "RESULT" not in proc.stdout
    assert "PassConfigError" in proc.stderr and "prunes inside the language model" in proc.stderr
