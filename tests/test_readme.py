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
    assert len(cmds) >= 2 and cmds[0].endswith("graphprune run") and cmds[1].endswith("python -m pytest -q")
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert cmds[1] in ci


def test_example_pipeline_file_parses():
    passes = gp.as_passes(os.path.join(ROOT, "examples", "pipeline.toml"))
    assert [repr(p) for p in passes] == ["cls_topk(keep=18, positions='compact', layer=-1)", "fastv(layer=2, keep=9)"]


def test_packages_import_under_one_name():
    import graphprune.passes
    import graphprune.targets
    assert graphprune.passes.__name__ == "graphprune.passes" and graphprune.targets.__name__ == "graphprune.targets"
