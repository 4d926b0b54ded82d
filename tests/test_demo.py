"""graphprune demo: runs, prints the side-by-side answers, writes one image per question."""
import os

import pytest

from graphprune.cli import main
from graphprune.tools import demo, vqa_model, zoo
from graphprune.tools.images import read_png


def test_demo_tiny(tmp_path):
    vm = vqa_model.load_vqa_model("random:tiny")
    items = vqa_model.load_items(None, 2)
    pipes = ["fastv(layer=2, keep=8)", "visiontrim(keep=8)"]
    res = demo.run_demo(vm, items, pipes, str(tmp_path), repeats=1)
    assert [r["pipeline"] for r in res["rows"]] == ["unpruned", *pipes]
    assert all(len(r["answers"]) == 2 and r["prefill_ms"] > 0 for r in res["rows"])
    assert [len(k) for k in res["rows"][0]["kept"]] == [16, 16] and [len(k) for k in res["rows"][1]["kept"]] == [8, 8]
    assert res["rows"][1]["kv_bytes"] < res["rows"][0]["kv_bytes"]
    assert res["images"] == [str(tmp_path / "question_0.png"), str(tmp_path / "question_1.png")]
    assert read_png(res["images"][0]).shape == (3, 56, 3 * 56 + 2 * 6)         # three panels, 6-px gaps
    text = demo.format_demo(res, "model: tiny")
    assert items[0].question in text and "[2]" in text


def test_demo_cli(tmp_path, capsys):
    assert main(["demo", "--model", "random:tiny", "--n", "2", "--pipeline", "cls_topk(keep=4)", "--repeats", "1",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "unpruned" in out and "cls_topk" in out
    assert sorted(os.listdir(tmp_path)) == ["question_0.png", "question_1.png"]


@pytest.mark.skipif(not os.path.isfile(os.path.join(zoo.vqa_weights_dir(), "model.safetensors")),
                    reason="the shipped VQA weights are not there yet")
def test_demo_shipped_model(tmp_path, capsys):
    assert main(["demo", "--n", "3", "--repeats", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fastv" in out and "mustdrop" in out and "visiontrim" in out
    assert len(os.listdir(tmp_path)) == 3


def test_demo_without_weights_says_how_to_get_them(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(zoo, "vqa_weights_dir", lambda: str(tmp_path))
    monkeypatch.setattr(vqa_model, "_LOADED", {})              # not the model an earlier test loaded
    with pytest.raises(SystemExit) as e:
        main(["demo", "--no-images"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "train_vqa_model.py" in err and "--model random" in err
