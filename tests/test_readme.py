"""The README's commands stay true: CI runs exactly its test command, and its examples parse."""
import os
import re

import graphprune as gp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"```bash\n(.*?)\n```", text, re.S)


def test_ci_runs_the_readme_test_command():
    cmds = _readme_commands()
    assert len(cmds) >= 2 and cmds[0].endswith("graphprune demo")
    assert cmds[1].endswith('python -m pytest -q -n 2 --dist loadfile -m "not slow" && bash .ci/check_oldest.sh')     # both ends of the ranges
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert cmds[1] in ci


def test_example_pipeline_file_parses():
    passes = gp.as_passes(os.path.join(ROOT, "examples", "pipeline.toml"))
    assert [repr(p) for p in passes] == ["cls_topk(keep=18, positions='compact', layer=-1)", "fastv(layer=2, keep=9, positions='keep')"]


def test_packages_import_under_one_name():
    import graphprune.passes
    import graphprune.targets
    assert graphprune.passes.__name__ == "graphprune.passes" and graphprune.targets.__name__ == "graphprune.targets"


def test_three_ways_in_run_as_written(tmp_path, monkeypatch, capsys):
    """The README's Python API, torch.compile and ONNX blocks, executed in order in one namespace."""
    import pytest
    pytest.importorskip("onnxruntime", reason="the ONNX block needs pip install 'graphprune[onnx]'")
    import torch
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("<!-- three-ways-in -->")[1].split("<!-- /three-ways-in -->")[0]
    blocks = re.findall(r"```python\n(.*?)\n```", section, re.S)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    torch._dynamo.reset()
    scope = {}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), scope)
    assert (tmp_path / "out" / "fastv" / "manifest.json").exists()
    assert "layer" in capsys.readouterr().out
