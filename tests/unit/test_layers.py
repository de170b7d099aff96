"""The one-way data flow, checked on the import graph (issue 14).

Three layers and the command line: the library (models, data, activations, sae, train, evals,
ood, robustify, guard, browse and the shared top-level modules) < report (renders documents it
is handed) < service (the HTTP app around a monitor, and its client) < jobs (the commands'
orchestration) < cli. A module imports only its own layer or lower ones; no two modules import
each other, directly or through others; the sibling packages evals and ood never import each
other at all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import saeguard

PACKAGE = Path(saeguard.__file__).parent
LAYERS = (
    ("library", ("saeguard.models", "saeguard.data", "saeguard.activations", "saeguard.sae",
                 "saeguard.train", "saeguard.evals", "saeguard.ood", "saeguard.robustify",
                 "saeguard.configs", "saeguard.defaults", "saeguard.devices",
                 "saeguard.distributed", "saeguard.errors", "saeguard.fileio",
                 "saeguard.steps", "saeguard.guard", "saeguard.browse",
                 "saeguard.packages")),
    ("report", ("saeguard.report",)),
    ("service", ("saeguard.serve",)),
    ("jobs", ("saeguard.jobs",)),
    ("cli", ("saeguard.cli", "saeguard.__main__")),
)  # fmt: skip
"""Lowest first; the package ``saeguard`` itself (its version) belongs to none."""

SIBLINGS = (("saeguard.evals", "saeguard.ood"),)
"""Library packages that never import each other: what both need lives below them."""


def import_graph() -> dict[str, set[str]]:
    """saeguard module -> the saeguard modules it imports anywhere (function bodies too)."""
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                candidates = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            imported |= {c for c in candidates if c in files and c != name}
        graph[name] = imported
    return graph


def cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: set[tuple[str, ...]] = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.add(tuple(sorted(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _in(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def sibling_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Imports from one package of a ``SIBLINGS`` pair into the other."""
    return {
        (module, target)
        for pair in SIBLINGS
        for a, b in (pair, pair[::-1])
        for module, targets in graph.items()
        if _in(module, (a,))
        for target in targets
        if _in(target, (b,))
    }


def layer_of(module: str) -> int | None:
    return next((rank for rank, (_, prefixes) in enumerate(LAYERS) if _in(module, prefixes)), None)


def upward_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Imports of a module from a higher layer than its own."""
    found = set()
    for module, targets in graph.items():
        own = layer_of(module)
        for target in targets:
            other = layer_of(target)
            if own is not None and other is not None and other > own:
                found.add((module, target))
    return found


def test_every_module_belongs_to_a_layer() -> None:
    assert [m for m in import_graph() if m != "saeguard" and layer_of(m) is None] == []


def test_no_module_imports_a_higher_layer() -> None:
    assert upward_imports(import_graph()) == set()


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == set()


def test_evals_and_ood_never_import_each_other() -> None:
    assert sibling_imports(import_graph()) == set()


def test_the_checks_see_a_planted_violation() -> None:
    """The graph walk is not vacuous: an upward import, a cycle and an import between siblings
    planted in a copy are found."""
    graph = {name: set(targets) for name, targets in import_graph().items()}
    graph["saeguard.sae.topk"].add("saeguard.report.html")
    graph["saeguard.report.html"].add("saeguard.sae.topk")
    assert ("saeguard.report.html", "saeguard.sae.topk") in cycles(graph)
    assert upward_imports(graph) == {("saeguard.sae.topk", "saeguard.report.html")}
    graph["saeguard.report.eval_report"].add("saeguard.jobs.eval")
    assert ("saeguard.report.eval_report", "saeguard.jobs.eval") in upward_imports(graph)
    graph["saeguard.ood.monitor"].add("saeguard.evals.core")
    assert sibling_imports(graph) == {("saeguard.ood.monitor", "saeguard.evals.core")}
    assert len(graph) > 50 and graph["saeguard.cli"], "the walk found too few modules or imports"
