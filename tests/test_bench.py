"""graphprune bench: a smoke run on a tiny grid (structure and sanity of the results, never timings)."""
import json

import pytest
import torch

from graphprune import tokenops
from graphprune.cli import main
from graphprune.tools import bench, instrument, speed, vqa_model, zoo


@pytest.fixture(scope="module")
def tiny():
    return vqa_model.load_vqa_model("random:tiny")        # 4x4 patch grid (56-px images), 8 LLM layers


def test_grid_smoke(tiny):
    assert tiny.tokens_per_image == 16
    cells = bench.grid_specs(["fastv", "cls_topk", "vtw", "visiontrim"], [8, "default"],
                             tiny.model.config.text_config.num_hidden_layers, tiny.tokens_per_image)
    prepared, skipped = bench.prepare(tiny, cells)
    # visiontrim's own default (keep=64) does not fit 16 patches: skipped with the reason, not an error
    assert [(s["method"], s["budget"]) for s in skipped] == [("visiontrim", "default")]
    items = vqa_model.load_items(None, 5)
    res = bench.run_grid(tiny, prepared, items, batch=3, time_batch=2, repeats=1, quiet=True)
    json.dumps(res)                                     # serialisable as is
    rows = {(r["method"], r["budget"]): r for r in res["cells"]}
    assert list(rows)[0] == ("unpruned", "-") and len(rows) == len(prepared)
    base = rows[("unpruned", "-")]
    for r in rows.values():
        assert 0.0 <= r["accuracy"] <= 1.0
        assert sum(r["accuracy_by_type"].values()) >= 0 and set(r["accuracy_by_type"]) <= set(it.qtype for it in items)
        assert r["prefill_ms"] > 0 and r["e2e_ms"] > 0 and r["speedup"] > 0
        assert r["flops"] <= base["flops"] and r["kv_bytes"] <= base["kv_bytes"]
        assert len(r["tokens_per_layer"]) == 8
    assert base["vision_tokens_kept"] == 16 and base["speedup"] == 1.0
    assert rows[("fastv", "8")]["vision_tokens_kept"] == 8
    assert rows[("cls_topk", "8")]["vision_tokens_kept"] == rows[("cls_topk", "8")]["vision_tokens_into_llm"] == 8
    assert rows[("cls_topk", "default")]["vision_tokens_kept"] == 4          # keep=0.25
    assert rows[("vtw", "default")]["vision_tokens_kept"] == 0               # withdrawn from layer 4 of 8
    assert rows[("fastv", "8")]["flops"] < base["flops"]
    assert res["timing"]["repeats"] == 1 and res["timing"]["batch"] == 2
    assert "fastv" in bench.format_grid(res)


def test_grid_specs_and_errors():
    cells = bench.grid_specs(["mustdrop", "vtw"], [64, 10, "default"], 32, 576)
    assert cells == [("mustdrop", "64", "mustdrop(keep=64, layers=(2, 6, 10, 14))"),
                     ("mustdrop", "10", "mustdrop(keep=10, layers=(2, 6, 10, 14), gamma=0.011, alpha=0.01)"),
                     ("mustdrop", "default", "mustdrop(layers=(2, 6, 10, 14))"), ("vtw", "default", "vtw(layer=16)")]
    assert bench.grid_specs(["mustdrop"], ["default"], 8, 576)[0][2] == "mustdrop(layers=(2, 6))"
    with pytest.raises(bench.BenchError, match="unknown method"):
        bench.grid_specs(["fastvv"], [64], 32, 576)
    with pytest.raises(bench.BenchError, match="1..576"):
        bench.grid_specs(["fastv"], [577], 32, 576)
    with pytest.raises(bench.BenchError, match="positive int"):
        bench.parse_budgets("64,abc")


@pytest.mark.parametrize("argv, message", [
    (["--methods", "nope"], "unknown method"),
    (["--budgets", "0"], "positive int"),
    (["--data", "/nonexistent/q.jsonl"], "does not exist"),
    (["--json", "/nonexistent/dir/out.json"], "does not exist"),
    (["--pipeline", "fastv(keep=)"], "parse"),
    (["--speed", "--model", "random"], "--speed"),
    (["--linear", "mkl"], "--linear 'mkl'"),
    (["--speed", "--linear", "aten,mkl"], "unknown linear lowering 'mkl'"),
    (["--compiled"], "--speed --compiled"),
    (["--speed", "--video", "--compiled"], "give one"),
    (["--speed", "--compiled", "--methods", "dart"], "--methods does not apply"),
    (["--speed", "--compiled", "--linear", "mkl"], "unknown linear lowering 'mkl'"),
])
def test_cli_bad_input_fails_before_work(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--quiet", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_json_and_plot(tmp_path, capsys):
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["bench", "--model", "random:tiny", "--methods", "fastv", "--budgets", "8", "--n", "3", "--batch", "2",
            "--time-batch", "2", "--repeats", "1", "--quiet", "--json", str(out), "--linear", "packed",
            "--pipeline", "random(layer=1, keep=4)"]
    try:
        import matplotlib  # noqa: F401
        argv += ["--plot", str(plot)]
    except ImportError:
        plot = None
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "fastv" in text and "unpruned" in text and "custom #1: random(" in text
    res = json.loads(out.read_text())
    assert res["questions"] == 3 and res["config"]["budgets"] == "8" and res["machine"]["torch"] == torch.__version__
    assert res["config"]["linear"] == "packed" and res["machine"]["allocator"]
    assert [(c["method"], c["budget"]) for c in res["cells"]] == [("unpruned", "-"), ("fastv", "8"), ("custom", "#1")]
    if plot is not None:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_data_jsonl(tmp_path):
    from graphprune.tools import vqa
    from graphprune.tools.images import write_png
    s = vqa.sample_at("test", 0)
    write_png(str(tmp_path / "a.png"), s.image)
    (tmp_path / "q.jsonl").write_text(json.dumps({"image": "a.png", "question": s.question, "answer": s.answer}) + "\n")
    items = vqa_model.load_items(str(tmp_path), 10)
    assert len(items) == 1 and torch.equal(items[0].image, s.image) and items[0].answer == s.answer


def test_fixed_selection_is_the_same_computation(tiny):
    """The speed mode's selection-overhead baseline: selection nodes replaced by their recorded
    outputs gives the same logits, without the selection nodes."""
    from graphprune import prune
    kw = tiny.inputs(vqa_model.load_items(None, 2))
    for spec in ("fastv(layer=2, keep=8)", "cls_topk(keep=8)", "visiontrim(keep=8, stage='llm', layer=2)"):
        pm = prune(tiny.model, spec)
        fixed = instrument.fixed_selection(pm, kw)
        assert torch.allclose(pm(**kw).logits, fixed(**kw).logits, atol=1e-6)
        for gm in instrument.executed_graphs(fixed).values():
            assert not {n.target for n in gm.graph.nodes} & set(instrument.SELECTION_FNS)
        assert any(n.target in instrument.SELECTION_FNS for gm in instrument.executed_graphs(pm).values()
                   for n in gm.graph.nodes)


def test_choosing_nodes_are_the_selection_and_its_scoring(tiny):
    """The nodes timed as selection overhead: each selection node and the scoring that fed only it,
    no layer computation; running the graphs through their clock leaves the output unchanged."""
    from graphprune import prune
    kw = tiny.inputs(vqa_model.load_items(None, 2))
    pm = prune(tiny.model, "fastv(layer=2, keep=8)")
    names = instrument.choosing_nodes(pm, kw)
    prefill = {n.name: n for n in instrument.executed_graphs(pm)["prefill"].graph.nodes}
    chosen = [prefill[n] for n in names["prefill"]]
    assert any(n.target in instrument.SELECTION_FNS for n in chosen)
    assert any(n.target is tokenops.attention_rows for n in chosen)             # FastV's score: attention rows
    assert not any(n.target in (torch.ops.aten.linear.default, torch.ops.aten.scaled_dot_product_attention.default)
                   for n in chosen)
    assert names.get("vision", set()) == set()
    clocked, spent = instrument.timed_nodes(pm, names)
    assert torch.equal(clocked(**kw).logits, pm(**kw).logits) and spent["nodes"] > 0


def test_speed_mode_smoke():
    # a small config (12x12 patch grid; 3 vision layers so MustDrop's merge fits) instead of SPEED_CONFIG
    cfg = dict(zoo.CONFIGS["tiny"], image_size=168, vision_layers=3)
    res = speed.run_speed(["fastv", "mustdrop"], repeats=1, decode_steps=2, config=cfg, quiet=True)
    json.dumps(res)
    assert [(r["method"], r["linear"]) for r in res["rows"]] == [
        (m, lin) for lin in ("aten", "packed") for m in ("unpruned", "fastv", "mustdrop")]
    assert res["vision_tokens"] == 144
    for r in (r for r in res["rows"] if r["method"] != "unpruned"):
        assert r["ideal_speedup"] > 1 and r["measured_speedup"] > 0
        assert r["ratio"] == pytest.approx(r["measured_speedup"] / r["ideal_speedup"])
        assert set(r["targets"]) == {"measured_ge_0.9_ideal", "overhead_le_2pct", "decode_le_unpruned"}
        assert r["decode_ms_per_token"] > 0 and r["llm_prefill_ms"] > 0
    for r in res["rows"]:                                         # against plain transformers too
        assert r["vs_transformers"] == pytest.approx(res["transformers_llm_prefill_ms"] / r["llm_prefill_ms"])
    # by prompt length: 1, 2, 4 images of 144 tokens, each after one separator token
    assert sorted({r["tokens"] for r in res["by_length"]}) == [155, 155 + 145, 155 + 3 * 145]
    for n in (1, 2, 4):
        at = [r for r in res["by_length"] if r["images"] == n]
        assert [(r["method"], r["linear"]) for r in at] == [("transformers", None)] + [
            (m, lin) for lin in ("aten", "packed") for m in ("unpruned", "fastv")]
        for r in at[1:]:
            assert r["vs_transformers"] == pytest.approx(at[0]["llm_prefill_ms"] / r["llm_prefill_ms"])
            if r["method"] == "fastv":
                assert r["ideal_speedup"] > 1
                assert r["ratio_vs_transformers"] == pytest.approx(r["vs_transformers"] / r["ideal_speedup"])
    text = speed.format_speed(res)
    assert "ideal" in text and "linear: packed" in text and "against plain transformers" in text
    with pytest.raises(bench.BenchError, match="unknown linear lowering 'mkl'"):
        speed.run_speed(["fastv"], linear="mkl", config=cfg, quiet=True)


def test_model_from_a_saved_directory(tmp_path):
    zoo.build_model(zoo.CONFIGS["tiny"], 1).save_pretrained(str(tmp_path))
    vm = vqa_model.load_vqa_model(str(tmp_path))             # no processor needed: it speaks graphprune.tools.vqa.Vocab
    assert vm.vocab is not None and vm.grid == (4, 4) and vm.source.startswith("trained VQA model")
