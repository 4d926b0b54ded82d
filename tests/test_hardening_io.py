"""Issue 17 (hardening), the I/O side: model loading runs no code from model folders and reads
no pickles unless asked; the compile backend neither runs another model's weights nor silently
falls back to eager; ONNX export and the ONNX runner refuse bad or tampered input with
graphprune's own errors; the CLI answers user errors with one line and exit status 2.

References are independent of graphprune where numbers are compared: the eager model's logits
(plain Hugging Face forward on the kept tokens is what gp.prune is tested against elsewhere),
ONNX Runtime against torch, file modes against the process umask."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import graphprune as gp
from graphprune import cli
from graphprune.errors import GraphpruneError, InputError, PassNotApplicable
from graphprune.tools import zoo
from graphprune.tools.loading import load_model

# -- model loading (finding 2) ------------------------------------------------------------------

CUSTOM_CODE = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('code ran')\n"


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny LLaVA saved as a Hugging Face folder (config.json + model.safetensors)."""
    d = tmp_path_factory.mktemp("saved")
    model = zoo.tiny_llava()
    model.save_pretrained(d)
    return model, d


def _copy_with(src, dst, drop=(), add=None, config=None):
    shutil.copytree(src, dst)
    for f in drop:
        os.remove(os.path.join(dst, f))
    for name, text in (add or {}).items():
        with open(os.path.join(dst, name), "w") as f:
            f.write(text)
    if config:
        with open(os.path.join(dst, "config.json")) as f:
            cfg = json.load(f)
        cfg.update(config)
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(cfg, f)
    return str(dst)


@pytest.mark.parametrize("kind", ["auto_map", "py_file"])
def test_folder_with_its_own_code_is_refused_without_prompting(saved_model, tmp_path, kind):
    _, src = saved_model
    folder = _copy_with(src, tmp_path / "m", add={"custom.py": CUSTOM_CODE},
                        config={"auto_map": {"AutoConfig": "custom.Config"}} if kind == "auto_map" else None)
    with pytest.raises(InputError, match="--trust-remote-code"):
        load_model(folder)
    # the whole command, answering "y" to any prompt: refused, one line, nothing ran
    proc = subprocess.run([sys.executable, "-m", "graphprune.cli", "inspect", folder, "--no-decode"], input="y\n",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "trust-remote-code" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(folder, "RAN"))


def test_pickle_only_checkpoint_needs_the_option_and_then_loads(saved_model, tmp_path):
    model, src = saved_model
    folder = _copy_with(src, tmp_path / "m", drop=["model.safetensors"])
    torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
    with pytest.raises(InputError, match="--allow-pickle-weights"):
        load_model(folder)
    loaded, _ = load_model(folder, allow_pickle_weights=True)
    for (name, want), got in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(want.float(), got.float()), name


def test_safetensors_folder_loads_the_same_weights(saved_model):
    model, src = saved_model
    loaded, _ = load_model(str(src))
    kw = zoo.llava_example(model).as_kwargs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**kw).logits, model(**kw).logits, atol=1e-5, rtol=0)


# -- the CLI (finding 11 and the model options) --------------------------------------------------

def _bad_invocations(tmp_path, saved):
    file = tmp_path / "a_file"
    file.write_text("x")
    folder_spec = tmp_path / "spec.toml"
    folder_spec.mkdir()
    existing = tmp_path / "existing"
    existing.mkdir()
    no_weights = _copy_with(saved, tmp_path / "no_weights", drop=["model.safetensors"])
    pickled = _copy_with(saved, tmp_path / "pickled", drop=["model.safetensors"], add={"pytorch_model.bin": "x"})
    code = _copy_with(saved, tmp_path / "code", add={"custom.py": CUSTOM_CODE})
    png = tmp_path / "huge.png"      # a header claiming 100000 x 100000 pixels
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + (100000).to_bytes(4, "big") * 2 + b"\x08\x02")
    fastv = "fastv(layer=2, keep=9)"
    return [
        ["inspect", "--method", str(folder_spec)],
        ["run", "--method", str(folder_spec)],
        ["export-onnx", "--pipeline", fastv, "--out", "/proc/graphprune_out"],
        ["export-onnx", "--pipeline", fastv, "--out", str(file / "out")],
        ["export-onnx", "--pipeline", fastv, "--out", str(file)],
        ["export-onnx", "--pipeline", fastv, "--out", str(tmp_path / "o"), "--opset", "5"],
        ["demo", "--model", "random:tiny", "--out", "/proc/graphprune_demo"],
        ["demo", "--model", "random:tiny", "--out", str(file / "demo")],
        ["visualize", "--image", "test:0", "--pipeline", fastv, "--out", str(existing)],
        ["visualize", "--image", "test:0", "--pipeline", fastv, "--out", "/proc/x.png"],
        ["visualize", "--image", "test:0", "--pipeline", fastv, "--out", str(tmp_path / "v.png"), "--scale", "100"],
        ["visualize", "--image", str(png), "--question", "what?", "--pipeline", fastv, "--out", str(tmp_path / "v.png")],
        ["bench", "--model", no_weights],
        ["demo", "--model", no_weights, "--no-images"],
        ["bench", "--model", pickled],
        ["inspect", pickled],
        ["run", "--model", pickled],
        ["inspect", no_weights],
        ["inspect", code],
        ["demo", "--model", code, "--no-images"],
    ]


def test_cli_user_errors_are_one_line_and_exit_2(saved_model, tmp_path, capsys):
    _, saved = saved_model
    for argv in _bad_invocations(tmp_path, saved):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2, (argv, err)
        assert err.startswith("graphprune: error: ") and err.count("\n") == 1, (argv, err)
        assert "Traceback" not in err, (argv, err)


# -- visualize (finding 11: bounded memory) ------------------------------------------------------

def test_visualize_scale_is_bounded_before_any_work(tmp_path):
    from graphprune.tools import vqa_model
    from graphprune.tools.visualize import MAX_SIDE, visualize
    vm = vqa_model.load_vqa_model("random:tiny")
    image = torch.zeros(3, vm.image_size, vm.image_size, dtype=torch.uint8)
    too_big = MAX_SIDE // vm.image_size + 1
    with pytest.raises(InputError, match="scale"):
        visualize(vm, image, "what?", "fastv(layer=2, keep=4)", str(tmp_path / "x.png"), scale=too_big)
    assert not (tmp_path / "x.png").exists()


# -- the compile backend (findings 3 and 12) -----------------------------------------------------

PIPELINE = "fastv(layer=2, keep=8)"


def _compile(model, **extra):
    return torch.compile(model, backend="graphprune", options={"pipeline": PIPELINE, "compiler": "eager", **extra})


@pytest.mark.slow
def test_two_compiled_models_of_one_architecture_each_run_their_own_weights():
    torch._dynamo.reset()
    models = [zoo.tiny_llava(seed) for seed in (0, 1)]
    kw = zoo.llava_example(models[0]).as_kwargs()
    got = []
    for m in models:
        with torch.no_grad():
            got.append(_compile(m)(**kw).logits)
    for m, logits in zip(models, got):
        torch.testing.assert_close(logits, gp.prune(m, PIPELINE)(**kw).logits, atol=1e-5, rtol=0)
    assert not torch.allclose(got[0], got[1])


@pytest.mark.parametrize("mode,quiet", [pytest.param("raise", False, marks=pytest.mark.slow),
                                        pytest.param("warn", False, marks=pytest.mark.slow),
                                        ("raise", True)])
def test_recompile_limit_never_runs_unpruned_silently(mode, quiet):
    """Every torch.compile of the same model with other options adds cache entries to the same
    frames; past recompile_limit dynamo would run the call eagerly. Each call is pruned or raises,
    also with if_not_applied="warn" (after a fallback dynamo would run stale frames without a word),
    and with dynamo's logging silenced (its warning about the limit is then never emitted)."""
    import logging
    torch._dynamo.reset()
    if quiet:
        torch._logging.set_logs(dynamo=logging.ERROR)
    model = zoo.tiny_llava()
    kw = zoo.llava_example(model).as_kwargs()
    refused = 0
    with torch._dynamo.config.patch(recompile_limit=2), torch.no_grad():
        for keep in (8, 7, 6, 5):
            pipeline = f"fastv(layer=2, keep={keep})"
            want = gp.prune(model, pipeline)(**kw).logits
            compiled = torch.compile(model, backend="graphprune",
                                     options={"pipeline": pipeline, "compiler": "eager", "if_not_applied": mode})
            try:
                logits = compiled(**kw).logits
            except PassNotApplicable as e:
                assert "recompile_limit" in str(e)
                refused += 1
                continue
            torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)
    torch._dynamo.reset()
    torch._logging.set_logs()
    assert refused >= 1


def test_failed_compiles_then_a_correct_one_is_not_silently_unpruned():
    torch._dynamo.reset()
    model = zoo.tiny_llava()
    kw = zoo.llava_example(model).as_kwargs()
    with torch._dynamo.config.patch(recompile_limit=2), torch.no_grad():
        for bad in ({"bogus": 1}, {"compiler": "x"}, {"if_not_applied": "x"}):
            with pytest.raises(Exception):
                _compile(model, **bad)(**kw)
        try:
            logits = _compile(model)(**kw).logits
        except PassNotApplicable:
            pass            # refused loudly: fine
        else:               # or ran: then pruned
            torch.testing.assert_close(logits, gp.prune(model, PIPELINE)(**kw).logits, atol=1e-5, rtol=0)
    torch._dynamo.reset()


# -- example prompts within the vocabulary (finding 13) ------------------------------------------

@pytest.mark.parametrize("vocab", [12, 69, 160])
def test_example_prompt_uses_ordinary_tokens_of_the_vocabulary(vocab):
    from transformers import LlavaConfig
    cfg = LlavaConfig(text_config={"model_type": "llama", "vocab_size": vocab, "pad_token_id": 0, "bos_token_id": 1,
                                   "eos_token_id": 2}, image_token_id=3 if vocab < 100 else 150,
                      vision_config={"model_type": "clip_vision_model", "image_size": 28, "patch_size": 14})
    ex = zoo.llava_example(type("M", (), {"config": cfg})(), batch=3, images_per_sample=2, pad=(0, 2))
    ids, mask = ex.input_ids, ex.attention_mask.bool()
    text = ids[mask & (ids != cfg.image_token_id)]
    assert int(ids.max()) < vocab
    assert int((ids == cfg.image_token_id).sum()) == 3 * 2 * 4          # exactly the image slots
    assert set(text.tolist()) - {1} <= set(range(3, vocab)) - {cfg.image_token_id}


# -- ONNX export and runner (findings 7, 9, 13, 14) ----------------------------------------------

onnx = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def vqa_export(tmp_path_factory):
    """The VQA architecture (69-token vocabulary) pruned under torch.inference_mode(), exported with
    the default example; next to it, temp folders of a dead and of a live process."""
    from graphprune.targets.onnx import export_onnx
    root = tmp_path_factory.mktemp("exports")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (root / f".fastv.tmp-{dead.pid}-0000").mkdir()
    (root / f".fastv.tmp-{os.getpid()}-1111").mkdir()
    model = zoo.build_model(zoo.CONFIGS["tiny"], 0).eval()
    with torch.inference_mode():
        pruned = gp.prune(model, "fastv(layer=2, keep=8)")
    manifest = export_onnx(pruned, root / "fastv")
    return model, pruned, root / "fastv", manifest


@pytest.mark.slow
def test_small_vocabulary_inference_mode_model_exports_and_runs(vqa_export):
    from graphprune.targets.ort import OrtPrunedModel
    model, pruned, out, manifest = vqa_export
    assert manifest["vocab_size"] == 69
    ort_model = OrtPrunedModel(out)
    kw = zoo.llava_example(model, batch=2, seed=4).as_kwargs()
    want = pruned(**kw).logits
    torch.testing.assert_close(ort_model(**kw).logits, want, atol=1e-4, rtol=1e-4)
    # float64 pixels run in torch; the runner casts them to the export's float32
    kw64 = dict(kw, pixel_values=kw["pixel_values"].double())
    torch.testing.assert_close(ort_model(**kw64).logits, want, atol=1e-4, rtol=1e-4)
    two = zoo.llava_example(model, batch=2, images_per_sample=2).as_kwargs()
    with pytest.raises(InputError, match="2 image"):
        ort_model(**two)
    with pytest.raises(InputError, match="dtype"):
        ort_model(**dict(kw, pixel_values=kw["pixel_values"].to(torch.int32)))


@pytest.mark.slow
def test_export_folder_permissions_and_stale_temp_folders(vqa_export):
    _, _, out, _ = vqa_export
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask
    left = sorted(p.name for p in out.parent.iterdir() if p.name.startswith("."))
    assert left == [f".fastv.tmp-{os.getpid()}-1111"]            # the dead process's is gone, a live one's stays


def _tamper_cases():
    def manifest_edit(fn):
        def apply(d):
            path = d / "manifest.json"
            data = json.loads(path.read_text())
            fn(data)
            path.write_text(json.dumps(data))
        return apply

    def write(name, data):
        return lambda d: (d / name).write_bytes(data)

    def escape(d):
        outside = d.parent / "outside"
        outside.mkdir(exist_ok=True)
        shutil.copy(d / "prefill.onnx", outside / "evil.onnx")
        manifest_edit(lambda m: m["stages"]["prefill"].update(file="../outside/evil.onnx"))(d)

    def absolute(d):
        manifest_edit(lambda m: m["stages"]["vision"].update(file=str(d / "vision.onnx")))(d)

    def symlink(d):
        outside = d.parent / "outside_link"
        outside.mkdir(exist_ok=True)
        shutil.copy(d / "decode.onnx", outside / "decode.onnx")
        os.remove(d / "decode.onnx")
        os.symlink(outside / "decode.onnx", d / "decode.onnx")

    return {
        "truncated_json": lambda d: (d / "manifest.json").write_text((d / "manifest.json").read_text()[:200]),
        "json_list": write("manifest.json", b"[]"),
        "missing_stages": manifest_edit(lambda m: m.pop("stages")),
        "missing_stage": manifest_edit(lambda m: m["stages"].pop("decode")),
        "missing_embedding": manifest_edit(lambda m: m.pop("embedding")),
        "missing_graph_inputs": manifest_edit(lambda m: m["stages"]["prefill"].pop("graph_inputs")),
        "num_layers_string": manifest_edit(lambda m: m.update(num_layers="4")),
        "image_token_float": manifest_edit(lambda m: m.update(image_token_id=3.5)),
        "stage_not_object": manifest_edit(lambda m: m["stages"].update(vision=[1])),
        "bad_dtype": manifest_edit(lambda m: m["stages"]["vision"]["inputs"][0].update(dtype="complex")),
        "bad_shape": manifest_edit(lambda m: m["stages"]["vision"]["inputs"][0].update(shape=[None, 3])),
        "unknown_input": manifest_edit(lambda m: m["stages"]["prefill"]["graph_inputs"].update(x="nope")),
        "budgets_not_list": manifest_edit(lambda m: m.update(budgets={})),
        "eos_string": manifest_edit(lambda m: m.update(eos_token_id="2")),
        "embedding_shape": manifest_edit(lambda m: m["embedding"].update(shape=[69])),
        "reference_missing": manifest_edit(lambda m: m["reference_prompt"].pop("images_per_sample")),
        "escape_dotdot": escape,
        "escape_absolute": absolute,
        "escape_symlink": symlink,
        "corrupt_onnx": write("prefill.onnx", b"\x08\x07garbage" * 10),
        "empty_onnx": write("vision.onnx", b""),
        "corrupt_npy": write("embed_tokens.npy", b"\x93NUMPY garbage"),
        "npy_wrong_shape": lambda d: __import__("numpy").save(d / "embed_tokens.npy",
                                                              __import__("numpy").zeros((3, 3), "float32")),
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(_tamper_cases()))
def test_tampered_export_folders_give_input_errors(vqa_export, tmp_path, case):
    from graphprune.targets.lint import check_static_onnx
    from graphprune.targets.ort import OrtPrunedModel
    _, _, out, _ = vqa_export
    folder = tmp_path / "export"
    shutil.copytree(out, folder)
    _tamper_cases()[case](folder)
    with pytest.raises(InputError) as exc:
        OrtPrunedModel(folder)
    assert str(folder) in str(exc.value) or "manifest" in str(exc.value)
    if case not in ("corrupt_npy", "npy_wrong_shape", "empty_onnx"):       # what the static check reads
        with pytest.raises(GraphpruneError):
            check_static_onnx(folder)


def test_export_refuses_bad_opsets_and_unwritable_folders_before_work(tmp_path, capfd):
    from graphprune.targets.onnx import export_onnx
    model = zoo.tiny_llava()
    pruned = gp.prune(model, "fastv(layer=2, keep=9)")
    for opset in (5, 17, 99, "18", True):
        with pytest.raises(InputError, match="18"):
            export_onnx(pruned, tmp_path / "o", opset=opset)
    file = tmp_path / "f"
    file.write_text("x")
    for out in ("/proc/graphprune_out", file / "sub"):
        with pytest.raises(InputError):
            export_onnx(pruned, out)
    assert capfd.readouterr().out == ""
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_sigterm_mid_export_leaves_no_temp_folder(tmp_path):
    script = ("import graphprune as gp\nfrom graphprune.tools import zoo\nfrom graphprune.targets.onnx import export_onnx\n"
              f"export_onnx(gp.prune(zoo.tiny_llava(), 'fastv(layer=2, keep=9)'), {str(tmp_path / 'out')!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()):
        if proc.poll() is not None:
            pytest.fail(f"export ended before it was signalled: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=240)
    err = proc.stderr.read().decode()[-2000:]
    assert proc.returncode != 0, err
    assert list(tmp_path.iterdir()) == [], err
