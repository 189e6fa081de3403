"""The control channel cannot be used to crash, stall or fool drainctl (README, "Reliability").

Against a real `drainctl run` as PID 1 of its own namespaces: hostile bytes, half-closes, idle
clients, running out of file descriptors. After each attack the supervisor still answers `status`,
still drains, and did not spin (its CPU time, /proc/PID/stat utime+stime, over a second).
Against fake servers written here (real Unix sockets): `prestop` and `status` survive any reply
with one line and a documented exit code. And a process of another uid (setpriv) that takes the
supervisor's name first is neither trusted by the clients nor ignored by the supervisor.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from drainctl.control.server import parse_request
from tests.conftest import Proc, Processes, app, inner_pid
from tests.hooks import (
    close_control_clients,  # noqa: F401  (a fixture, used by pytestmark)
    container,
    control_client,
    exec_in,
    free_port,
    mnt_ns_address,
    needs_namespaces,
)

NOBODY = 65534
# CPU seconds PID 1 may use in one second of an attack. Idle it uses ~0; a loop woken over and
# over by a readable socket uses a whole core (~1.0).
SPIN_LIMIT = 0.2

pytestmark = pytest.mark.usefixtures("close_control_clients")


def connect(address: str, timeout: float = 10) -> socket.socket:
    return control_client(address, timeout, wait=False)


def read_lines(sock: socket.socket) -> list[bytes]:
    """Every line until the server closes (ECONNRESET after the data is an end too)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data.splitlines()


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread), proc(5)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_over_a_second(pid: int) -> float:
    before = cpu_seconds(pid)
    time.sleep(1.0)
    return cpu_seconds(pid) - before


def assert_responsive(procs: Processes, pid1: int) -> None:
    started = time.monotonic()
    status = exec_in(procs, pid1, "status", "--json")
    assert status.wait(10) == 0, status.stderr()
    assert json.loads(status.stdout())["state"] == "running"
    assert time.monotonic() - started < 5


def assert_drains(procs: Processes, sup: Proc, pid1: int) -> None:
    hook = exec_in(procs, pid1, "prestop")
    assert hook.wait(20) == 0, hook.stderr()
    assert sup.wait_event("drain.finished")["reason"] == "drained"
    assert sup.popen.poll() is None
    assert "error" not in sup.event_names(), sup.stderr()


# ---- attacks on a real supervisor ---------------------------------------------------------------

HOSTILE: list[tuple[str, bytes, bool]] = [  # (what, bytes sent, then shutdown(SHUT_WR))
    ("garbage", b"\x00\xff\xfe garbage\n", False),
    ("invalid UTF-8", b'{"v": 1, "op": "\xff\xfe"}\n', False),
    ("nested past the parser's recursion limit", b"[" * 4000 + b"\n", False),
    ("nested inside a request", b'{"v": 1, "op": ' + b"[" * 3900 + b"\n", False),
    ("a 4000-digit number", b'{"v": 1' + b"0" * 4000 + b', "op": "status"}\n', False),
    ("a huge string", b'{"v": 1, "op": "' + b"x" * 4000 + b'"}\n', False),
    ("NaN version", b'{"v": NaN, "op": "status"}\n', False),
    ("true is not 1", b'{"v": true, "op": "status"}\n', False),
    ("longer than the limit", b"x" * 5000, False),
    ("no newline, then EOF", b'{"v": 1, "op": "status"}', True),
    ("nothing, then EOF", b"", True),
]


@needs_namespaces
def test_any_bytes_get_an_error_line_and_pid1_goes_on(procs: Processes) -> None:
    port = free_port()
    sup, pid1 = container(procs, "--delay", "0.2", "--settle", "0.1", port=port)
    address = mnt_ns_address(pid1)
    for what, payload, shut in HOSTILE:
        sock = connect(address)
        sock.sendall(payload)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        lines = read_lines(sock)
        assert len(lines) == 1, (what, lines)
        reply = json.loads(lines[0])
        assert reply["v"] == 1 and reply["type"] == "error", (what, reply)
        assert sup.popen.poll() is None, f"PID 1 died of {what}: {sup.stderr()[-2000:]}"
    assert cpu_over_a_second(pid1) < SPIN_LIMIT
    assert_responsive(procs, pid1)
    assert_drains(procs, sup, pid1)


@needs_namespaces
def test_any_bytes_at_all_get_one_error_line(procs: Processes) -> None:
    """Hypothesis drives a real PID 1: whatever bytes a client sends, then shutdown(SHUT_WR), it
    gets exactly one error line, and the supervisor lives on without an `error` event."""
    port = free_port()
    sup, pid1 = container(procs, "--delay", "0.2", "--settle", "0.1", port=port)
    address = mnt_ns_address(pid1)

    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(st.binary(max_size=6000) | st.lists(st.sampled_from(
        [b"{", b"[", b'"v"', b":", b"1", b",", b'"op"', b'"status"', b"}", b"\n", b"\xff",
         b"NaN", b"1e999", b"0" * 500, b"[" * 1200]), max_size=40).map(b"".join))
    def attack(payload: bytes) -> None:
        assume(parse_request(payload.partition(b"\n")[0])[0] is None)  # no real request
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(b"\0" + address[1:].encode())
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # answered and closed before reading it all: the answer is still there
            got = read_lines(sock)
        assert len(got) == 1 and json.loads(got[0])["type"] == "error", (payload[:100], got)

    attack()
    assert sup.popen.poll() is None
    assert "error" not in sup.event_names() and "drain.started" not in sup.event_names()
    assert_responsive(procs, pid1)


@needs_namespaces
def test_a_half_closed_client_is_answered_without_spinning(procs: Processes) -> None:
    port = free_port()
    sup, pid1 = container(procs, "--delay", "2", "--settle", "0.1", port=port)
    address = mnt_ns_address(pid1)
    status = connect(address)
    status.sendall(b'{"v": 1, "op": "status"}\n')
    status.shutdown(socket.SHUT_WR)  # "that is all I say", as `socat` or `nc -N` do
    reply = json.loads(read_lines(status)[0])
    assert reply["type"] == "status" and reply["state"] == "running"

    hook = connect(address, timeout=20)
    hook.sendall(b'{"v": 1, "op": "prestop"}\n')
    hook.shutdown(socket.SHUT_WR)
    sup.wait_event("drain.started")
    # The drain's delay runs; the half-closed client's end of input stays readable meanwhile.
    assert cpu_over_a_second(pid1) < SPIN_LIMIT
    messages = [json.loads(line) for line in read_lines(hook)]
    assert messages[0]["type"] == "accepted"
    assert messages[-1]["type"] == "result" and messages[-1]["reason"] == "drained"
    assert "drain.finished" in [m["event"]["event"] for m in messages if m["type"] == "event"]
    assert "error" not in sup.event_names()


@needs_namespaces
def test_a_busy_supervisor_makes_prestop_wait_not_fail(procs: Processes) -> None:
    port = free_port()
    sup, pid1 = container(procs, "--delay", "0.2", "--settle", "0.1", port=port)
    address = mnt_ns_address(pid1)
    # Clients that ask and never read: answered into their buffers, then closed.
    for sock in [connect(address) for _ in range(8)]:
        sock.sendall(b'{"v": 1, "op": "status"}\n')
    time.sleep(0.5)
    # Every client slot taken by clients that never say a word (the server drops each after its
    # request timeout, 5 s).
    idle = [connect(address) for _ in range(32)]
    extra = connect(address)
    assert b"busy" in read_lines(extra)[0]
    assert cpu_over_a_second(pid1) < SPIN_LIMIT
    started = time.monotonic()
    hook = exec_in(procs, pid1, "prestop")
    assert hook.wait(20) == 0, hook.stderr()
    assert time.monotonic() - started > 2, "it got in only once the idle clients were dropped"
    assert sup.wait_event("drain.finished")["reason"] == "drained"
    assert len(idle) == 32 and "error" not in sup.event_names()


@needs_namespaces
def test_out_of_file_descriptors_pauses_accepting_without_spinning(procs: Processes) -> None:
    port = free_port()
    sup, pid1 = container(procs, "--delay", "0.2", "--settle", "0.1", port=port)
    address = mnt_ns_address(pid1)
    soft, hard = resource.prlimit(pid1, resource.RLIMIT_NOFILE)
    used = len(os.listdir(f"/proc/{pid1}/fd"))
    resource.prlimit(pid1, resource.RLIMIT_NOFILE, (used + 2, hard))  # room for two clients
    try:
        clients = [connect(address) for _ in range(8)]  # the rest wait in the listen queue
        warning = sup.wait_event("warning")
        assert "EMFILE" in warning["message"] and "cannot accept" in warning["message"]
        assert cpu_over_a_second(pid1) < SPIN_LIMIT
        assert [e["event"] for e in sup.events()].count("warning") == 1, "said once"
        assert sup.popen.poll() is None
    finally:
        resource.prlimit(pid1, resource.RLIMIT_NOFILE, (soft, hard))
    # Descriptors back: the queued clients are served (they get their answer).
    clients[-1].sendall(b'{"v": 1, "op": "status"}\n')
    assert json.loads(read_lines(clients[-1])[0])["type"] == "status"
    for sock in clients:
        sock.close()
    assert_responsive(procs, pid1)
    assert_drains(procs, sup, pid1)


# ---- prestop and status against fake servers ----------------------------------------------------


class FakeServer:
    """A real Unix socket server at an abstract name; `reply(conn, n)` serves connection n."""

    def __init__(self, reply: Callable[[socket.socket, int], None]) -> None:
        self.address = f"@drainctl-test-fake-{os.getpid()}-{id(self)}"
        self.reply = reply
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(b"\0" + self.address[1:].encode())
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.served = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.served += 1
            with conn:
                conn.settimeout(0.5)
                try:
                    conn.recv(4096)
                    self.reply(conn, self.served)
                except OSError:
                    pass  # the client gave up: next one

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def fake() -> Iterator[Callable[[Callable[[socket.socket, int], None]], FakeServer]]:
    servers: list[FakeServer] = []

    def start(reply: Callable[[socket.socket, int], None]) -> FakeServer:
        servers.append(FakeServer(reply))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def lines(*messages: object) -> bytes:
    return b"".join(json.dumps(m).encode() + b"\n" for m in messages)


ACCEPTED = {"v": 1, "type": "accepted", "started": True, "trigger": "prestop", "time_left_s": 0.5}
RESULT = {"v": 1, "type": "result", "reason": "drained", "count": 0, "elapsed_s": 0.1, "code": 0}


def sends(payload: bytes) -> Callable[[socket.socket, int], None]:
    return lambda conn, _n: conn.sendall(payload)


def forever(payload: bytes) -> Callable[[socket.socket, int], None]:
    def reply(conn: socket.socket, _n: int) -> None:
        conn.settimeout(2)
        end = time.monotonic() + 30  # bounded: the client must give up long before
        while time.monotonic() < end:
            conn.sendall(payload)

    return reply


def silent(conn: socket.socket, _n: int) -> None:
    conn.settimeout(None)
    conn.recv(1)  # until the client leaves


# (case, reply, prestop's exit code, words in its one line (None: success, no line))
PRESTOP_REPLIES: list[tuple[str, Callable[[socket.socket, int], None], int, str | None]] = [
    ("absurd time_left_s and code", sends(lines(
        {**ACCEPTED, "time_left_s": 1e308}, {**RESULT, "code": 10**30})), 0, None),
    ("NaN time_left_s, code a string", sends(
        b'{"v": 1, "type": "accepted", "time_left_s": NaN}\n'
        + lines({**RESULT, "code": "x", "reason": "timeout"})), 1, None),
    ("wrong types everywhere", sends(lines(
        {"v": 1, "type": "accepted", "time_left_s": [1] * 10000},
        {"v": 1, "type": "event", "event": {"ts": "yesterday", "event": ["x"]}},
        {"v": 1, "type": "event", "event": [1, 2]},
        {"v": 1, "type": "unknown"}, [1], "x", {"type": None},
        {"v": 1, "type": "result"})), 1, None),
    ("negative time_left_s", sends(lines({**ACCEPTED, "time_left_s": -5}, RESULT)), 0, None),
    ("a line without newline, then close", sends(b'{"v": 1, "type": "result", "reason"'), 1,
     "middle of a line"),
    ("nested too deep", sends(b"[" * 100_000 + b"\n"), 1, "not a JSON line"),
    ("an error that is not a string", sends(lines({"v": 1, "type": "error", "error": [1]})), 2,
     "[1]"),
    ("talks forever", forever(lines(ACCEPTED, {"v": 1, "type": "noise"}) * 50), 1, "in time"),
    ("one endless line", forever(b"x" * 65536), 1, "longer than"),
    ("never answers", silent, 1, "in time"),
]


@pytest.mark.parametrize(("case", "reply", "code", "words"), PRESTOP_REPLIES,
                         ids=[case for case, *_ in PRESTOP_REPLIES])
def test_prestop_survives_any_reply(procs: Processes, fake: Callable[..., FakeServer], case: str,
                                    reply: Callable[[socket.socket, int], None], code: int,
                                    words: str | None) -> None:
    server = fake(reply)
    started = time.monotonic()
    hook = procs.drainctl("prestop", "--control-socket", server.address)
    assert hook.wait(20) == code, hook.stderr()
    assert time.monotonic() - started < 15
    errors = [line for line in hook.stderr().splitlines() if not line.startswith("{")]
    assert "Traceback" not in hook.stderr()
    if words is None:
        assert errors == []
    else:
        assert len(errors) == 1 and errors[0].startswith("drainctl: prestop: "), errors
        assert words in errors[0]


def test_prestop_retries_a_busy_server_within_its_budget(
    procs: Processes, fake: Callable[..., FakeServer]
) -> None:
    busy = lines({"v": 1, "type": "error", "error": "busy: 32 clients already connected",
                  "busy": True})
    server = fake(lambda conn, n: conn.sendall(busy if n <= 5 else lines(ACCEPTED, RESULT)))
    hook = procs.drainctl("prestop", "--control-socket", server.address)
    assert hook.wait(20) == 0, hook.stderr()
    assert server.served == 6

    always = fake(sends(busy))
    started = time.monotonic()
    hook = procs.drainctl("prestop", "--control-socket", always.address, "--grace-period", "3s",
                          "--stop-timeout", "1s")
    assert hook.wait(20) == 1, hook.stderr()
    assert 1.5 < time.monotonic() - started < 10, "it tried for its budget (2 s), then gave up"
    assert "busy" in hook.stderr() and "budget" in hook.stderr()


STATUS_REPLIES: list[tuple[str, Callable[[socket.socket, int], None], int]] = [
    ("absurd numbers", sends(
        b'{"v": 1, "type": "status", "state": "draining", "uptime_s": 1e308, '
        b'"time_left_s": NaN, "drain_elapsed_s": Infinity, "trigger": "x", '
        b'"connections": {"8080": 5}, "outcome": {"elapsed_s": "x"}, "established": [1]}\n'), 0),
    ("fields missing", sends(lines({"v": 1, "type": "status"})), 0),
    ("unknown types first", sends(lines({"type": "what"}, [], {"v": 1, "type": "status",
                                                                "state": ["a"]})), 0),
    ("closed without answering", sends(b""), 3),
    ("a line without newline", sends(b'{"v": 1, "type": "status"'), 3),
    ("talks forever", forever(lines({"v": 1, "type": "noise"}) * 100), 3),
    ("never answers", silent, 3),
]


@pytest.mark.parametrize(("case", "reply", "code"), STATUS_REPLIES,
                         ids=[case for case, *_ in STATUS_REPLIES])
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_status_survives_any_reply(procs: Processes, fake: Callable[..., FakeServer], case: str,
                                   reply: Callable[[socket.socket, int], None], code: int,
                                   as_json: bool) -> None:
    server = fake(reply)
    status = procs.drainctl("status", "--control-socket", server.address,
                            *(["--json"] if as_json else []))
    assert status.wait(20) == code, status.stderr()
    assert "Traceback" not in status.stderr()
    if code == 0:
        assert status.stderr() == ""
        if as_json:
            json.loads(status.stdout())
        else:
            assert status.stdout().startswith("state:")
    else:
        assert len(status.stderr().splitlines()) == 1


# ---- a squatter of another uid --------------------------------------------------------------

SQUATTER = r"""
import socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.bind(b"\0" + sys.argv[1].encode())
sock.listen(8)
print("listening", flush=True)
while True:
    conn, _ = sock.accept()
    try:
        conn.recv(4096)
        conn.sendall(
            b'{"v":1,"type":"accepted","started":true,"trigger":"prestop","time_left_s":1}\n'
            b'{"v":1,"type":"status","state":"running","mode":"supervisor"}\n'
            b'{"v":1,"type":"result","reason":"drained","count":0,"elapsed_s":0.1,"code":0}\n')
    except OSError:
        pass
    conn.close()
"""


def python_for(uid: int) -> str | None:
    """An interpreter `uid` may run, and exec again, with drainctl importable (a pyenv under a
    0700 /root may not be)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        result = subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", candidate, "-c",
             "import subprocess, sys, drainctl.cli.commands, drainctl.control.prestop; "
             "subprocess.run([sys.executable, '-c', 'pass'], check=True)"],
            capture_output=True, timeout=20, cwd="/")
        if result.returncode == 0:
            return candidate
    return None


needs_setpriv = pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv(1)")


@needs_namespaces
@needs_setpriv
def test_a_squatter_of_another_uid_is_named_and_not_trusted(procs: Processes) -> None:
    python = python_for(NOBODY)
    if python is None:
        pytest.skip("no Python interpreter that uid 65534 may run")
    name = f"drainctl-test-squat-{os.getpid()}"
    squatter = procs.start(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                            "--clear-groups", python, "-c", SQUATTER, name], cwd="/")
    squatter.wait_output("listening")
    port = free_port()
    sup, pid1 = container(procs, "--control-socket", f"@{name}", "--delay", "0.2", port=port)
    warning = sup.wait_event("warning")
    assert warning["holder_uid"] == NOBODY and "another user" in warning["message"]

    hook = exec_in(procs, pid1, "prestop", "--control-socket", f"@{name}")  # as root
    assert hook.wait(15) == 1, hook.stderr()
    assert "uid 65534" in hook.stderr() and "no drain was started" in hook.stderr()
    status = exec_in(procs, pid1, "status", "--control-socket", f"@{name}")
    assert status.wait(15) == 3
    assert "uid 65534" in status.stderr() and len(status.stderr().splitlines()) == 1
    check = exec_in(procs, pid1, "check", "--control-socket", f"@{name}", "--port", str(port))
    assert check.wait(30) == 1
    assert "PROBLEM" in check.stdout() and "uid 65534" in check.stdout()
    assert "drain.started" not in sup.event_names()
    os.kill(pid1, signal.SIGTERM)  # the supervisor still drains and stops the app itself
    assert sup.wait(20) == 128 + signal.SIGTERM
    assert sup.events()[-1]["event"] == "exit"


@needs_namespaces
@needs_setpriv
def test_without_a_supervisor_prestop_drains_past_a_squatter(procs: Processes) -> None:
    """The app is PID 1 (no drainctl run): the hook cannot join anything, so it drains itself,
    without a channel, and says who holds the name."""
    python = python_for(NOBODY)
    if python is None:
        pytest.skip("no Python interpreter that uid 65534 may run")
    name = f"drainctl-test-squat2-{os.getpid()}"
    squatter = procs.start(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                            "--clear-groups", python, "-c", SQUATTER, name], cwd="/")
    squatter.wait_output("listening")
    port = free_port()
    _app, pid1 = container(procs, port=port, supervised=False)
    hook = exec_in(procs, pid1, "prestop", "--control-socket", f"@{name}", "--delay", "0.3",
                   "--settle", "0.1")
    assert hook.wait(15) == 0, hook.stderr()
    events = hook.events()
    warning = next(e for e in events if e["event"] == "warning")
    assert warning["holder_uid"] == NOBODY and "without a control channel" in warning["message"]
    finished = next(e for e in events if e["event"] == "drain.finished")
    assert finished["reason"] == "drained"
    names = [e["event"] for e in events]
    assert names.index("warning") < names.index("drain.started") < names.index("delay.finished")


@needs_namespaces
@needs_setpriv
def test_root_trusts_a_pid1_supervisor_of_another_uid(procs: Processes) -> None:
    """An image whose USER is 65534 runs drainctl as PID 1 with that uid; `docker exec -u root`
    (or a root hook) still reaches it: PID 1 of the client's PID namespace is trusted."""
    python = python_for(NOBODY)
    if python is None:
        pytest.skip("no Python interpreter that uid 65534 may run with drainctl importable")
    port = free_port()
    sup = procs.start(["unshare", "--pid", "--fork", "--mount-proc", "setpriv",
                       f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python, "-m",
                       "drainctl", "run", "--delay", "0.2", "--settle", "0.1", "--port", str(port),
                       "--", python, *app("httpapp.py", "--port", str(port))[1:]], cwd="/")
    sup.wait_output("listening")
    pid1 = inner_pid(sup)
    assert os.stat(f"/proc/{pid1}").st_uid == NOBODY
    hook = exec_in(procs, pid1, "prestop")  # as root
    assert hook.wait(15) == 0, hook.stderr()
    assert sup.wait_event("drain.finished")["reason"] == "drained"
