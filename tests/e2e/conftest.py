"""Fixtures of the e2e suite: what it needs (root, HAProxy, iproute2, util-linux, a JDK, nginx),
the per-test cluster that is always torn down, and the figures every scenario reports.

A missing requirement skips with one line, except under CI (`CI` set): there a skip would hide
that the suite did not run, so it fails instead (.ci/run installs HAProxy, nginx, runc and the JDK).

`E2E_RUNS=N` runs every scenario N times (default 1, as CI does), for figures: the terminal
summary then gives each scenario's range over the runs.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IS_ROOT, Processes
from tests.e2e.harness import Cluster, compile_java

FIGURES: list[dict[str, Any]] = []
_figures_file: list[Path] = []


def _runs() -> int:
    text = os.environ.get("E2E_RUNS", "").strip() or "1"
    if not text.isdigit() or not 1 <= int(text) <= 100:
        raise pytest.UsageError(f"E2E_RUNS={text!r}: expected a number of runs from 1 to 100")
    return int(text)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`E2E_RUNS=N`: each e2e scenario N times, as `[...-run1]` to `[...-runN]`."""
    runs = _runs()
    if runs > 1 and metafunc.definition.get_closest_marker("e2e") is not None:
        metafunc.fixturenames.append("e2e_run")
        metafunc.parametrize("e2e_run", range(1, runs + 1), ids=lambda i: f"run{i}")


def _not_available(need_java: bool, need_nginx: bool = False) -> str | None:
    if not IS_ROOT:
        return "needs root (network and PID namespaces)"
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux"),
                          ("nsenter", "util-linux"), ("haproxy", "haproxy")):
        if not shutil.which(tool):
            return f"needs {tool} (apt-get install {package})"
    if need_java and not (shutil.which("java") and shutil.which("javac")):
        return "needs a JDK (apt-get install default-jdk-headless)"
    if need_nginx and not shutil.which("nginx"):
        return "needs nginx (apt-get install nginx)"
    return None


def require(need_java: bool = False, need_nginx: bool = False) -> None:
    reason = _not_available(need_java, need_nginx)
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI: e2e {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    require()
    built = Cluster(Processes(tmp_path))
    try:
        yield built
    finally:
        built.close()


@pytest.fixture(scope="session")
def java_classes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    require(need_java=True)
    return compile_java(tmp_path_factory.mktemp("e2e-java"))


@pytest.fixture(scope="session")
def figures_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = Path(os.environ.get("E2E_FIGURES") or tmp_path_factory.getbasetemp() / "e2e.json")
    _figures_file.append(path)
    return path


@pytest.fixture
def record_figures(figures_file: Path) -> Callable[[dict[str, Any]], None]:
    def record(figures: dict[str, Any]) -> None:
        FIGURES.append(figures)
        figures_file.write_text(json.dumps(FIGURES, indent=2) + "\n")
        print(json.dumps(figures, indent=2))  # shown with -s, and with -rA for passed tests

    return record


def one_line(f: dict[str, Any]) -> str:
    drain = f.get("drain") or {}
    return (
        f"{f['scenario']:<44} failures {f['failures']:>4} / {f['requests']:<5} "
        f"pod gone {f['pod_gone_s']:>5}s (bound {f['bound_s'] or '-'}) "
        f"SIGKILL {'yes' if f['sigkill'] else 'no '} "
        f"gateway down {f['gateway_marked_upstream_down']} "
        f"drain {drain.get('reason', '-')}"
        + (f"  {f['failures_by_kind']}" if f["failures"] else "")
    )


def ranges(all_figures: list[dict[str, Any]]) -> list[str]:
    """Per scenario: runs, failed requests, pod gone, SIGKILLs, gateway down, as min-max."""
    by_scenario: dict[str, list[dict[str, Any]]] = {}
    for f in all_figures:
        by_scenario.setdefault(f["scenario"], []).append(f)

    def span(runs: list[dict[str, Any]], key: str) -> str:
        values = [r[key] for r in runs if r.get(key) is not None]
        return f"{min(values)}-{max(values)}" if values else "-"

    return [
        f"{name:<44} runs {len(runs):>2}  failures {span(runs, 'failures'):>9}  "
        f"pod gone {span(runs, 'pod_gone_s'):>11}s  "
        f"SIGKILL {sum(1 for r in runs if r['sigkill'])}  "
        f"gateway down {span(runs, 'gateway_marked_upstream_down')}"
        for name, runs in by_scenario.items()
    ]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section("e2e figures (times in seconds from the pod's deletion)")
    for figures in FIGURES:
        terminalreporter.line(one_line(figures))
    if len(FIGURES) > len({f["scenario"] for f in FIGURES}):
        terminalreporter.section("e2e ranges over the runs (min-max)")
        for line in ranges(FIGURES):
            terminalreporter.line(line)
    if _figures_file:
        terminalreporter.line(f"JSON: {_figures_file[0]}")
