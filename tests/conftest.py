"""Shared fixtures: how to run drainctl (source or frozen), processes that are always cleaned up."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"
IS_ROOT = os.geteuid() == 0

# Every Python a test starts imports this checkout's drainctl, whatever copy is installed.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT / "supervisor"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
)


def drainctl_argv() -> list[str]:
    """DRAINCTL_BIN=dist/drainctl runs every integration test against the frozen binary."""
    binary = os.environ.get("DRAINCTL_BIN")
    if binary:
        return [str(Path(binary).resolve())]
    return [sys.executable, "-m", "drainctl"]


def app(name: str, *args: str) -> list[str]:
    return [sys.executable, str(APPS / name), *args]


needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (PID/network namespaces)")
needs_unshare = pytest.mark.skipif(
    not (IS_ROOT and shutil.which("unshare")), reason="needs root and unshare(1)"
)


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    """Poll with a bound (tini's busy_wait); returns the first truthy value or fails."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


class Proc:
    """A started process whose stdout/stderr are files (no pipe can fill and block it)."""

    def __init__(self, popen: subprocess.Popen[bytes], out: Path, err: Path) -> None:
        self.popen = popen
        self.out_path = out
        self.err_path = err

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in self.stderr().splitlines():
            if line.startswith("{"):
                found.append(json.loads(line))
        return found

    def event_names(self) -> list[str]:
        return [e["event"] for e in self.events()]

    def wait_output(self, text: str, timeout: float = 10.0) -> None:
        wait_for(lambda: text in self.stdout() or self.popen.poll() is not None, timeout)
        assert text in self.stdout(), f"{text!r} not in stdout: {self.stdout()!r} / {self.stderr()}"

    def wait_event(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for event in self.events():
                if event["event"] == name:
                    return event
            return None

        return wait_for(find, timeout)  # type: ignore[no-any-return]

    def wait(self, timeout: float = 15.0) -> int:
        return self.popen.wait(timeout)

    def signal(self, signo: int) -> None:
        self.popen.send_signal(signo)


class Processes:
    """Starts processes in their own sessions; kills every one of their groups at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[Proc] = []

    def start(
        self,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        preexec: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> Proc:
        index = len(self.started)
        out, err = self.tmp / f"p{index}.out", self.tmp / f"p{index}.err"
        full_env = dict(os.environ)
        full_env.setdefault("DRAINCTL_LOG_FORMAT", "json")
        full_env["PYTHONPATH"] = str(ROOT / "supervisor") + os.pathsep + str(ROOT)
        full_env.update(env or {})
        with out.open("wb") as o, err.open("wb") as e:
            popen = subprocess.Popen(
                list(argv), stdout=o, stderr=e, stdin=subprocess.DEVNULL, env=full_env,
                start_new_session=True, preexec_fn=preexec, **kwargs,
            )
        proc = Proc(popen, out, err)
        self.started.append(proc)
        return proc

    def track(self, popen: subprocess.Popen[bytes]) -> None:
        """Clean up a process started another way, like the ones started here."""
        self.started.append(Proc(popen, self.tmp / "untracked.out", self.tmp / "untracked.err"))

    def drainctl(self, *args: str, pid1: bool = False, **kwargs: Any) -> Proc:
        argv = [*drainctl_argv(), *args]
        if pid1:
            argv = ["unshare", "--pid", "--fork", "--mount-proc", *argv]
        return self.start(argv, **kwargs)

    def cleanup(self) -> None:
        for proc in self.started:
            for target in _tree(proc.pid):
                try:
                    os.kill(target, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass


def _tree(pid: int) -> list[int]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [p.pid for p in root.children(recursive=True)] + [pid]
    except psutil.Error:
        return []


def inner_pid(proc: Proc, timeout: float = 5.0) -> int:
    """The host pid of drainctl when it runs as PID 1 under `unshare --fork`."""
    import psutil

    def find() -> int | None:
        try:
            children = psutil.Process(proc.pid).children()
        except psutil.Error:
            return None
        return children[0].pid if children else None

    return wait_for(find, timeout)  # type: ignore[no-any-return]


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.cleanup()


def shell_quote(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)
