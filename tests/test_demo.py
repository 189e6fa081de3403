"""`drainctl demo`: the incident fails, drainctl does not, and the demo leaves nothing behind.

The real binary (DRAINCTL_BIN or `python -m drainctl`), as the README's first command runs it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from typing import Any

import psutil
import pytest

from drainctl.demo.scenario import DemoOptions, Figures, Scenario, render
from tests.conftest import Processes, drainctl_argv, wait_for

# The demo takes ~12 s; the bound leaves room for a loaded CI machine, not for a hang.
DEMO_BOUND = 40.0


def _left_over(pids: list[int]) -> list[str]:
    found = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            found.append(f"{pid} {process.status()} {process.cmdline()}")
        except psutil.Error:
            continue
    return found


@pytest.mark.timeout(60)
def test_naive_fails_drainctl_does_not_and_nothing_is_left(procs: Processes) -> None:
    started = time.monotonic()
    proc = procs.drainctl("demo", "--json")
    code = proc.wait(DEMO_BOUND)
    elapsed = time.monotonic() - started
    assert code == 0, proc.stderr()
    figures: dict[str, Any] = json.loads(proc.stdout())
    naive = figures["scenarios"]["naive"]
    fixed = figures["scenarios"]["drainctl"]

    assert naive["failures"] > 0, naive["timeline"]
    assert fixed["failures"] == 0, fixed["timeline"]
    assert fixed["requests"] > 50 and naive["requests"] > 50  # traffic really flowed
    assert fixed["sigkill"] is False and fixed["exit_code"] == 0
    assert fixed["pod_gone_s"] < 10  # inside the grace period, by itself
    texts = [text for _, text in fixed["timeline"]]
    assert any("drain finished: drained" in t for t in texts), texts
    assert any(t.startswith("drainctl exited (code 0)") for t in texts), texts

    # pod-2, the naive app, drainctl and the app under it: all started, all gone.
    assert len(figures["pids"]) >= 4, figures["pids"]
    assert _left_over(figures["pids"]) == []
    assert elapsed < DEMO_BOUND

    # The readable form of the same figures.
    scenarios = [
        Scenario(**{**s, "timeline": [tuple(item) for item in s["timeline"]]})
        for s in (naive, fixed)
    ]
    text = render(Figures(scenarios, figures["pids"], figures["elapsed_s"],
                          DemoOptions(**figures["options"])))
    assert '503 "halting"' in text and "[FAILED]" in text
    assert "200, Connection: close -> reconnect, to pod-2" in text
    assert f"naive: {naive['failures']} of {naive['requests']} requests failed" in text


@pytest.mark.timeout(60)
def test_ctrl_c_kills_every_process_the_demo_started(procs: Processes) -> None:
    proc = procs.drainctl("demo", "--json")
    seen: set[int] = set()

    def drainctl_and_its_app_running() -> bool:
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
            seen.update(c.pid for c in children)
            # scenario B: drainctl run, with the app below it, both in this one snapshot
            runs = {c.pid for c in children if "run" in c.cmdline()}
            return any(c.ppid() in runs for c in children)
        except psutil.Error:
            return False

    wait_for(drainctl_and_its_app_running, timeout=DEMO_BOUND, interval=0.05)
    proc.signal(signal.SIGINT)
    assert proc.wait(15) == 130, proc.stderr()
    assert "interrupted" in proc.stderr()
    assert len(seen) >= 4
    assert _left_over(sorted(seen)) == []


@pytest.mark.parametrize(
    ("args", "words"),
    [(["--delay", "9s"], "--delay: '9s' is past the maximum of 5s"),
     (["--bogus"], "unexpected argument"), (["--clients", "0"], "--clients")],
)
def test_bad_usage_is_one_line_and_exit_2(args: list[str], words: str) -> None:
    result = subprocess.run([*drainctl_argv(), "demo", *args], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert words in result.stderr and result.stderr.count("\n") == 1, result.stderr
