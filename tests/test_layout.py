"""The package layout: folders follow the flow, and no import runs back up a layer or round in a cycle.

Layers, lowest first: shared helpers (errors, files, storage, config, devices) < data < train < export and
runtime < evaluate < embed < the commands that run the whole flow (cli, demo, serve). A module may
import its own layer and those below. serving/ sits on top of the pipeline, which never imports it.
Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = [
    ("pipeline.errors", "pipeline.files", "pipeline.storage", "pipeline.config", "pipeline.devices"),
    ("pipeline.data",),
    ("pipeline.train",),
    ("pipeline.export", "pipeline.runtime"),
    ("pipeline.evaluate",),
    ("pipeline.embed",),
    ("pipeline.cli", "pipeline.demo", "pipeline.serve"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module of this project that `path` imports (`from pipeline.data import stream` -> pipeline.data.stream)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in ("pipeline", "serving") and name in MODULES}


MODULES = {module_name(p) for root in ("pipeline", "serving") for p in (REPO / root).rglob("*.py")}


def layer(module: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py: place it")


def graph() -> dict[str, set[str]]:
    edges = {}
    for root in ("pipeline", "serving"):
        for path in (REPO / root).rglob("*.py"):
            name = module_name(path)
            edges[name] = {m for m in imports(path) if m != name and not name.startswith(m + ".")}
    return edges


def test_every_pipeline_module_has_a_layer_and_imports_only_downward():
    upward = []
    for module, targets in graph().items():
        if not module.startswith("pipeline"):
            continue
        for target in targets:
            assert not target.startswith("serving"), f"{module} imports {target}: the pipeline never imports serving"
            if target.startswith("pipeline.") and layer(target) > layer(module):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports up a layer: " + ", ".join(sorted(upward))


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_layers_match_the_folders():
    """The flow's stages are folders (or single modules), so the tree reads in the order data flows."""
    packages = sorted(p.name for p in (REPO / "pipeline").iterdir() if (p / "__init__.py").is_file())
    assert packages == ["data", "embed", "evaluate", "train"]
    assert all(layer(m) is not None for m in MODULES if m.startswith("pipeline.") and m.count(".") >= 1)
