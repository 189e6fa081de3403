"""The reliability guarantee (README, "Reliability"), against a real drainctl and real faults.

PID 1 must never die of its own fault nor block: whatever fails inside it (injected with
DRAINCTL_FAULTS, drainctl's own failpoints), whatever happens to its stderr (a full pipe nobody
reads, a closed fd 2, a terminal that went away), however few threads it may start (a pids
cgroup), the app still gets its stop signal at the budget's deadline and drainctl exits with the
app's code.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import Processes, app, drainctl_argv, needs_root, wait_for
from tests.traffic import free_port, signal_time

# grace 3 s, stop-timeout 1 s: the stop signal goes out 2 s after SIGTERM at the latest.
BUDGET = ("--grace-period", "3s", "--stop-timeout", "1s", "--settle", "0.2")
DEADLINE = 2.0
LATE = 0.6  # how late the stop signal may come on a loaded machine


def held_connection(port: int) -> socket.socket:
    """A keep-alive client that never leaves: the drain can only end at its deadline."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    conn.recv(4096)
    return conn


def stopped_in_time(proc_stdout_time: float | None, sigterm_at: float) -> None:
    assert proc_stdout_time is not None, "the app never got its stop signal"
    assert proc_stdout_time - sigterm_at <= DEADLINE + LATE


FAULTS = ["loop", "drain", "job:lookup", "job:count", "job:down", "job:probe", "job:prepare",
          "job:count=exit", "job:down=exit", "job:lookup=exit"]


@pytest.mark.parametrize("fault", FAULTS)
def test_pid1_survives_an_injected_fault(procs: Processes, fault: str) -> None:
    port = free_port()
    proc = procs.drainctl(
        "run", "--delay", "0.2", *BUDGET, "--down-url", f"http://127.0.0.1:{port}/down", "--",
        *app("httpapp.py", "--port", str(port), "--no-close"),
        env={"DRAINCTL_FAULTS": fault})
    proc.wait_output("listening")
    with held_connection(port):
        sigterm_at = time.time()
        proc.signal(signal.SIGTERM)
        assert proc.wait(15) == 128 + signal.SIGTERM, proc.stderr()
    stopped_in_time(signal_time(proc, "SIGTERM"), sigterm_at)
    errors = [e for e in proc.events() if e["event"] == "error"]
    assert errors, f"the injected fault is said: {proc.event_names()}"
    assert all("injected" in e["message"] for e in errors)
    assert len({(e["where"], e["type"]) for e in errors}) == len(errors), "once per place"
    assert "Traceback" not in proc.stderr()
    assert proc.events()[-1] == {**proc.events()[-1], "event": "exit", "code": 143}


def test_the_faults_never_reach_the_app(procs: Processes, tmp_path: Path) -> None:
    out = tmp_path / "env"
    proc = procs.drainctl("run", "--", sys.executable, "-c",
                          f"import os; open({str(out)!r}, 'w').write(repr(dict(os.environ)))",
                          env={"DRAINCTL_FAULTS": "job:count"})
    assert proc.wait(10) == 0
    assert "DRAINCTL_FAULTS" not in out.read_text()


# ---- no thread to be had -------------------------------------------------------------------


LISTENER = """
import signal, socket, sys
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16)
print("listening", flush=True)
signal.signal(signal.SIGTERM, lambda *a: (print("signal SIGTERM %f" % __import__("time").time(),
                                                flush=True), sys.exit(143)))
while True:
    signal.pause()
"""


@contextmanager
def pids_cgroup(limit: int) -> Iterator[Path]:
    """A pids cgroup (v1 or v2) that lets `limit` tasks live in it, threads included."""
    base = Path("/sys/fs/cgroup/pids")
    if not (base / "cgroup.procs").exists():
        base = Path("/sys/fs/cgroup")
        controllers = base / "cgroup.controllers"
        if not controllers.exists() or "pids" not in controllers.read_text():
            pytest.fail("no pids cgroup controller on this machine", pytrace=False)
    group = base / f"drainctl-test-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    try:
        (group / "pids.max").write_text(str(limit))
        yield group
    finally:
        wait_for(lambda: not (group / "cgroup.procs").read_text().split(), timeout=10)
        group.rmdir()


@contextmanager
def unaccepted_connection(port: int) -> Iterator[socket.socket]:
    """An established connection the app never accepts: it counts all the same."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        yield conn


@needs_root
def test_jobs_run_inline_when_no_thread_can_be_had(procs: Processes) -> None:
    port = free_port()
    # drainctl, its app, the log writer and the signal waiter: 4 tasks; a job's thread would be
    # the fifth.
    with pids_cgroup(4) as group:
        procs_file = group / "cgroup.procs"
        proc = procs.drainctl(
            "run", "--delay", "0.2", *BUDGET, "--port", str(port), "--",
            sys.executable, "-c", LISTENER, str(port),
            preexec=lambda: procs_file.write_text(str(os.getpid())))
        proc.wait_output("listening")
        with unaccepted_connection(port):
            sigterm_at = time.time()
            proc.signal(signal.SIGTERM)
            assert proc.wait(15) == 143, proc.stderr()
    stopped_in_time(signal_time(proc, "SIGTERM"), sigterm_at)
    warnings = [e["message"] for e in proc.events() if e["event"] == "warning"]
    assert any("cannot start a thread" in m for m in warnings), proc.stderr()
    finished = next(e for e in proc.events() if e["event"] == "drain.finished")
    assert finished["reason"] == "timeout" and finished["count"] == 1, "it still counted"


# ---- stderr --------------------------------------------------------------------------------


def full_pipe() -> tuple[int, int]:
    """A pipe of one page, already full: every write to it would block."""
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)
    os.set_blocking(write_fd, False)
    try:
        while True:
            os.write(write_fd, b"x" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(write_fd, True)
    return read_fd, write_fd


def start_with_stderr(procs: Processes, stderr_fd: int | None, port: int,
                      *extra: str) -> subprocess.Popen[bytes]:
    """drainctl run with fd 2 as given (None: closed); the app's lines go to a file."""
    env = dict(os.environ, DRAINCTL_LOG_FORMAT="json")

    def child() -> None:
        if stderr_fd is None:
            os.close(2)
        else:
            os.dup2(stderr_fd, 2)

    with (procs.tmp / f"stderr-test-{port}.out").open("wb") as out:
        popen = subprocess.Popen(
            [*drainctl_argv(), "run", "--delay", "0.2", *BUDGET, *extra, "--",
             *app("httpapp.py", "--port", str(port), "--no-close")],
            stdout=out, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            preexec_fn=child, pass_fds=() if stderr_fd is None else (stderr_fd,))
    procs.track(popen)
    return popen


def app_lines(procs: Processes, port: int) -> str:
    return (procs.tmp / f"stderr-test-{port}.out").read_text()


def stop_time(procs: Processes, port: int) -> float | None:
    for line in app_lines(procs, port).splitlines():
        if line.startswith("signal SIGTERM"):
            return float(line.split()[2])
    return None


def sigterm_and_wait(procs: Processes, popen: subprocess.Popen[bytes], port: int,
                     after_stop: Callable[[], None] = lambda: None) -> float:
    wait_for(lambda: "listening" in app_lines(procs, port), timeout=15)
    with held_connection(port):
        sigterm_at = time.time()
        popen.send_signal(signal.SIGTERM)
        wait_for(lambda: stop_time(procs, port), timeout=DEADLINE + 5)
        after_stop()
        assert popen.wait(15) == 143
    return sigterm_at


def _read_all(fd: int, got: list[bytes]) -> None:
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            return
        if not data:
            return
        got.append(data)


def test_a_full_stderr_pipe_never_blocks_the_stop_signal(procs: Processes) -> None:
    read_fd, write_fd = full_pipe()
    port = free_port()
    got: list[bytes] = []
    reader = threading.Thread(target=_read_all, args=(read_fd, got), daemon=True)
    try:
        # --delay 5s does not fit the budget: the start-up warning meets the full pipe before
        # the app exists, and is dropped (and counted).
        popen = start_with_stderr(procs, write_fd, port, "--delay", "5s")
        # Nobody reads stderr until the stop signal went out.
        sigterm_at = sigterm_and_wait(procs, popen, port, after_stop=reader.start)
    finally:
        os.close(write_fd)
    reader.join(5)
    os.close(read_fd)
    stopped_in_time(stop_time(procs, port), sigterm_at)
    text = b"".join(got).decode(errors="replace")
    assert '"event": "events.dropped"' in text, text[-2000:]
    assert '"event": "drain.finished"' in text, "what came after the drop was written"


def test_a_closed_stderr_is_survived(procs: Processes) -> None:
    port = free_port()
    popen = start_with_stderr(procs, None, port)
    sigterm_at = sigterm_and_wait(procs, popen, port)
    stopped_in_time(stop_time(procs, port), sigterm_at)


def test_a_terminal_that_went_away_is_survived(procs: Processes) -> None:
    master, slave = os.openpty()
    port = free_port()
    try:
        popen = start_with_stderr(procs, slave, port)
        wait_for(lambda: "listening" in app_lines(procs, port), timeout=15)
        os.close(master)  # the terminal goes away: writes to it now fail (EIO)
        master = -1
        sigterm_at = sigterm_and_wait(procs, popen, port)
    finally:
        os.close(slave)
        if master >= 0:
            os.close(master)
    stopped_in_time(stop_time(procs, port), sigterm_at)


# ---- signals -------------------------------------------------------------------------------


GROUP_APP = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
if os.fork() == 0:  # a helper in the app's group that takes its time to stop
    signal.signal(signal.SIGTERM, lambda *a: print("helper SIGTERM", flush=True))
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    print("helper ready", flush=True)
    while True:
        time.sleep(1)
signal.signal(signal.SIGUSR1, lambda *a: sys.exit(0))
while True:
    signal.pause()
"""


def test_group_cleanup_gets_stop_timeout_after_an_earlier_forward(procs: Processes) -> None:
    proc = procs.drainctl("run", "--stop-timeout", "1.5s", "--grace-period", "30s", "--",
                          sys.executable, "-c", GROUP_APP)
    proc.wait_output("helper ready")
    proc.signal(signal.SIGINT)  # forwarded to the group long before the app exits; ignored
    proc.wait_event("signal.forwarded")
    time.sleep(2.0)  # longer than stop-timeout: a deadline counted from that forward is past
    proc.signal(signal.SIGUSR1)  # the app exits; its helper is left
    assert proc.wait(15) == 0
    exited = next(e["ts"] for e in proc.events() if e["event"] == "child.exited")
    killed = next(e["ts"] for e in proc.events() if e["event"] == "kill.escalated")
    assert "helper SIGTERM" in proc.stdout(), "the helper got SIGTERM first"
    assert killed - exited >= 1.5 - 0.05, "and its stop-timeout before SIGKILL"


def test_an_inherited_ignored_sigint_stays_ignored_for_the_app(procs: Processes,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "status"
    code = f"import shutil; shutil.copy('/proc/self/status', {str(out)!r})"
    proc = procs.drainctl("run", "--", sys.executable, "-c", code,
                          preexec=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.wait(10) == 0
    ignored = int(next(line.split()[1] for line in out.read_text().splitlines()
                       if line.startswith("SigIgn:")), 16)
    assert ignored & (1 << (signal.SIGINT - 1)), "SIGINT is still ignored in the app"


@needs_root
def test_a_forward_that_is_not_permitted_is_a_warning(procs: Processes) -> None:
    # drainctl without CAP_KILL, its app running as another uid: kill(2) says EPERM.
    proc = procs.start([
        "setpriv", "--bounding-set=-kill", "--inh-caps=-kill", *drainctl_argv(), "run", "--",
        "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
        *app("sigprint.py"),
    ])
    wait_for(lambda: "child.started" in proc.event_names(), timeout=15)
    time.sleep(0.5)
    proc.signal(signal.SIGUSR1)
    warning = proc.wait_event("warning")
    assert "SIGUSR1" in warning["message"] and "not permitted" in warning["message"]
    assert proc.popen.poll() is None, "drainctl goes on"


def test_a_standalone_prestop_whose_drain_fails_exits_1_at_once(procs: Processes) -> None:
    """No supervisor: the hook runs the drain itself. If that drain fails, it says so and exits
    1 (no drain confirmed) instead of waiting for the kubelet's grace period to run out."""
    port = free_port()
    web = procs.start(app("httpapp.py", "--port", str(port)))
    web.wait_output("listening")
    started = time.monotonic()
    hook = procs.drainctl("prestop", "--control-socket", f"@drainctl-test-{os.getpid()}-{port}",
                          "--port", str(port), "--delay", "0", "--grace-period", "60s",
                          env={"DRAINCTL_FAULTS": "drain"})
    assert hook.wait(15) == 1, hook.stderr()
    assert time.monotonic() - started < 10
    errors = [e for e in hook.events() if e["event"] == "error"]
    assert errors and errors[0]["where"] == "drain", hook.stderr()
    assert "the drain failed" in hook.stderr()
    assert "Traceback" not in hook.stderr()
