"""The layout's rules, read from the source (README, "How it is built").

Imports go one way: cli -> control, demo -> pid1 -> drain -> the base modules (options,
events, exitcodes, durations, signames, redact, faults); app/ imports nothing of drainctl
outside itself. Every import counts, also those inside functions and under TYPE_CHECKING: a
cycle of type-level imports is a cycle a reader has to untangle all the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "supervisor" / "drainctl"

# A module may import its own layer and the layers below it.
LAYERS = {
    "app": 0,  # separate: standard library only (checked below)
    "base": 1,
    "drain": 2,
    "pid1": 3,
    "control": 4,
    "demo": 4,
    "cli": 5,
    "entry": 6,  # __main__
}
BASE = {"drainctl", "drainctl.options", "drainctl.events", "drainctl.exitcodes",
        "drainctl.signames", "drainctl.redact", "drainctl.faults", "drainctl.durations",
        "drainctl._bundle", "drainctl._startmask"}
# The public import paths of the app side: re-exports of drainctl.app.
PUBLIC_APP = {"drainctl.wsgi", "drainctl.asgi"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(module: str) -> str:
    if module in BASE:
        return "base"
    if module in PUBLIC_APP:
        return "app"
    if module == "drainctl.__main__":
        return "entry"
    return module.split(".")[1]


def imports(path: Path) -> set[str]:
    """Every drainctl module `path` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("drainctl"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
            "drainctl"
        ):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                          or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else node.module)
    return found


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer() -> None:
    for module in GRAPH:
        assert layer(module) in LAYERS, module


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_one_way(module: str) -> None:
    mine = layer(module)
    for target in GRAPH[module]:
        theirs = layer(target)
        if mine == "app":
            assert theirs == "app" or target == "drainctl", f"{module} imports {target}"
            continue
        assert theirs != "app" or mine in ("demo", "cli"), f"{module} imports {target}"
        assert LAYERS[theirs] <= LAYERS[mine], f"{module} ({mine}) imports {target} ({theirs})"


def test_no_import_cycle() -> None:
    graph = {m: {t for t in targets if t in GRAPH and t != m} for m, targets in GRAPH.items()}
    # Tarjan's strongly connected components: a cycle is a component of more than one module.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

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
                item = stack.pop()
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert cycles == []


def test_the_rules_can_fail() -> None:
    """The checks above see what they claim to: a known import of each kind is found."""
    assert "drainctl.drain.machine" in GRAPH["drainctl.pid1.supervisor"]
    assert "drainctl.pid1.loop" in GRAPH["drainctl.control.server"]  # type-level only
    assert layer("drainctl.control.server") == "control"
