"""The one-way data flow, checked on the import graph (issue 14's ratchet).

Library packages (models, data, activations, sae, train, evals, ood and the shared top-level
modules) must never import the report layer or the commands' orchestration (cli, pipeline); no
two modules may import each other, directly or through others; the sibling packages evals and
ood never import each other at all. Today's known exceptions are listed below, so the test fails
both when a new one appears and when one is fixed without being struck from the list: the lists
can only shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

import saeguard

PACKAGE = Path(saeguard.__file__).parent
HIGHER = ("saeguard.report", "saeguard.jobs", "saeguard.cli", "saeguard.pipeline")
LIBRARY = tuple(
    f"saeguard.{name}"
    for name in ("models", "data", "activations", "sae", "train", "evals", "ood", "fileio",
                 "errors", "configs", "planning", "packages")
)  # fmt: skip

KNOWN_UPWARD_IMPORTS = {
    ("saeguard.evals.masking_study", "saeguard.report.study_report"),
    ("saeguard.evals.runner", "saeguard.report.eval_report"),
    ("saeguard.ood.benchmark", "saeguard.report.html"),
    ("saeguard.ood.benchmark", "saeguard.report.ood_report"),
}
"""Compute modules that still render their own HTML (issue 14 moves them to a jobs layer)."""

KNOWN_CYCLES = {
    ("saeguard.evals.masking_study", "saeguard.report.study_report"),
}  # fmt: skip


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


def test_the_library_never_imports_a_higher_layer() -> None:
    graph = import_graph()
    upward = {
        (module, target)
        for module, targets in graph.items()
        if _in(module, LIBRARY)
        for target in targets
        if _in(target, HIGHER)
    }
    assert upward == KNOWN_UPWARD_IMPORTS


def test_no_new_import_cycle() -> None:
    assert cycles(import_graph()) == KNOWN_CYCLES


def test_evals_and_ood_never_import_each_other() -> None:
    assert sibling_imports(import_graph()) == set()


def test_the_checks_see_a_planted_violation() -> None:
    """The graph walk is not vacuous: an upward import, a cycle and an import between siblings
    planted in a copy are found."""
    graph = {name: set(targets) for name, targets in import_graph().items()}
    graph["saeguard.sae.topk"].add("saeguard.report.html")
    graph["saeguard.report.html"].add("saeguard.sae.topk")
    assert ("saeguard.report.html", "saeguard.sae.topk") in cycles(graph)
    graph["saeguard.ood.monitor"].add("saeguard.evals.runner")
    assert sibling_imports(graph) == {("saeguard.ood.monitor", "saeguard.evals.runner")}
    assert len(graph) > 50 and graph["saeguard.cli"], "the walk found too few modules or imports"
