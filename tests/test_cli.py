"""The `graphprune` command: inspect (tiny models, full-size configs on the meta device) and run."""
import json

import pytest

from graphprune.cli import main


def run_cli(capsys, *argv):
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def fails(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("graphprune: error: ") and "Traceback" not in err
    return err


def test_inspect_tiny_llava(capsys):
    out = run_cli(capsys, "inspect", "tiny-llava", "--no-decode")
    assert "LlavaForConditionalGeneration" in out
    assert "CLS yes" in out and "patch grid 6x6" in out and "tokens/image 36" in out
    assert "vision [6, 42) 36" in out

    d = json.loads(run_cli(capsys, "inspect", "tiny-llava", "--json"))
    vision, prefill, decode = (d["stages"][k] for k in ("vision", "prefill", "decode"))
    assert vision["captured"] and vision["cls"] is True and vision["grid"] == [6, 6]
    assert vision["tokens_per_image"] == 36 and vision["layers"] == 2 and vision["encoder_layers"] == 3
    assert prefill["layers"] == decode["layers"] == 4 and prefill["kv_heads"] == 2
    sample = d["prompt"]["samples"][0]
    assert sample["vision"] == [[6, 42]] and sample["text_before"] == 6 and sample["text_after"] == 7
    assert "cost" not in d


def test_inspect_tiny_qwen2vl_with_method(capsys):
    d = json.loads(run_cli(capsys, "inspect", "tiny-qwen2vl", "--no-decode", "--json",
                           "--method", "fastv(layer=2, keep=4)"))
    vision = d["stages"]["vision"]
    assert vision["captured"] is False and "eager" in vision["reason"]
    assert vision["cls"] is False and vision["grid"] == [8, 8] and vision["tokens_per_image"] == 16
    assert d["prompt"]["samples"][0]["vision"] == [[7, 23]]
    cost = d["cost"]
    assert [r["tokens"] for r in cost["layers"]] == [31, 31, 19, 19]
    assert cost["vision"]["captured"] is False and cost["totals"]["vision_flops"] == 0
    assert cost["totals"]["flops"] < cost["baseline"]["flops"]


@pytest.mark.slow
def test_inspect_llava_7b_on_meta(capsys):
    out = run_cli(capsys, "inspect", "--config", "llava-1.5-7b", "--method", "vtw(layer=16)", "--text-tokens", "64")
    assert "patch grid 24x24" in out and "layers  32" in out and "vs unpruned" in out
    assert "vision [32, 608) 576" in out

    # second call: the meta model and its graphs are cached in the process
    d = json.loads(run_cli(capsys, "inspect", "--config", "llava-1.5-7b", "--method", "vtw(layer=16)", "--json"))
    cost = d["cost"]
    rows = cost["layers"]
    assert len(rows) == 32
    assert all(r["tokens"] == 640 for r in rows[:16]) and all(r["tokens"] == 64 for r in rows[16:])
    assert all(r["kv_bytes"] < rows[0]["kv_bytes"] for r in rows[16:])
    assert rows[0]["kv_bytes"] == 2 * 32 * 128 * 640 * 2          # fp16
    assert cost["totals"]["flops"] < cost["baseline"]["flops"]
    assert 8.0e12 < cost["baseline"]["llm_flops"] < 9.0e12       # ~8.5 TFLOPs (VTW paper, MME-length prompt)
    assert 0.5 < cost["ratio"]["llm_flops"] < 0.6                 # vtw(16) roughly halves the LLM part
    assert cost["vision"]["captured"] and cost["vision"]["flops"] > 0


@pytest.mark.slow
def test_accountant_fastv_and_cls_topk():
    from graphprune.tools.accountant import account
    r = account("llava-1.5-7b", "fastv(layer=2, keep=144)", text_tokens=64)
    assert [r["layers"][i]["tokens"] for i in (0, 1, 2, 31)] == [640, 640, 208, 208]
    r = account("llava-1.5-7b", "cls_topk(keep=144)", text_tokens=64)
    assert r["layout"]["vision_tokens_per_image_llm"] == 144 and r["layers"][0]["tokens"] == 208
    assert r["vision"]["tokens_out"] == 144


def test_unknown_method_exits_2(capsys):
    err = fails(capsys, "inspect", "tiny-llava", "--method", "nope(layer=2)")
    assert "unknown method 'nope'" in err and "fastv" in err and "vtw" in err
    err = fails(capsys, "run", "--method", "fastv(layer=2, keep=0)")
    assert "keep=0" in err


def test_bad_config_exits_2(capsys):
    err = fails(capsys, "inspect", "--config", "no-such-model")
    assert "llava-1.5-7b" in err and "qwen2-vl-7b" in err


def test_run_smoke(capsys):
    out = run_cli(capsys, "run", "--max-new-tokens", "4", "--repeats", "1")
    assert "unpruned" in out and "fastv(layer=2, keep=9" in out and "vtw(layer=2)" in out and "cls_topk" in out
    assert "HF model (reference)" in out and "pipeline: fastv(layer=2, keep=9" in out
    assert "same as unpruned" in out


def test_vqa_commands_listed_and_validated_before_loading(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "bench" in out and "demo" in out and "visualize" in out
    # bad options fail at once, before any model is built or loaded
    assert "--n must be >= 1" in fails(capsys, "bench", "--n", "0")
    assert "unknown method 'nope'" in fails(capsys, "demo", "--pipeline", "nope(keep=2)")
    assert "--question is required" in fails(capsys, "visualize", "--image", __file__, "--pipeline", "fastv",
                                             "--out", "/tmp/x.png")
