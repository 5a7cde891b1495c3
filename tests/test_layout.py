"""The package's layout rules (docs/design.md, "Layout"): module sizes, one direction of imports,
and stages that pass results forward."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "expand_and_cluster"
#: The pipeline's stage modules, in the order recover() runs them.
STAGES = ["expand", "layerwise", "reconstruct", "repair"]


def _modules() -> dict[str, Path]:
    """Dotted module name (relative to the package, "" for __init__) -> file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (relative imports resolved; a package imported for
    one of its names counts as that package)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if not (node.module or "").startswith("expand_and_cluster"):
                    continue
                base = node.module.split(".")[1:]
            else:
                base = package[: len(package) - node.level + 1] + (
                    node.module.split(".") if node.module else []
                )
            for alias in node.names:
                candidate = ".".join([*base, alias.name])
                found.add(candidate if candidate in modules else ".".join(base))
    return {m for m in found if m in modules and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_module_is_over_500_lines_and_the_cli_over_400():
    sizes = {n: len(p.read_text().splitlines()) for n, p in _modules().items()}
    assert {n: s for n, s in sizes.items() if s > 500} == {}
    assert sizes["cli"] <= 400


def test_no_import_cycles(graph):
    # The package __init__ files re-export: a cycle through one of them is not a real one.
    edges = {n: {m for m in deps if graph.get(m) is not None} for n, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in edges[node]:
            if nxt == "" or nxt in ("ops", "io", "pipeline", "config", "suite"):
                continue  # a package's public face, imported after its modules
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*stack, node, nxt])}")
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [])


def test_ops_and_io_import_no_pipeline_suite_or_cli(graph):
    for name, deps in graph.items():
        if name.split(".")[0] in ("ops", "io"):
            bad = {d for d in deps if d.split(".")[0] in ("pipeline", "suite", "cli")}
            assert not bad, f"{name} imports {bad}"


def test_stages_pass_results_forward(graph):
    for i, stage in enumerate(STAGES):
        deps = graph[f"pipeline.{stage}"]
        for other in STAGES[:i] + STAGES[i + 1 :]:
            assert f"pipeline.{other}" not in deps, f"pipeline.{stage} imports pipeline.{other}"
    shared = [
        "pipeline.train",
        "pipeline.fit",
        "pipeline.cut",
        "pipeline.residual",
        "pipeline.deep_repair",
    ]
    for name in shared:
        assert not {f"pipeline.{s}" for s in STAGES} & graph[name], name
