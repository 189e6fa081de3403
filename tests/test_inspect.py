"""`drainctl status`, `connections`, `check`, and the termination message, against real processes.

Supervisors that do not run in their own mount namespace get a control socket name of their own,
so they never meet another test's (or another user's) supervisor on the host.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import Processes, app, drainctl_argv, wait_for
from tests.hooks import container, exec_in, free_port, needs_namespaces


def own_socket() -> str:
    return f"@drainctl-test-{uuid.uuid4().hex[:12]}"


def drainctl(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DRAINCTL_LOG_FORMAT="json")
    return subprocess.run([*drainctl_argv(), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def start_web(procs: Processes, *args: str) -> int:
    port = free_port()
    web = procs.start(app("httpapp.py", "--port", str(port), *args))
    web.wait_output("listening")
    return port


def ss_established(port: int) -> int:
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    return len(out.splitlines())


# ---- status -----------------------------------------------------------------------------------


STATUS_KEYS = {"mode", "state", "phase", "pid", "supervisor_pid", "uptime_s", "trigger",
               "drain_elapsed_s", "time_left_s", "outcome", "ports", "connections", "established"}


@needs_namespaces
def test_status_json_while_running_and_while_draining(procs: Processes) -> None:
    port = free_port()
    _sup, pid1 = container(procs, "--delay", "5", "--grace-period", "20", "--stop-timeout", "5",
                           port=port)
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        wait_for(lambda: ss_established(port) == 2 if shutil.which("ss") else True)
        status = exec_in(procs, pid1, "status", "--json")
        assert status.wait(10) == 0
        fields = json.loads(status.stdout())
        assert set(fields) >= STATUS_KEYS
        assert fields["mode"] == "supervisor" and fields["state"] == "running"
        assert fields["phase"] == "idle" and fields["trigger"] is None
        assert isinstance(fields["pid"], int) and fields["supervisor_pid"] == 1
        assert fields["uptime_s"] > 0 and fields["time_left_s"] is None
        assert fields["ports"] == [port] and fields["established"] == 2
        assert fields["connections"] == {
            str(port): {"established": 2, "close_wait": 0, "other": 0}}

        os.kill(pid1, signal.SIGTERM)
        _sup.wait_event("drain.started")
        status = exec_in(procs, pid1, "status", "--json")
        assert status.wait(10) == 0
        fields = json.loads(status.stdout())
        assert (fields["state"], fields["phase"], fields["trigger"]) == (
            "draining", "delay", "SIGTERM")
        assert 13 < fields["time_left_s"] <= 15  # grace 20 - stop-timeout 5, minus a moment
        text = exec_in(procs, pid1, "status")
        assert text.wait(10) == 0
        assert "draining (delay)" in text.stdout() and "2 established" in text.stdout()
    finally:
        for sock in held:
            sock.close()


def test_status_without_a_supervisor_exits_3() -> None:
    result = drainctl("status", "--control-socket", own_socket())
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no drainctl supervisor answers" in lines[0]


# ---- connections --------------------------------------------------------------------------------


@pytest.mark.skipif(not shutil.which("ss"), reason="needs ss(8) (iproute2) as the reference")
def test_connections_counts_what_ss_counts(procs: Processes) -> None:
    port = start_web(procs, "--no-close")
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        wait_for(lambda: ss_established(port) == 3)
        result = drainctl("connections", "--port", str(port), "--json")
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        assert doc["ports"] == {str(port): {"established": 3, "close_wait": 0, "other": 0}}
        assert doc["established"] == ss_established(port) == 3
        table = drainctl("connections", "--port", str(port))
        assert table.stdout.splitlines()[0].split() == ["PORT", "ESTABLISHED", "CLOSE_WAIT",
                                                        "OTHER"]
        assert table.stdout.splitlines()[1].split() == [str(port), "3", "0", "0"]
        # Without --port: every listening port of the namespace, this one included.
        every = json.loads(drainctl("connections", "--json").stdout)
        assert every["ports"][str(port)]["established"] == 3
    finally:
        for sock in held:
            sock.close()


def test_connections_watch_prints_a_line_per_round_until_interrupted(procs: Processes) -> None:
    port = start_web(procs)
    watch = procs.drainctl("connections", "--port", str(port), "--json", "--watch",
                           "--interval", "100ms")
    wait_for(lambda: len(watch.stdout().splitlines()) >= 3)
    watch.signal(signal.SIGINT)
    assert watch.wait(10) == 0
    docs = [json.loads(line) for line in watch.stdout().splitlines()]
    assert all(d["ports"] == {str(port): {"established": 0, "close_wait": 0, "other": 0}}
               for d in docs)
    assert docs[1]["ts"] > docs[0]["ts"]


def test_connections_rejects_a_bad_port() -> None:
    result = drainctl("connections", "--port", "70000")
    assert result.returncode == 2 and "70000" in result.stderr


# ---- check --------------------------------------------------------------------------------------


def test_check_a_workable_configuration_exits_0(procs: Processes) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    try:
        port = listener.getsockname()[1]
        result = drainctl("check", "--control-socket", own_socket(), "--delay", "5s",
                          "--grace-period", "45", "--port", "8080",
                          "--down-url", f"http://127.0.0.1:{port}/ok.htm?down=true")
        assert result.returncode == 0, result.stdout + result.stderr
        out = result.stdout
        assert "terminationGracePeriodSeconds: 45" in out
        assert '"prestop"' in out and "preStop:" in out
        assert "8080" in out and "accepts TCP connections" in out
        assert out.rstrip().endswith("result: workable")
        # The URL was not called: the connection was opened and closed without a byte.
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            assert conn.recv(100) == b""
    finally:
        listener.close()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--delay", "30s"], "no time is left"),
        (["--grace-period", "10s", "--stop-timeout", "10s"], "no time is left to drain"),
        (["--delay", "1s", "--drain-timeout", "60s"], "the connection wait is cut"),
        (["--down-url", "http://127.0.0.1:{free}/down"], "does not accept TCP connections"),
    ],
)
def test_check_a_configuration_that_cannot_work_exits_1(args: list[str], words: str) -> None:
    args = [a.replace("{free}", str(free_port())) for a in args]
    result = drainctl("check", "--control-socket", own_socket(), "--port", "8080", *args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert words in result.stdout and "PROBLEM" in result.stdout
    assert "cannot work as given" in result.stdout


def test_check_bad_usage_exits_2() -> None:
    result = drainctl("check", "--delay", "soon")
    assert result.returncode == 2
    assert result.stderr.startswith("drainctl: --delay") and result.stdout == ""


# ---- the termination message --------------------------------------------------------------------


def test_termination_log_after_a_drain(procs: Processes, tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    log.write_text("")
    port = free_port()
    sup = procs.drainctl("run", "--control-socket", own_socket(), "--delay", "0.3",
                         "--settle", "0.1", "--termination-log", str(log),
                         "--down-url", f"http://127.0.0.1:{port}/ok.htm?down=true&token=s3cret",
                         "--", *app("httpapp.py", "--port", str(port)))
    sup.wait_output("listening")
    sup.signal(signal.SIGTERM)
    assert sup.wait(15) == 128 + signal.SIGTERM
    text = log.read_text()
    lines = text.splitlines()
    assert lines[0] == "drainctl: drained, 0 connections left, exit 143"
    assert lines[1].startswith("trigger SIGTERM: delay 30")  # 300ms, give or take
    for phase in ("down ", "waiting ", "stopping "):
        assert phase in lines[1]
    assert lines[2].startswith(
        f"down GET http://127.0.0.1:{port}/ok.htm?down=***&token=***: 200 in ")
    assert "s3cret" not in text, "query values (maybe a token) stay out of the pod status"
    assert lines[3] == f"ports {port}"
    assert len(text.encode()) < 1024


def test_termination_log_is_never_created_and_skipped_without_a_drain(
    procs: Processes, tmp_path: Path
) -> None:
    missing = tmp_path / "missing"
    quiet = procs.drainctl("run", "--control-socket", own_socket(), "--delay", "0",
                           "--termination-log", str(missing), "--", *app(
                               "httpapp.py", "--port", str(free_port())))
    quiet.wait_output("listening")
    quiet.signal(signal.SIGTERM)
    assert quiet.wait(15) == 128 + signal.SIGTERM
    assert not missing.exists()

    log = tmp_path / "termination-log"
    log.write_text("")
    crash = procs.drainctl("run", "--control-socket", own_socket(), "--termination-log",
                           str(log), "--", "sh", "-c", "exit 3")
    assert crash.wait(15) == 3
    assert log.read_text() == "", "no drain: the file stays empty for FallbackToLogsOnError"
    assert "warning" not in quiet.event_names() + crash.event_names()


def test_termination_log_ends_up_in_a_standalone_prestop_too(
    procs: Processes, tmp_path: Path
) -> None:
    log = tmp_path / "termination-log"
    log.write_text("app said goodbye\n")
    port = start_web(procs)
    started = time.monotonic()
    hook = procs.drainctl("prestop", "--control-socket", own_socket(), "--port", str(port),
                          "--delay", "0", "--settle", "0.1", "--termination-log", str(log))
    assert hook.wait(15) == 0
    assert time.monotonic() - started < 10
    lines = log.read_text().splitlines()
    assert lines[0] == "app said goodbye", "appended: the app's own message stays first"
    assert lines[1] == "drainctl: drained, 0 connections left, prestop exit 0"
    assert lines[2].startswith("trigger prestop: ")
    assert lines[3] == "down: not configured"
