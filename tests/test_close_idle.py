"""--close-idle: drainctl closes an unchanged app's idle keep-alive connections for it.

Real processes and sockets: `drainctl run --close-idle` over tests/apps/httpapp.py, which never
answers `Connection: close` here (no down URL is given), and keep-alive clients on loopback that
behave like a gateway or a browser: before reusing their connection they look whether the server
closed it (as HAProxy and urllib3 do), and if so, they leave. The permission cases run the app as
another uid with drainctl lacking CAP_SYS_PTRACE (setpriv), and drainctl under a seccomp filter
that refuses pidfd_getfd (tests/apps/seccomp_deny.py).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field

import pytest

from drainctl.drain.closer import (
    HELD,
    POLL,
    QUIET,
    SILENT,
    Closer,
    Pass,
    SocketInfo,
    _Seen,
    can_close,
    in_flight,
    process_tree,
)
from tests.conftest import IS_ROOT, Proc, Processes, app, drainctl_argv, inner_pid, wait_for
from tests.traffic import free_port

REQUEST = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n"


def read_response(sock: socket.socket) -> bytes:
    """One response (with Content-Length) from `sock`; raises ConnectionError on EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before a complete response")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed in the body")
        body += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(head.split(b"\r\n")[0].decode())
    return body


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed the idle connection: readable, and EOF (what a pool checks)."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""


@dataclass
class PoliteClient:
    """One keep-alive connection; a request every `interval`; leaves once the server closes
    the idle connection. Every request that does not get its 200 is a failure."""

    port: int
    path: bytes = b"/"
    interval: float = 0.05
    requests: int = 0
    failures: list[str] = field(default_factory=list)
    left_at: float | None = None  # when it saw the server's close
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> PoliteClient:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + 30  # bounded whatever happens
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            while not self.stop.is_set() and time.monotonic() < deadline:
                if closed_by_server(sock):
                    self.left_at = time.time()
                    return
                try:
                    sock.sendall(REQUEST % self.path)
                    read_response(sock)
                except OSError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                    return
                self.requests += 1
                self.stop.wait(self.interval)

    def join(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(15)


def start_app(procs: Processes, *drain_args: str, prefix: tuple[str, ...] = (),
              app_prefix: tuple[str, ...] = ()) -> tuple[Proc, int]:
    port = free_port()
    argv = [*prefix, *drainctl_argv(), "run", *drain_args, "--",
            *app_prefix, *app("httpapp.py", "--port", str(port))]
    proc = procs.start(argv)
    proc.wait_output("listening")
    return proc, port


# ---- the rule (pure) -----------------------------------------------------------------------------


@pytest.mark.parametrize(("rq", "wq", "sent", "recv", "ack", "busy"), [
    (0, 0, 100, 400, 100, False),  # answered after the last request: idle
    (0, 0, 400, 100, 100, True),  # the client spoke last: a request not yet answered
    (5, 0, 900, 900, 800, True),  # unread bytes
    (0, 7, 900, 900, 800, True),  # unacknowledged bytes
    # Request and answer in one clock tick, then the answer's acknowledgement: idle.
    (0, 0, 500, 500, 460, False),
    # Answer, then the next request in the same tick (it carries the answer's ack): in flight.
    (0, 0, 500, 500, 500, True),
])
def test_in_flight_rule(rq: int, wq: int, sent: int, recv: int, ack: int, busy: bool) -> None:
    assert in_flight(rq, wq, sent, recv, ack) is busy


# ---- the closer on its own, in this process ------------------------------------------------------


def passes_until_closed(closer: Closer, port: int, within: float = 2.0) -> Pass:
    """Close passes every POLL (as the drain makes them) until one closes something."""
    deadline = time.monotonic() + within
    while True:
        done = closer.close_idle([port])
        if done.closed or time.monotonic() > deadline:
            return done
        time.sleep(POLL)


def connected(listener: socket.socket, n: int) -> list[tuple[socket.socket, socket.socket]]:
    port = listener.getsockname()[1]
    pairs = []
    for _ in range(n):
        client = socket.create_connection(("127.0.0.1", port))
        server, _ = listener.accept()
        pairs.append((client, server))
    return pairs


def readable(sock: socket.socket, timeout: float = 0.0) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


def test_the_fin_leaves_with_the_answer_never_after_it() -> None:
    """A server socket in this process: the first pass corks it; the app's answer then waits in
    the socket, and the pass that closes it sends answer and FIN together: the client has the
    end of stream the moment it has the answer, so it never sends on a closing connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        [(client, server)] = connected(listener, 1)
        try:
            closer = Closer(lambda: [os.getpid()])
            assert closer.close_idle([port]).closed == {}  # first sight: corked
            client.sendall(b"req")
            assert server.recv(3) == b"req"
            server.sendall(b"resp")  # the app's answer, in two writes
            server.sendall(b"onse")
            assert not readable(client, 0.01), "the answer waits in the socket"
            done = passes_until_closed(closer, port)
            assert done.closed == {port: 1} and done.held == 1, (done.closed, done.skipped)
            assert readable(client, 2)
            assert client.recv(100) == b"response"
            assert readable(client), "the FIN came with the answer"
            assert client.recv(1) == b""
            # The server's descriptor is still its own: it reads the client's close.
            client.close()
            server.settimeout(2)
            assert server.recv(1) == b""
        finally:
            client.close()
            server.close()


def test_an_answer_the_kernel_may_send_any_moment_is_left_to_it() -> None:
    """The pass decided to close with the answer, but by the time it gets to it (its clock says
    a second later here: a long pass) the kernel's own sending (200 ms after the answer) may come
    first: it does not close, and the answer leaves on its own, without the FIN."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        [(client, server)] = connected(listener, 1)
        times = iter([0.0, 0.05, 0.10, 1.10])  # three passes; the close comes "a second later"
        try:
            closer = Closer(lambda: [os.getpid()], clock=lambda: next(times))
            assert closer.close_idle([port]).closed == {}  # corked
            client.sendall(b"req")
            assert server.recv(3) == b"req"
            server.sendall(b"answer")
            assert closer.close_idle([port]).again  # the answer appeared
            done = closer.close_idle([port])
            assert (done.closed, done.skipped) == ({}, 1)
            assert readable(client, 2), "the kernel sends it by itself"
            assert client.recv(100) == b"answer"
            assert not readable(client, 0.05), "and no FIN with it"
        finally:
            client.close()
            server.close()


def test_a_request_being_worked_on_or_unread_is_never_closed() -> None:
    """One connection whose request the app is working on, one whose request it has not read:
    passes for longer than QUIET close neither; the answer, once written, leaves with the FIN."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        pairs = connected(listener, 2)
        (c_busy, s_busy), (c_unread, _) = pairs
        try:
            closer = Closer(lambda: [os.getpid()])
            closer.close_idle([port])
            c_busy.sendall(b"req")
            assert s_busy.recv(3) == b"req"  # read, being worked on: no answer yet
            c_unread.sendall(b"req")  # never read by the server
            assert passes_until_closed(closer, port, within=QUIET + 0.3).closed == {}
            for client in (c_busy, c_unread):
                assert not closed_by_server(client)
            s_busy.sendall(b"late answer")
            assert passes_until_closed(closer, port).closed == {port: 1}
            c_busy.settimeout(2)
            assert c_busy.recv(100) == b"late answer"
            assert readable(c_busy) and c_busy.recv(1) == b""
            assert not closed_by_server(c_unread)
        finally:
            for client, server in pairs:
                client.close()
                server.close()


def test_a_connection_silent_for_quiet_is_closed_as_it_is() -> None:
    """A kept connection nobody uses (a gateway's spare): closed once silent for QUIET, not
    before; the client sees an orderly FIN."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        [(client, server)] = connected(listener, 1)
        try:
            client.sendall(b"req")
            assert server.recv(3) == b"req"
            time.sleep(0.01)  # the answer leaves in a later clock tick than the request came
            server.sendall(b"resp")
            assert client.recv(4) == b"resp"
            answered = time.monotonic()
            closer = Closer(lambda: [os.getpid()])
            done = passes_until_closed(closer, port, within=QUIET + 1.0)
            closed_at = time.monotonic()
            assert done.closed == {port: 1} and done.held == 0
            assert closed_at - answered >= QUIET - 0.01  # tcp_info's timers tick every few ms
            assert readable(client, 2) and client.recv(1) == b""
        finally:
            client.close()
            server.close()


def test_back_to_back_clients_leave_without_a_failure(procs: Processes) -> None:
    """Clients that send their next request the moment they have an answer (a busy gateway's
    hot connections: never idle) and paced ones: each is closed with an answer, none loses a
    request, and every one has left within a few passes."""
    port = free_port()
    proc = procs.start(app("httpapp.py", "--port", str(port)))
    proc.wait_output("listening")
    clients = [PoliteClient(port, interval=0.0).start() for _ in range(6)]
    clients += [PoliteClient(port, interval=i * 0.007).start() for i in range(1, 5)]
    try:
        wait_for(lambda: all(c.requests >= 3 for c in clients), timeout=10)
        closer = Closer(lambda: process_tree(proc.pid))
        held = total = 0
        deadline = time.monotonic() + 5
        while any(c.left_at is None for c in clients) and time.monotonic() < deadline:
            done = closer.close_idle([port])
            held, total = held + done.held, total + done.total
            time.sleep(POLL)
    finally:
        for c in clients:
            c.join()
    assert [c.failures for c in clients if c.failures] == []
    assert all(c.left_at is not None for c in clients), [c.requests for c in clients]
    assert total == len(clients) and held == total, (held, total)


# ---- the decision (pure) -------------------------------------------------------------------------


def info(notsent: int = 0, received: int = 100, rqueue: int = 0, sent_ms: int = 5,
         recv_ms: int = 10, ack_ms: int = 5, flush_in: int | None = 180) -> SocketInfo:
    return SocketInfo(80, 1, 0, 7, rqueue, notsent, sent_ms, recv_ms, ack_ms, received, notsent,
                      flush_in if notsent else None)


@pytest.mark.parametrize(("steps", "verdicts"), [
    # An answer appears, then stays the same one pass later: closed with it.
    ([(0.00, info()), (0.04, info(notsent=9)), (0.08, info(notsent=9))], [None, None, HELD]),
    # It grew in between (the app still writing): not yet; whole one pass later.
    ([(0.00, info()), (0.04, info(notsent=9)), (0.08, info(notsent=19)), (0.12, info(notsent=19))],
     [None, None, None, HELD]),
    # Too soon after it was first seen (passes HOLD_MIN apart at least).
    ([(0.00, info()), (0.04, info(notsent=9)), (0.05, info(notsent=9))], [None, None, None]),
    # The kernel sends it by itself within FLUSH_MARGIN (its probe timer): leave it to it.
    ([(0.00, info()), (0.04, info(notsent=9)), (0.08, info(notsent=9, flush_in=9))],
     [None, None, None]),
    ([(0.00, info()), (0.04, info(notsent=9)), (0.08, info(notsent=9, flush_in=11))],
     [None, None, HELD]),
    # No probe timer pending (e.g. a retransmission first): nothing leaves on its own.
    ([(0.00, info()), (0.04, info(notsent=9)), (0.08, info(notsent=9, flush_in=None))],
     [None, None, HELD]),
    # More came from the client (a pipelined request), or is unread: not whole.
    ([(0.00, info()), (0.04, info(notsent=9)), (0.08, info(notsent=9, received=150))],
     [None, None, None]),
    ([(0.00, info()), (0.04, info(notsent=9)), (0.08, info(notsent=9, rqueue=5))],
     [None, None, None]),
    # Nothing held: silent for QUIET by tcp_info's timers, and not in flight.
    ([(0.00, info(sent_ms=1500, recv_ms=1600, ack_ms=1500))], [SILENT]),
    ([(0.00, info(sent_ms=900, recv_ms=1600, ack_ms=900))], [None]),
    ([(0.00, info(sent_ms=1600, recv_ms=1500, ack_ms=1500))], [None]),  # unanswered
])
def test_the_decision(steps: list[tuple[float, SocketInfo]], verdicts: list[str | None]) -> None:
    seen = _Seen(-1.0)
    seen.corked = True
    assert [seen.decide(s, t) for t, s in steps] == verdicts


def test_a_connection_that_could_not_be_corked_is_never_closed() -> None:
    """Not the app's (its owner was not among the app's processes) or gone: left alone."""
    seen = _Seen(0.0)
    seen.corked = False
    steps = [(0.04, info(notsent=9)), (0.08, info(notsent=9)), (0.12, info(notsent=9)),
             (1.5, info(sent_ms=1500, recv_ms=1600, ack_ms=1500))]
    assert [seen.decide(s, t) for t, s in steps] == [None, None, None, None]


# ---- drainctl run --close-idle -------------------------------------------------------------------


def test_an_unchanged_app_is_drained_by_closing_its_idle_connections(procs: Processes) -> None:
    """No down URL, an app that never closes: each idle keep-alive connection is closed for it,
    the slow request in flight is not cut, and the app gets SIGTERM once all have left."""
    proc, port = start_app(procs, "--close-idle", "--delay", "0.3", "--settle", "0.3",
                           "--grace-period", "20")
    fast = [PoliteClient(port).start() for _ in range(6)]
    # Back to back it would never be idle (as a server's own keep-alive timeout would never
    # fire): it waits a moment between requests, as a gateway's connection pool does.
    slow = PoliteClient(port, path=b"/slow?s=1.5", interval=0.1).start()
    wait_for(lambda: all(c.requests >= 2 for c in fast), timeout=10)
    time.sleep(0.2)  # the slow request is in flight at the trigger
    sigterm_at = time.time()
    proc.signal(signal.SIGTERM)
    assert proc.wait(20) == 128 + signal.SIGTERM
    for c in [*fast, slow]:
        c.join()
        assert c.failures == [], c.failures
        assert c.left_at is not None, "every client was closed by the server, not by the test"
        assert c.left_at >= sigterm_at + 0.3 - 0.05, "and only after --delay"
    assert slow.requests >= 1
    closed = [e for e in proc.events() if e["event"] == "connections.closed"]
    assert sum(e["count"] for e in closed) == 7, (closed, [c.left_at for c in [*fast, slow]])
    assert closed[-1]["total"] == 7 and closed[0]["ports"] == [port]
    finished = proc.wait_event("drain.finished")
    assert finished["reason"] == "drained"
    assert not [e for e in proc.events() if e["event"] == "warning"
                and "close-idle" in e["message"]]


def test_without_close_idle_the_same_app_holds_the_drain_to_the_deadline(
    procs: Processes,
) -> None:
    """The same app and clients without the flag: nothing closes them (what the flag fixes)."""
    proc, port = start_app(procs, "--delay", "0.2", "--settle", "0.3", "--grace-period", "3",
                           "--stop-timeout", "1")
    fast = [PoliteClient(port).start() for _ in range(3)]
    wait_for(lambda: all(c.requests >= 2 for c in fast), timeout=10)
    proc.signal(signal.SIGTERM)
    proc.wait(10)
    for c in fast:
        c.join()
    assert proc.wait_event("drain.finished")["reason"] == "timeout"
    stopped_at = proc.wait_event("signal.forwarded")["ts"]
    assert all(c.left_at is None or c.left_at >= stopped_at for c in fast)


# ---- when it cannot work: one warning, then the drain waits --------------------------------------

needs_setpriv = pytest.mark.skipif(
    not (IS_ROOT and shutil.which("setpriv")), reason="needs root and setpriv(1)"
)


def assert_falls_back(proc: Proc, port: int, *why: str) -> None:
    fast = [PoliteClient(port).start() for _ in range(3)]
    wait_for(lambda: all(c.requests >= 2 for c in fast), timeout=10)
    proc.signal(signal.SIGTERM)
    proc.wait(15)
    for c in fast:
        c.join()
    events = proc.events()
    warnings = [e["message"] for e in events if e["event"] == "warning"
                and "--close-idle" in e["message"]]
    assert len(warnings) == 1, warnings
    assert "SYS_PTRACE" in warnings[0] and any(w in warnings[0] for w in why), warnings[0]
    assert not [e for e in events if e["event"] == "connections.closed"]
    # Nobody closed them before the app's stop signal.
    stopped_at = proc.wait_event("signal.forwarded")["ts"]
    assert all(c.left_at is None or c.left_at >= stopped_at for c in fast)
    # It waited for the connections, as without --close-idle: to the budget's deadline.
    assert proc.wait_event("drain.finished")["reason"] == "timeout"


@needs_setpriv
def test_app_of_another_uid_without_cap_sys_ptrace_warns_and_waits(procs: Processes) -> None:
    """The common image: the app drops to its own user; drainctl is root but without
    CAP_SYS_PTRACE (the runtime's default set): it may not take the app's sockets."""
    port = free_port()
    argv = ["setpriv", "--bounding-set", "-sys_ptrace", "--inh-caps", "-sys_ptrace",
            *drainctl_argv(), "run", "--close-idle", "--port", str(port), "--delay", "0.2",
            "--grace-period", "3", "--stop-timeout", "1", "--",
            "setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
            *app("httpapp.py", "--port", str(port))]
    proc = procs.start(argv)
    proc.wait_output("listening")
    assert_falls_back(proc, port, "Permission denied", "Operation not permitted")


@pytest.mark.skipif(not IS_ROOT, reason="needs root (a seccomp filter without no_new_privs)")
def test_seccomp_filter_refusing_pidfd_getfd_warns_and_waits(procs: Processes) -> None:
    """Docker's and containerd's default seccomp profiles refuse pidfd_getfd without
    CAP_SYS_PTRACE: a filter that does just that (tests/apps/seccomp_deny.py)."""
    proc, port = start_app(procs, "--close-idle", "--delay", "0.2", "--grace-period", "3",
                           "--stop-timeout", "1",
                           prefix=(*app("seccomp_deny.py"), "--"))
    assert_falls_back(proc, port, "seccomp")


def test_can_close_tells_why_not(procs: Processes) -> None:
    """What `drainctl check` and the start-up probe use: yes for a process of our own uid, the
    reason for one of another uid when we lack CAP_SYS_PTRACE."""
    mine = procs.start(app("httpapp.py", "--port", str(free_port())))
    mine.wait_output("listening")
    assert can_close(process_tree(mine.pid)) is None


# ---- drainctl check ------------------------------------------------------------------------------

needs_unshare = pytest.mark.skipif(
    not (IS_ROOT and shutil.which("unshare")), reason="needs root and unshare(1)"
)


def check_line(procs: Processes, prefix: tuple[str, ...] = ()) -> str:
    """`drainctl check --close-idle` in a PID namespace whose PID 1 is an app of ours."""
    port = free_port()
    pid1 = procs.start(["unshare", "--pid", "--fork", "--mount-proc", *prefix,
                        *app("httpapp.py", "--port", str(port))])
    pid1.wait_output("listening")
    inner = inner_pid(pid1)
    done = subprocess.run(
        ["nsenter", "--target", str(inner), "--pid", "--mount", *prefix, *drainctl_argv(),
         "check", "--close-idle", "--control-socket", "@drainctl-test-none"],
        capture_output=True, text=True, timeout=30,
    )
    lines = [x for x in done.stdout.splitlines() if x.startswith("close-idle:")]
    assert len(lines) == 1, done.stdout + done.stderr
    return lines[0]


@needs_unshare
def test_check_says_close_idle_can_work_on_an_app_of_the_same_uid(procs: Processes) -> None:
    line = check_line(procs)
    assert "on; can work here" in line and "pid 1" in line, line


@needs_unshare
def test_check_says_why_close_idle_cannot_work_under_a_seccomp_filter(procs: Processes) -> None:
    line = check_line(procs, prefix=(*app("seccomp_deny.py"), "--"))
    assert "cannot work here" in line and "seccomp" in line and "SYS_PTRACE" in line, line
