"""`drainctl prestop` as the kubelet runs it: exec'd into the container's PID and mount namespaces.

With a supervisor it starts or joins the supervisor's drain; without one (the app is PID 1) it runs
the drain itself and never signals the app. Real processes, real sockets, loopback only.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

from tests.conftest import Processes, wait_for
from tests.hooks import container, exec_in, free_port, needs_namespaces, signal_time
from tests.traffic import Client

pytestmark = needs_namespaces


def names(events: list[dict[str, object]]) -> list[object]:
    return [e["event"] for e in events if e["event"] != "connections"]


def test_prestop_drains_then_the_kubelets_sigterm_is_forwarded_at_once(procs: Processes) -> None:
    port = free_port()
    sup, pid1 = container(procs, "--delay", "0.5", "--settle", "0.2", "--grace-period", "20",
                          "--down-url", f"http://127.0.0.1:{port}/down", port=port)
    client = Client(port).start()
    wait_for(lambda: client.requests)
    hook = exec_in(procs, pid1, "prestop")
    assert hook.wait(15) == 0, hook.stderr()
    returned_at = time.time()
    client.finish()
    assert client.failures == [] and client.closed_at is not None
    assert client.closed_at <= returned_at, "prestop returned only after the client left"
    assert "down 1 " in sup.stdout()
    assert signal_time(sup, "SIGTERM") is None, "the app is untouched until the kubelet's SIGTERM"
    time.sleep(0.3)
    assert signal_time(sup, "SIGTERM") is None

    sent = time.time()
    os.kill(pid1, signal.SIGTERM)  # the kubelet, after the hook
    got = wait_for(lambda: signal_time(sup, "SIGTERM"), timeout=5)
    assert got - sent < 0.1, f"SIGTERM took {got - sent:.3f}s to reach the app"
    assert sup.wait() == 128 + signal.SIGTERM

    # The story is in prestop's output and in the container log (the supervisor's).
    expected = ["drain.started", "delay.finished", "down.called", "drain.finished"]
    assert names(hook.events()) == expected
    started = hook.events()[0]
    assert started["trigger"] == "prestop"
    logged = sup.events()
    assert names(logged) == ["child.started", "prestop.received", *expected,
                             "signal.received", "signal.forwarded", "child.exited", "exit"]
    assert next(e for e in logged if e["event"] == "drain.started") == started
    finished = next(e for e in logged if e["event"] == "drain.finished")
    assert finished["reason"] == "drained" and finished["count"] == 0


def test_two_prestops_at_once_share_one_drain(procs: Processes) -> None:
    port = free_port()
    sup, pid1 = container(procs, "--delay", "1", "--settle", "0.1", port=port)
    hooks = [exec_in(procs, pid1, "prestop") for _ in range(2)]
    for hook in hooks:
        assert hook.wait(15) == 0, hook.stderr()
    logged = sup.events()
    assert [e["event"] for e in logged].count("drain.started") == 1
    received = [e for e in logged if e["event"] == "prestop.received"]
    assert sorted(e["joined"] for e in received) == [False, True]
    finished = [[e for e in h.events() if e["event"] == "drain.finished"] for h in hooks]
    assert finished[0] == finished[1] and len(finished[0]) == 1
    assert finished[0][0]["reason"] == "drained"
    assert sup.popen.poll() is None and signal_time(sup, "SIGTERM") is None


def test_prestop_joins_a_running_sigterm_drain(procs: Processes) -> None:
    port = free_port()
    sup, pid1 = container(procs, "--delay", "1.5", "--settle", "0.1", port=port)
    os.kill(pid1, signal.SIGTERM)
    sup.wait_event("drain.started")
    hook = exec_in(procs, pid1, "prestop")
    assert hook.wait(15) == 0, hook.stderr()
    events = hook.events()
    assert events[0]["event"] == "drain.started" and events[0]["trigger"] == "SIGTERM"
    assert [e["reason"] for e in events if e["event"] == "drain.finished"] == ["drained"]
    # A SIGTERM drain stops the app when it is done; prestop never restarted it.
    assert sup.wait() == 128 + signal.SIGTERM
    assert [e["event"] for e in sup.events()].count("drain.started") == 1


def test_prestop_after_the_drain_returns_its_result_at_once(procs: Processes) -> None:
    port = free_port()
    sup, pid1 = container(procs, "--delay", "0.2", "--settle", "0.1", port=port)
    first = exec_in(procs, pid1, "prestop")
    assert first.wait(15) == 0
    started = time.monotonic()
    again = exec_in(procs, pid1, "prestop")
    assert again.wait(15) == 0
    assert time.monotonic() - started < 3  # an interpreter start-up, no new drain
    assert [e["event"] for e in sup.events()].count("drain.started") == 1
    finished = [e for e in again.events() if e["event"] == "drain.finished"]
    assert finished == [e for e in first.events() if e["event"] == "drain.finished"]


def test_a_drain_that_times_out_makes_prestop_exit_1(procs: Processes) -> None:
    port = free_port()
    sup, pid1 = container(procs, "--delay", "0.1", "--grace-period", "3", "--stop-timeout", "1",
                          "--down-url", f"http://127.0.0.1:{port}/down", port=port,
                          app_args=("--no-close",))
    held = socket.create_connection(("127.0.0.1", port))
    try:
        started = time.monotonic()
        hook = exec_in(procs, pid1, "prestop")
        assert hook.wait(15) == 1
        assert 1.5 < time.monotonic() - started < 4.5  # grace 3 - stop-timeout 1 = 2 s
        finished = [e for e in hook.events() if e["event"] == "drain.finished"]
        assert finished[0]["reason"] == "timeout" and finished[0]["count"] >= 1
        # Nobody sent SIGTERM after the hook: at the deadline the supervisor stops the app.
        assert sup.wait(10) == 128 + signal.SIGTERM
    finally:
        held.close()


def test_two_containers_of_one_pod_each_reach_their_own(procs: Processes) -> None:
    # One network namespace (so one set of abstract socket names), two mount namespaces.
    port_a, port_b = free_port(), free_port()
    sup_a, pid_a = container(procs, "--delay", "0.2", "--settle", "0.1", port=port_a)
    sup_b, pid_b = container(procs, "--delay", "0.2", "--settle", "0.1", port=port_b)
    assert "warning" not in sup_a.event_names() + sup_b.event_names()
    hook_a = exec_in(procs, pid_a, "prestop")
    assert hook_a.wait(15) == 0
    assert next(e["ports"] for e in hook_a.events() if e["event"] == "connections") == [port_a]
    assert "drain.started" in sup_a.event_names()
    assert "drain.started" not in sup_b.event_names()
    hook_b = exec_in(procs, pid_b, "prestop")
    assert hook_b.wait(15) == 0
    assert next(e["ports"] for e in hook_b.events() if e["event"] == "connections") == [port_b]
    assert [e["event"] for e in sup_a.events()].count("drain.started") == 1


# ---- without a supervisor -------------------------------------------------------------------


def test_standalone_prestop_drains_and_never_signals_the_app(
    procs: Processes, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "termination-log"
    log.write_text("")
    web, pid1 = container(procs, port=port, supervised=False)  # the app itself is PID 1
    client = Client(port).start()
    wait_for(lambda: client.requests)
    hook_started = time.time()
    hook = exec_in(procs, pid1, "prestop", "--delay", "0.5", "--settle", "0.2",
                   "--termination-log", str(log),
                   "--down-url", f"http://127.0.0.1:{port}/down")
    assert hook.wait(15) == 0, hook.stderr()
    client.finish()
    assert client.failures == []
    down = [line for line in web.stdout().splitlines() if line.startswith("down ")]
    assert len(down) == 1 and float(down[0].split()[2]) >= hook_started + 0.5
    assert next(e["ports"] for e in hook.events() if e["event"] == "connections") == [port], (
        "auto ports: what PID 1's tree listens on")
    assert names(hook.events()) == ["drain.started", "delay.finished", "down.called",
                                    "drain.finished"]
    time.sleep(0.2)
    assert web.popen.poll() is None and "signal" not in web.stdout()
    summary = log.read_text()
    assert summary.startswith("drainctl: drained, 0 connections left, prestop exit 0\n")
    assert "trigger prestop: delay " in summary and f"ports {port}" in summary


def test_standalone_prestop_with_a_connection_that_never_closes_exits_1(
    procs: Processes,
) -> None:
    port = free_port()
    web, pid1 = container(procs, port=port, supervised=False, app_args=("--no-close",))
    held = socket.create_connection(("127.0.0.1", port))
    try:
        started = time.monotonic()
        hook = exec_in(procs, pid1, "prestop", "--delay", "0.2", "--grace-period", "3",
                       "--stop-timeout", "1", "--down-url", f"http://127.0.0.1:{port}/down")
        assert hook.wait(15) == 1
        took = time.monotonic() - started
        assert 1.8 < took < 4.5, took  # the deadline: grace 3 - stop-timeout 1
        finished = [e for e in hook.events() if e["event"] == "drain.finished"]
        assert finished[0]["reason"] == "timeout" and finished[0]["count"] == 1
        assert "down 1 " in web.stdout() and "signal" not in web.stdout()
    finally:
        held.close()


def test_standalone_prestops_at_once_share_one_drain(procs: Processes) -> None:
    port = free_port()
    web, pid1 = container(procs, port=port, supervised=False)
    args = ("prestop", "--delay", "1", "--settle", "0.1",
            "--down-url", f"http://127.0.0.1:{port}/down")
    first = exec_in(procs, pid1, *args)
    wait_for(lambda: "drain.started" in first.event_names())
    second = exec_in(procs, pid1, *args)
    assert first.wait(15) == 0 and second.wait(15) == 0
    assert web.stdout().count("down ") == 1, "one drain, one down call"
    assert second.events()[0] == first.events()[0]


def test_no_standalone_drain_when_pid1_is_a_supervisor_that_does_not_answer(
    procs: Processes,
) -> None:
    port = free_port()
    sup, pid1 = container(procs, "--control-socket", "@drainctl-test-elsewhere", port=port)
    hook = exec_in(procs, pid1, "prestop", "--delay", "0")  # looks at the default address
    assert hook.wait(15) == 1
    assert "PID 1 is a drainctl supervisor" in hook.stderr()
    assert "drain.started" not in hook.event_names() + sup.event_names()
    assert sup.popen.poll() is None
