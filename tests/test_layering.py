"""The import graph of pipeline/, eval/ and deploy/ (read from the source, every import including those inside
functions, TYPE_CHECKING blocks aside): no cycles, and every module imports only modules of its own layer or below.

Layers, bottom up (docs/ARCHITECTURE.md): base (errors, dtypes, specs, prompts, adapter_meta), the libraries
(edora, merging, data, modeling, recipe, eval, ...), the stages (train, merge, evaluate, serve, ...), run (which
calls the stages), the command line (cli, __main__)."""

import ast
from pathlib import Path

import pytest
from tests_paths import ROOT

BASE = {"pipeline", "pipeline.errors", "pipeline.dtypes", "pipeline.specs", "pipeline.prompts",
        "pipeline.adapter_meta"}
STAGES = {"pipeline.train", "pipeline.merge", "pipeline.evaluate", "pipeline.serve", "pipeline.validate",
          "pipeline.compare", "pipeline.install"}
TOP = {"pipeline.run": 3, "pipeline.run_report": 3, "pipeline.cli": 4, "pipeline.__main__": 4}


def layer(module: str) -> int:
    if module in BASE:
        return 0
    if module in STAGES:
        return 2
    return TOP.get(module, 1)  # every other module of pipeline/, eval/ and deploy/ is library


def modules() -> dict[str, Path]:
    out = {}
    for top in ("pipeline", "eval", "deploy"):
        for f in (ROOT / top).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(name: str, path: Path, known: dict) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                self.generic_visit(node)

        def visit_Import(self, node):
            found.update(a.name for a in node.names)

        def visit_ImportFrom(self, node):
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            # `from pkg import submodule` depends on the submodule (and runs pkg/__init__, which is base or
            # the package's own facade); `from pkg import name` depends on pkg
            found.update(subs if len(subs) == len(node.names) else [base, *subs])

    Visitor().visit(ast.parse(path.read_text()))
    edges = set()
    for m in found:
        while m and m not in known:
            m = m.rpartition(".")[0]
        if m and m != name and not name.startswith(m + "."):  # a package's own __init__ is not an edge
            edges.add(m)
    return edges


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_imports_only_its_layer_or_below(graph):
    assert len(graph) > 40 and "pipeline.edora.layer" in graph  # the graph was read
    upward = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})" for m, deps in graph.items() for d in deps
              if layer(d) > layer(m)]
    assert upward == []


def test_no_import_cycles(graph):
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_edora_depends_on_nothing_but_the_base(graph):
    """The PEFT method stands alone: no stage, no recipe, no merging code."""
    for m, deps in graph.items():
        if m.startswith("pipeline.edora"):
            assert {d for d in deps if not d.startswith("pipeline.edora")} <= BASE, m


def test_only_the_entry_points_import_the_command_line(graph):
    assert sorted(m for m, deps in graph.items() if "pipeline.cli" in deps) == ["pipeline.__main__"]


def test_the_checker_sees_an_upward_import(tmp_path):
    """The graph reader is not blind: a library module importing a stage inside a function is found."""
    (tmp_path / "pipeline").mkdir()
    f = tmp_path / "pipeline" / "lib.py"
    f.write_text("def f():\n    from pipeline.merge import merge\n    from . import specs\n")
    known = {"pipeline.lib": f, "pipeline.merge": f, "pipeline.specs": f}
    deps = imports("pipeline.lib", f, known)
    assert deps == {"pipeline.merge", "pipeline.specs"} and layer("pipeline.merge") > layer("pipeline.lib")
