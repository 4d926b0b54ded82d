"""ONNX export (graphprune.targets.onnx) and the ONNX Runtime runner (graphprune.targets.ort).

Each method is exported once (module-scoped fixture; fastv through the CLI) and run on the ORT
CPU execution provider against eager graphprune: prefill logits on the real tokens to 1e-4,
identical kept tokens and per-layer cache lengths, identical greedy tokens for 16 steps, batch 2
with left padding (the traced example) and batch 1. The exported graphs must hold the selection
(sorted TopK + gathers) and pass the static lint.
"""
import json
import os

import pytest

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'graphprune[onnx]')")
pytest.importorskip("onnx", reason="onnx is not installed (pip install 'graphprune[onnx]')")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'graphprune[onnx]')")

import onnx  # noqa: E402
import torch  # noqa: E402

import graphprune as gp  # noqa: E402
from graphprune.errors import GraphVerificationError, InputError, PassConfigError  # noqa: E402
from graphprune.targets import onnx as gonnx  # noqa: E402
from graphprune.targets.lint import check_static_onnx  # noqa: E402
from graphprune.targets.onnx import export_onnx  # noqa: E402
from graphprune.targets.ort import OrtPrunedModel  # noqa: E402
from graphprune.tools import zoo  # noqa: E402

METHODS = {
    "fastv": "fastv(layer=2, keep=9)",
    "vtw": "vtw(layer=2)",
    "dart": "dart(layer=2, keep=9)",
    "mustdrop": "mustdrop(keep=12, layers=(1, 2), gamma=0.0278, alpha=0.0235, tau=0.01, mode='static', "
                "merge_capacity=30)",
    "cls_fastv": "cls_topk(keep=18) | fastv(layer=2, keep=9)",
}
VISION_SELECTION = {"mustdrop", "cls_fastv"}


@pytest.fixture(scope="module")
def model():
    return zoo.tiny_llava()


@pytest.fixture(scope="module")
def examples(model):
    return {"batch2": zoo.llava_example(model, batch=2, pad=(0, 3)).as_kwargs(),
            "batch1": zoo.llava_example(model, batch=1, seed=1).as_kwargs()}


# fastv (the CLI export) in the fast set; `-m slow` exports the rest (mustdrop: vision-stage merge + LLM stage)
@pytest.fixture(scope="module", params=[pytest.param(m, marks=[] if m == "fastv" else [pytest.mark.slow])
                                        for m in METHODS])
def exported(request, model, tmp_path_factory):
    name = request.param
    out = tmp_path_factory.mktemp("onnx") / name
    pruned = gp.prune(model, METHODS[name])
    if name == "fastv":          # the CLI subcommand writes this one (same model object, same pipeline)
        from graphprune import cli
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cli, "load_model", lambda n, **kw: (model, "test model"))
            assert cli.main(["export-onnx", "--model", "tiny-llava", "--pipeline", METHODS[name],
                             "--out", str(out)]) == 0
    else:
        export_onnx(pruned, out)
    return name, pruned, out, OrtPrunedModel(out)


def _real(out, mask):
    return mask.gather(1, out.kept) == 1


@pytest.mark.parametrize("which", ["batch2", "batch1"])
def test_prefill_matches_eager(exported, examples, which):
    name, pruned, out, ort_model = exported
    kw = examples[which]
    ref, got = pruned(**kw), ort_model(**kw)
    assert ort_model.provider == "CPUExecutionProvider"
    assert torch.equal(ref.kept, got.kept)
    assert ref.cache.lengths() == got.cache.lengths()
    real = _real(ref, kw["attention_mask"])
    torch.testing.assert_close(got.logits[real], ref.logits[real], atol=1e-4, rtol=0)
    for a, b in zip(ref.cache, got.cache):      # padded slots hold whatever a fully masked row computes
        assert torch.equal(a.mask, b.mask) and torch.equal(a.index, b.index)
        real = a.mask.bool()[:, None, :, None].expand_as(a.keys)
        torch.testing.assert_close(b.keys[real], a.keys[real], atol=1e-4, rtol=0)
        torch.testing.assert_close(b.values[real], a.values[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("which", ["batch2", "batch1"])
def test_greedy_tokens_match_eager(exported, examples, which):
    name, pruned, out, ort_model = exported
    kw = examples[which]
    ref = pruned.generate(**kw, max_new_tokens=16)
    got = ort_model.generate(**kw, max_new_tokens=16)
    assert torch.equal(ref, got)
    assert ort_model.report.decode_steps == pruned.report.decode_steps


def _ops(path):
    return list(onnx.load(str(path)).graph.node)


def test_export_holds_the_selection(exported, examples):
    name, pruned, out, _ = exported
    files = sorted(os.listdir(out))
    assert files == ["decode.onnx", "embed_tokens.npy", "manifest.json", "prefill.onnx", "vision.onnx"]
    stages = ["prefill", "vision"] if name in VISION_SELECTION else ["prefill"]
    if name == "vtw":
        stages = ["prefill"]
    for stage in stages:
        nodes = _ops(out / f"{stage}.onnx")
        topk = [n for n in nodes if n.op_type == "TopK"]
        assert topk, f"{stage}.onnx of {name} has no TopK"
        assert all(next((a.i for a in n.attribute if a.name == "sorted"), 1) == 1 for n in topk)
        assert any(n.op_type in ("GatherElements", "Gather") for n in nodes)
    assert check_static_onnx(out) == [str(out / f) for f in ("vision.onnx", "prefill.onnx", "decode.onnx")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["static"] and manifest["opset"] >= 18
    assert manifest["pipeline_repr"] == " | ".join(repr(p) for p in pruned.pipeline)
    ref = pruned(**examples["batch2"])
    assert manifest["reference_prompt"]["kv_lengths"] == ref.cache.lengths()
    prefill = manifest["stages"]["prefill"]
    names = [i["name"] for i in prefill["inputs"]]
    assert names[:4] == ["inputs_embeds", "position_ids", "attention_mask", "vision_pos"]
    assert prefill["inputs"][0]["shape"][:2] == ["batch", "seq"]
    assert [o["name"] for o in prefill["outputs"]][0] == "logits"
    decode = manifest["stages"]["decode"]
    past = [i for i in decode["inputs"] if i["name"].startswith(("past_k_", "kv_mask_"))]
    assert [i["shape"][2 if i["name"].startswith("past") else 1] for i in past][:2] == ["past_0", "past_1"]
    assert {i["name"] for i in decode["inputs"]} >= {"kv_mask_3", "past_v_3"}
    if name in ("fastv", "vtw", "dart"):
        assert prefill["none_inputs"] == ["vision_protected"]


# -- the lint --------------------------------------------------------------------------------------

def test_static_lint_rejects_dynamic_ops(tmp_path):
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    outs = [helper.make_tensor_value_info(n, TensorProto.INT64, None) for n in ("nz", "i")]
    vals = helper.make_tensor_value_info("v", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("NonZero", ["x"], ["nz"], name="nz"),
                               helper.make_node("TopK", ["x", "k"], ["v", "i"], name="tk", sorted=0)],
                              "g", [x, k], outs + [vals])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(GraphVerificationError, match="NonZero node 'nz'.*TopK node 'tk' with sorted=0"):
        check_static_onnx(path)
    (tmp_path / "manifest.json").write_text(json.dumps({"static": False}))
    assert check_static_onnx(path) == []       # not marked static: not checked


# -- bad input: clear errors, nothing written -------------------------------------------------------

def test_exact_mode_is_refused(model, tmp_path):
    out = tmp_path / "out"
    pruned = gp.prune(model, "mustdrop_filter(layers=(2,), gamma=0.0278, alpha=0.0235, mode='exact')")
    with pytest.raises(PassConfigError, match="mode='static'"):
        export_onnx(pruned, out)
    assert not out.exists() and os.listdir(tmp_path) == []


def test_non_empty_out_dir_needs_overwrite(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="overwrite=True"):
        export_onnx(gp.prune(model, "fastv(layer=2, keep=9)"), out)
    assert os.listdir(out) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_failed_export_leaves_nothing_behind(model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def broken(stage, gm, args, onnx_inputs, onnx_outputs, dynamic_shapes, path, *rest):
        with open(path, "wb") as f:
            f.write(b"half")
        raise gonnx.ExportError(f"{stage}: simulated failure")
    monkeypatch.setattr(gonnx, "_export", broken)
    monkeypatch.setattr(gonnx, "_STAGE_CACHE", {})
    with pytest.raises(gonnx.ExportError, match="simulated"):
        export_onnx(gp.prune(model, "fastv(layer=2, keep=9)"), out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["keep.txt"]


def test_cli_refuses_non_empty_out_before_building(tmp_path, capsys, monkeypatch):
    from graphprune import cli
    (tmp_path / "x").write_text("")
    monkeypatch.setattr(cli, "load_model", lambda n, **kw: pytest.fail("model built before the check"))
    with pytest.raises(SystemExit) as e:
        cli.main(["export-onnx", "--pipeline", "fastv(layer=2, keep=9)", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_runner_refuses_text_only_prompt_and_missing_export(exported, tmp_path):
    name, pruned, out, ort_model = exported
    if name != "fastv":
        pytest.skip("once")
    ids = torch.tensor([[1, 5, 6, 7]])
    with pytest.raises(InputError, match="text-only"):
        ort_model(input_ids=ids)
    with pytest.raises(InputError, match="no manifest.json"):
        OrtPrunedModel(tmp_path)
