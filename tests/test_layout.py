"""The package layout: no import cycles between graphprune's modules (module-level and
function-level imports alike), and the core never imports the tools or the CLI."""
from __future__ import annotations

import ast
import pathlib

import pytest

import graphprune

ROOT = pathlib.Path(graphprune.__file__).resolve().parent
REPO = ROOT.parent
# the repository's passes/ and targets/ folders install as graphprune.passes / graphprune.targets
SOURCES = {"graphprune": ROOT, "graphprune.passes": REPO / "passes", "graphprune.targets": REPO / "targets"}
CORE = ("graphprune.capture", "graphprune.anatomy", "graphprune.families", "graphprune.rewrite",
        "graphprune.verify", "graphprune.lower", "graphprune.passes")


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for prefix, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            if prefix == "graphprune" and parts and parts[0] in ("passes", "targets"):
                continue
            mods[name] = path
    return mods


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The graphprune modules `name` imports anywhere in its file (a name imported from a package
    counts as that submodule when it is one, else as the package itself)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    out.add(sub)
                elif base in known:
                    out.add(base)
    out.discard(name)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_the_import_graph_is_read(graph):
    assert "graphprune.rewrite.pipeline" in graph["graphprune.lower.runtime"]
    assert "graphprune.rewrite.registry" in graph["graphprune.passes.fastv"]
    assert "graphprune.targets.lint" in graph["graphprune.targets.onnx"]


def test_no_import_cycles(graph):
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_core_does_not_import_tools_or_cli(graph):
    bad = [(m, d) for m, deps in graph.items() if m.startswith(CORE)
           for d in deps if d.startswith(("graphprune.tools", "graphprune.cli"))]
    assert not bad, bad
