"""The drain end to end: drainctl run + a real HTTP/1.1 app + real keep-alive clients on loopback.

The app (tests/apps/httpapp.py) answers `Connection: close` after its down endpoint is called and
prints when it gets a signal, so each test can see what happened in which order.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import pytest

from tests.conftest import Proc, Processes, app, wait_for
from tests.traffic import Client, clients, free_port, signal_time


def start_app(procs: Processes, *drain_args: str, app_args: tuple[str, ...] = (),
              port: int | None = None) -> tuple[Proc, int]:
    port = port or free_port()
    proc = procs.drainctl("run", *drain_args, "--", *app("httpapp.py", "--port", str(port),
                                                         *app_args))
    proc.wait_output("listening")
    return proc, port


def down_lines(proc: Proc) -> list[str]:
    return [line for line in proc.stdout().splitlines() if line.startswith("down ")]


# ---- the main path ----------------------------------------------------------------------------


def test_clients_leave_then_the_app_is_stopped(procs: Processes) -> None:
    port = free_port()
    proc, _ = start_app(procs, "--delay", "1", "--settle", "0.3", "--grace-period", "20",
                        "--down-url", f"http://127.0.0.1:{port}/down", port=port)
    fast = [Client(port) for _ in range(4)]
    slow = [Client(port, path="/slow?s=2", interval=0.0) for _ in range(2)]
    with clients(*fast, *slow):
        time.sleep(0.3)  # the slow requests are in flight when the drain starts
        sigterm_at = time.time()
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 128 + signal.SIGTERM
    for c in [*fast, *slow]:
        c.join()
        assert c.failures == [], c.failures
        assert c.requests >= 1
    downs = down_lines(proc)
    assert len(downs) == 1, "the down endpoint is called once"
    assert float(downs[0].split()[2]) >= sigterm_at + 1.0 - 0.05, "and only after --delay"
    stopped_at = signal_time(proc, "SIGTERM")
    assert stopped_at is not None
    last_close = max(c.closed_at or 0 for c in [*fast, *slow])
    assert stopped_at >= last_close, "the app got the stop signal only after every client left"
    # (a `warning` can come first when another test's supervisor holds this mount namespace's
    # default control socket: tests run many supervisors side by side, a pod runs one)
    names = [n for n in proc.event_names() if n not in ("connections", "warning")]
    assert names == ["child.started", "signal.received", "drain.started", "delay.finished",
                     "down.called", "drain.finished", "signal.forwarded", "child.exited", "exit"]
    finished = proc.wait_event("drain.finished")
    assert finished["reason"] == "drained" and finished["count"] == 0
    counts = [e["count"] for e in proc.events() if e["event"] == "connections"]
    assert counts[0] >= 1 and counts[-1] == 0


def test_connections_that_never_close_stop_at_the_budget_then_sigkill(procs: Processes) -> None:
    port = free_port()
    proc, _ = start_app(procs, "--delay", "0.2", "--grace-period", "3", "--stop-timeout", "1",
                        "--down-url", f"http://127.0.0.1:{port}/down",
                        app_args=("--no-close", "--ignore-term"), port=port)
    with clients(Client(port, interval=0.2)):
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.wait(10) == 128 + signal.SIGKILL
        took = time.monotonic() - started
    assert took <= 3.0 + 0.5, "the whole sequence ends inside --grace-period"
    assert proc.wait_event("drain.finished")["reason"] == "timeout"
    assert proc.wait_event("drain.finished")["count"] >= 1
    stopped = signal_time(proc, "SIGTERM")
    assert stopped is not None
    names = proc.event_names()
    assert names.index("signal.forwarded") < names.index("kill.escalated")
    forwarded = proc.wait_event("signal.forwarded")["ts"]
    started_ev = proc.wait_event("drain.started")["ts"]
    assert forwarded - started_ev == pytest.approx(2.0, abs=0.3)  # grace - stop-timeout


# ---- the down call's failures -------------------------------------------------------------------


@contextmanager
def bad_server(kind: str) -> Iterator[int]:
    """A loopback server that answers 500, or accepts and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)
            if kind == "500":
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        for conn in held:
            conn.close()


@pytest.mark.parametrize("kind", ["refused", "hanging", "500"])
def test_a_failed_down_call_is_logged_and_the_drain_goes_on(procs: Processes, kind: str) -> None:
    ctx: AbstractContextManager[int] = (
        nullcontext(free_port()) if kind == "refused" else bad_server(kind)
    )
    with ctx as down_port:
        proc, _ = start_app(procs, "--delay", "0.1", "--settle", "0.1", "--down-timeout",
                            "0.5", "--grace-period", "6", "--stop-timeout", "2",
                            "--down-url", f"http://127.0.0.1:{down_port}/down")
        proc.signal(signal.SIGTERM)
        assert proc.wait(10) == 128 + signal.SIGTERM
    down = proc.wait_event("down.called")
    if kind == "500":
        assert down["status"] == 500
    else:
        assert down["error"] in (("refused",) if kind == "refused" else ("timeout",))
    assert proc.wait_event("drain.finished")["reason"] == "drained"


def test_an_invalid_down_url_is_a_start_up_error(procs: Processes) -> None:
    proc = procs.drainctl("run", "--down-url", "ftp://127.0.0.1/down", "--", "true")
    assert proc.wait(10) == 2
    lines = proc.stderr().strip().splitlines()
    assert len(lines) == 1 and "--down-url" in lines[0]


# ---- the app leaves on its own ----------------------------------------------------------------


@pytest.mark.parametrize("phase, delay", [("delay", "5"), ("wait", "0.2")])
def test_app_exiting_mid_drain_ends_it_at_once(procs: Processes, phase: str, delay: str) -> None:
    port = free_port()
    proc, _ = start_app(procs, "--delay", delay, "--grace-period", "30",
                        app_args=("--no-close", "--exit-after", "1.5", "--exit-code", "7"),
                        port=port)
    with clients(Client(port, interval=0.1)):
        proc.signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(10) == 7
        assert time.monotonic() - started < 2.5
    finished = proc.wait_event("drain.finished")
    assert finished["reason"] == "child-exited"
    assert "signal.forwarded" not in proc.event_names()
    if phase == "wait":
        assert "connections" in proc.event_names()


# ---- signals during the drain -----------------------------------------------------------------


def test_second_sigterm_forces_and_sigusr1_is_forwarded_at_once(procs: Processes) -> None:
    port = free_port()
    proc, _ = start_app(procs, "--delay", "10", port=port)
    proc.signal(signal.SIGTERM)
    proc.wait_event("drain.started")
    proc.signal(signal.SIGUSR1)
    wait_for(lambda: signal_time(proc, "SIGUSR1"), timeout=5)
    assert signal_time(proc, "SIGTERM") is None, "the app is not stopped by SIGUSR1"
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 2
    assert proc.wait_event("drain.finished")["reason"] == "forced"


def test_sigint_during_the_drain_forces(procs: Processes) -> None:
    proc, _ = start_app(procs, "--delay", "10")
    proc.signal(signal.SIGTERM)
    proc.wait_event("drain.started")
    proc.signal(signal.SIGINT)
    assert proc.wait(10) == 128 + signal.SIGTERM
    assert proc.wait_event("drain.finished")["reason"] == "forced"


# ---- which connections count --------------------------------------------------------------------


def test_ports_are_detected_on_ipv4_and_ipv6(procs: Processes) -> None:
    port, port6 = free_port(), free_port(socket.AF_INET6)
    proc, _ = start_app(procs, "--delay", "0", "--settle", "0.2", "--grace-period", "20",
                        app_args=("--no-close", "--port6", str(port6)), port=port)
    v4, v6 = Client(port, interval=0.1), Client(port6, interval=0.1, host="::1")
    with clients(v4, v6):
        wait_for(lambda: v4.requests and v6.requests)
        proc.signal(signal.SIGTERM)
        first = proc.wait_event("connections")
        assert sorted(first["ports"]) == sorted([port, port6])
        assert first["count"] == 2
        v4.stop.set()
        v6.stop.set()
    assert proc.wait(10) == 128 + signal.SIGTERM
    assert proc.wait_event("drain.finished")["reason"] == "drained"


def test_explicit_port_only_that_port_counts(procs: Processes) -> None:
    port, other = free_port(), free_port(socket.AF_INET6)
    proc, _ = start_app(procs, "--delay", "0", "--settle", "0.2", "--port", str(port),
                        app_args=("--no-close", "--port6", str(other)), port=port)
    with clients(Client(other, interval=0.1, host="::1")) as (held,):
        wait_for(lambda: held.requests)
        proc.signal(signal.SIGTERM)
        assert proc.wait(10) == 128 + signal.SIGTERM
    first = proc.wait_event("connections")
    assert first["ports"] == [port] and first["count"] == 0
    assert proc.wait_event("drain.finished")["reason"] == "drained"


def test_the_apps_own_outbound_connection_does_not_count(procs: Processes) -> None:
    backend = socket.socket()
    backend.bind(("127.0.0.1", 0))
    backend.listen(4)
    try:
        proc, _ = start_app(procs, "--delay", "0", "--settle", "0.2", app_args=(
            "--outbound", f"127.0.0.1:{backend.getsockname()[1]}"))
        proc.signal(signal.SIGTERM)
        assert proc.wait(10) == 128 + signal.SIGTERM
        finished = proc.wait_event("drain.finished")
        assert finished["reason"] == "drained" and finished["count"] == 0
        assert backend.getsockname()[1] not in proc.wait_event("connections")["ports"]
    finally:
        backend.close()


def test_an_app_that_listens_on_nothing_is_no_ports(procs: Processes) -> None:
    proc = procs.drainctl("run", "--delay", "0.2", "--", sys.executable, "-c",
                          "import time; print('up', flush=True); time.sleep(30)")
    proc.wait_output("up")
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 128 + signal.SIGTERM
    assert proc.wait_event("drain.finished")["reason"] == "no-ports"


# ---- --idle-grace --------------------------------------------------------------------------------


def test_idle_grace_releases_idle_connections_not_busy_ones(procs: Processes) -> None:
    port = free_port()
    proc, _ = start_app(procs, "--delay", "0", "--settle", "0.1", "--idle-grace", "0.5",
                        "--grace-period", "20", app_args=("--no-close",), port=port)
    idle = socket.create_connection(("127.0.0.1", port))  # connected, never says a word
    try:
        with clients(Client(port, interval=0.05)) as (busy,):
            wait_for(lambda: busy.requests)
            proc.signal(signal.SIGTERM)
            time.sleep(2.0)
            assert proc.popen.poll() is None, "a busy connection holds the drain"
            busy.stop.set()
            busy.join()
            released_at = time.time()
            assert proc.wait(10) == 128 + signal.SIGTERM
        finished = proc.wait_event("drain.finished")
        assert finished["reason"] == "drained"
        assert finished["ts"] >= released_at - 0.05
        assert finished["count"] == 1, "the idle connection is still there, and not holding"
        assert any(e.get("idle") == 1 for e in proc.events() if e["event"] == "connections")
    finally:
        idle.close()


# ---- the contract self-test (docs/app-side.md) ---------------------------------------------------


@pytest.mark.parametrize("closes", [True, False], ids=["app-closes", "app-keeps-alive"])
def test_contract_warning_only_for_an_app_that_keeps_connections_alive(
    procs: Processes, closes: bool
) -> None:
    port = free_port()
    proc, _ = start_app(procs, "--delay", "0", "--settle", "0.1",
                        "--down-url", f"http://127.0.0.1:{port}/down",
                        app_args=() if closes else ("--no-close",), port=port)
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 128 + signal.SIGTERM
    assert proc.wait_event("down.called")["status"] == 200
    warnings = [e for e in proc.events() if e["event"] == "contract.warning"]
    if closes:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "Connection: close" in warnings[0]["message"]


def test_no_probe_turns_the_self_test_off(procs: Processes) -> None:
    port = free_port()
    proc, _ = start_app(procs, "--delay", "0", "--settle", "0.1", "--no-probe",
                        "--down-url", f"http://127.0.0.1:{port}/down",
                        app_args=("--no-close",), port=port)
    proc.signal(signal.SIGTERM)
    assert proc.wait(10) == 128 + signal.SIGTERM
    assert "contract.warning" not in proc.event_names()


# ---- the budget at start-up ------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, words",
    [
        (("--grace-period", "5", "--stop-timeout", "10"), ["stop-timeout 10s", "grace-period 5s"]),
        (("--grace-period", "10", "--stop-timeout", "5", "--delay", "8"),
         ["delay 8s", "= 5s", "cut to 5s"]),
        (("--grace-period", "30", "--delay", "5", "--drain-timeout", "20"),
         ["drain-timeout 20s", "cut to 15s"]),
    ],
    ids=["stop-timeout-exceeds-grace", "delay-exceeds-budget", "drain-timeout-exceeds-budget"],
)
def test_a_configuration_that_cannot_fit_is_warned_about_with_the_numbers(
    procs: Processes, args: tuple[str, ...], words: list[str]
) -> None:
    proc = procs.drainctl("run", *args, "--", "true")
    assert proc.wait(10) == 0
    warnings = [e["message"] for e in proc.events() if e["event"] == "config.warning"]
    assert len(warnings) == 1 and all(w in warnings[0] for w in words), warnings
    assert proc.event_names().index("config.warning") < proc.event_names().index("child.started")


def test_a_configuration_that_fits_is_not_warned_about(procs: Processes) -> None:
    proc = procs.drainctl("run", "--", "true")
    assert proc.wait(10) == 0
    assert "config.warning" not in proc.event_names()
