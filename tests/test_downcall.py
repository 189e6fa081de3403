"""The down call and the `Connection: close` probe.

Behaviour is checked against real loopback servers (raw sockets in a thread, so each test says
exactly what the app does on the wire: answer, refuse, hang, reset, keep alive). The retry and
back-off arithmetic is checked separately with httpx.MockTransport and a fake clock.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

import httpx
import pytest

from drainctl.drain.downcall import (
    DownResult,
    ProbeResult,
    call_down,
    probe_connection_close,
    probe_url,
)

# Time the machine may add on top of a deadline (thread start, a loaded CI runner).
MARGIN_S = 0.3


# --- a loopback server whose behaviour each test spells out -------------------------------------


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]


@dataclass
class Server:
    """A TCP server on 127.0.0.1 serving one connection at a time with `handler`."""

    handler: Callable[[socket.socket, Server], None]
    requests: list[Request] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        # accept() wakes up regularly to notice `stopping`.
        self._sock.settimeout(0.05)
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name=f"server-{self.port}")

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> Server:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stopping.set()
        self._thread.join(timeout=5)
        self._sock.close()
        assert not self._thread.is_alive(), "server thread did not stop"

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2.0)
                try:
                    self.handler(conn, self)
                except OSError:
                    pass  # the client went away: that is the client's outcome to check

    def read_request(self, conn: socket.socket) -> Request | None:
        """Read one request head (the down call and the probe send no body)."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return None
            data += chunk
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        method, target, _ = head[0].split(" ", 2)
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        request = Request(method, target, headers)
        self.requests.append(request)
        return request

    def wait_for_client_close(self, conn: socket.socket) -> None:
        """Keep the connection open until the client closes it (or the test ends)."""
        conn.settimeout(0.05)
        while not self.stopping.is_set():
            try:
                if not conn.recv(4096):
                    return
            except TimeoutError:
                continue


def response(status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    return head.encode() + b"\r\n" + body


def answering(*statuses: int, headers: dict[str, str] | None = None) -> Callable[..., None]:
    """A handler answering each request with the next status (the last one repeats)."""

    def handler(conn: socket.socket, server: Server) -> None:
        if server.read_request(conn) is not None:
            index = min(len(server.requests), len(statuses)) - 1
            conn.sendall(response(statuses[index], headers, b"ok"))

    return handler


def hanging(conn: socket.socket, server: Server) -> None:
    """Accept, read the request, never answer."""
    server.read_request(conn)
    server.stopping.wait()


def resetting(conn: socket.socket, server: Server) -> None:
    """Accept, then close with SO_LINGER 0: the kernel sends a RST instead of a FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def closed_port() -> int:
    """A loopback port nobody listens on: connecting is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- the down call against real servers ---------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "put"])
def test_down_call_reaches_the_app_with_method_and_path(method: str) -> None:
    with Server(answering(200)) as server:
        result = call_down(server.url("/ok.htm?down=true"), method, timeout=2.0)
    assert result == DownResult(
        server.url("/ok.htm?down=true"), 200, None, result.elapsed_ms, attempts=1
    )
    assert result.ok
    assert [(r.method, r.target) for r in server.requests] == [
        (method.upper(), "/ok.htm?down=true")
    ]
    # Our own connection counts in the drain: we ask the app to close it at once.
    assert server.requests[0].headers["connection"] == "close"
    assert server.requests[0].headers["user-agent"].startswith("drainctl/")


def test_5xx_is_retried_until_attempts_run_out() -> None:
    start = time.monotonic()
    with Server(answering(500)) as server:
        result = call_down(server.url("/down"), timeout=1.0, attempts=3, deadline=start + 3.0)
    assert (result.status, result.error, result.attempts, result.ok) == (500, None, 3, False)
    assert len(server.requests) == 3
    # Two back-offs (0.2 s, 0.4 s) between the three attempts, all inside the deadline.
    assert 0.6 <= result.elapsed_ms / 1000 <= 3.0
    assert time.monotonic() - start <= 3.0


def test_5xx_then_success_stops_retrying() -> None:
    with Server(answering(503, 200)) as server:
        result = call_down(server.url("/down"), timeout=1.0, attempts=5)
    assert (result.status, result.attempts, result.ok) == (200, 2, True)
    assert len(server.requests) == 2


@pytest.mark.parametrize("status", [404, 409, 302])
def test_4xx_and_3xx_are_final_and_redirects_not_followed(status: int) -> None:
    with Server(answering(status, headers={"Location": "/elsewhere"})) as server:
        result = call_down(server.url("/down"), timeout=1.0, attempts=3)
    assert (result.status, result.error, result.attempts, result.ok) == (status, None, 1, False)
    assert [r.target for r in server.requests] == ["/down"]


def test_refused_is_retried_as_configured() -> None:
    url = f"http://127.0.0.1:{closed_port()}/down"
    result = call_down(url, timeout=1.0, attempts=3)
    assert (result.status, result.error, result.attempts) == (None, "refused", 3)
    assert 0.6 <= result.elapsed_ms / 1000 <= 0.6 + MARGIN_S


def test_refused_stops_when_the_deadline_leaves_no_room() -> None:
    start = time.monotonic()
    url = f"http://127.0.0.1:{closed_port()}/down"
    result = call_down(url, timeout=1.0, attempts=10, deadline=start + 0.5)
    # Attempts at ~0 s and ~0.2 s; the next back-off (0.4 s) would end past the deadline.
    assert (result.error, result.attempts) == ("refused", 2)
    assert time.monotonic() - start <= 0.5 + MARGIN_S


def test_hanging_app_times_out_at_the_deadline_not_the_timeout() -> None:
    start = time.monotonic()
    with Server(hanging) as server:
        result = call_down(server.url("/down"), timeout=5.0, attempts=3, deadline=start + 0.5)
    elapsed = time.monotonic() - start
    assert (result.status, result.error, result.attempts) == (None, "timeout", 1)
    assert 0.4 <= elapsed <= 0.5 + MARGIN_S
    assert result.elapsed_ms / 1000 <= 0.5 + MARGIN_S


def test_hanging_app_is_retried_within_the_deadline() -> None:
    start = time.monotonic()
    with Server(hanging) as server:
        result = call_down(server.url("/down"), timeout=0.3, attempts=3, deadline=start + 1.2)
    assert result.error == "timeout"
    # 0.3 s attempt, 0.2 s back-off, 0.3 s attempt; a 0.4 s back-off no longer fits.
    assert result.attempts == 2
    assert time.monotonic() - start <= 1.2 + MARGIN_S


def test_reset_is_a_connection_error_not_a_crash() -> None:
    start = time.monotonic()
    with Server(resetting) as server:
        result = call_down(server.url("/down"), timeout=1.0, attempts=2, deadline=start + 2.0)
    # The RST may hit our write or our read; either way it is a connection-level failure.
    assert result.status is None
    assert result.error in ("reset", "closed")
    assert result.attempts == 2


def closing_without_answer(conn: socket.socket, server: Server) -> None:
    server.read_request(conn)
    # returning closes the socket with a FIN and no response


def test_close_without_answer_is_retried() -> None:
    with Server(closing_without_answer) as server:
        result = call_down(server.url("/down"), timeout=1.0, attempts=2)
    assert (result.status, result.error, result.attempts) == (None, "closed", 2)
    assert len(server.requests) == 2


def plain_http(conn: socket.socket, server: Server) -> None:
    conn.recv(4096)  # a TLS ClientHello, never a request head
    conn.sendall(response(400, body=b"plain HTTP here"))


def test_tls_failure_is_named_and_not_retried() -> None:
    with Server(plain_http) as server:
        url = server.url("/down").replace("http://", "https://")
        result = call_down(url, timeout=1.0, attempts=3)
        probe = probe_connection_close(url, timeout=1.0)
    assert result.status is None
    assert result.error is not None and result.error.startswith("tls: ")
    assert result.attempts == 1
    assert probe.closes is None and probe.error is not None and probe.error.startswith("tls: ")


def test_deadline_already_past_makes_no_attempt() -> None:
    with Server(answering(200)) as server:
        result = call_down(server.url("/down"), deadline=time.monotonic() - 1.0)
    assert (result.status, result.error, result.attempts, result.ok) == (
        None,
        "deadline",
        0,
        False,
    )
    assert server.requests == []
    assert result.elapsed_ms < 1000


def test_proxy_environment_does_not_catch_the_loopback_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A proxy that refuses: if the call went through it, it would fail.
    proxy = f"http://127.0.0.1:{closed_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with Server(answering(200)) as server:
        result = call_down(server.url("/down"), timeout=2.0)
    assert (result.status, result.attempts) == (200, 1)


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/down", "http://", "not a url", ""])
def test_bad_url_is_reported_not_raised(url: str) -> None:
    result = call_down(url, timeout=0.5, attempts=3)
    assert result.status is None
    assert result.error
    assert "\n" not in result.error
    assert result.attempts <= 1


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("nan")])
def test_bad_timeout_is_reported_not_raised(timeout: float) -> None:
    result = call_down("http://127.0.0.1:9/down", timeout=timeout)
    assert (result.status, result.attempts) == (None, 0)
    assert result.error is not None and "timeout" in result.error


# --- the probe against real servers -------------------------------------------------------------


def test_probe_sees_connection_close() -> None:
    with Server(answering(200, headers={"Connection": "close"})) as server:
        result = probe_connection_close(server.url("/healthz"), timeout=2.0)
    assert result == ProbeResult(True, 200, None)
    assert result.warning() is None
    assert [r.target for r in server.requests] == ["/healthz"]
    # The probe must look like a keep-alive client, or the answer proves nothing.
    assert server.requests[0].headers.get("connection", "keep-alive") == "keep-alive"


def keeping_alive(conn: socket.socket, server: Server) -> None:
    if server.read_request(conn) is not None:
        conn.sendall(response(200, body=b"ok"))
        server.wait_for_client_close(conn)


def test_probe_sees_a_kept_alive_connection_and_warns() -> None:
    with Server(keeping_alive) as server:
        result = probe_connection_close(server.url("/"), timeout=2.0)
    assert result == ProbeResult(False, 200, None)
    message = result.warning()
    assert message
    assert "\n" not in message
    assert "Connection: close" in message
    assert "DrainMiddleware" in message
    assert "examples/java" in message


def closing_without_header(conn: socket.socket, server: Server) -> None:
    if server.read_request(conn) is not None:
        conn.sendall(response(200, body=b"ok"))
    # returning closes the socket: a FIN right after the response


def test_probe_counts_a_close_right_after_the_response() -> None:
    with Server(closing_without_header) as server:
        result = probe_connection_close(server.url("/"), timeout=2.0)
    assert result == ProbeResult(True, 200, None)


def http10(conn: socket.socket, server: Server) -> None:
    if server.read_request(conn) is not None:
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")


def test_probe_http10_without_keep_alive_closes() -> None:
    with Server(http10) as server:
        result = probe_connection_close(server.url("/"), timeout=2.0)
    assert result == ProbeResult(True, 200, None)


def test_probe_refused_is_unknown() -> None:
    result = probe_connection_close(f"http://127.0.0.1:{closed_port()}/", timeout=1.0)
    assert result == ProbeResult(None, None, "refused")
    assert result.warning() is None


def test_probe_hanging_is_unknown_and_bounded() -> None:
    start = time.monotonic()
    with Server(hanging) as server:
        result = probe_connection_close(server.url("/"), timeout=0.3)
    assert result == ProbeResult(None, None, "timeout")
    assert time.monotonic() - start <= 0.3 + MARGIN_S


# --- the probe's URL (validation: options.parse_down_url, tests/test_options.py) ----------


@pytest.mark.parametrize(
    ("down_url", "path", "expected"),
    [
        ("http://127.0.0.1:8080/ok.htm?down=true", "/", "http://127.0.0.1:8080/"),
        ("http://127.0.0.1:8080/ok.htm?down=true#x", "/healthz", "http://127.0.0.1:8080/healthz"),
        ("https://app:8443/down", "/ready?full=1", "https://app:8443/ready?full=1"),
        ("http://[::1]:8080/down", "status", "http://[::1]:8080/status"),
    ],
)
def test_probe_url(down_url: str, path: str, expected: str) -> None:
    assert probe_url(down_url, path) == expected


def test_module_does_not_import_httpx() -> None:
    # The supervisor imports this module at start-up; httpx (~170 ms) only comes with a drain.
    code = (
        "import sys, drainctl.drain.downcall as d\n"
        "d.probe_url('http://127.0.0.1:8080/down')\n"
        "print('httpx' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.strip() == "False"


# --- retry and back-off arithmetic with a fake clock --------------------------------------------


@dataclass
class FakeTime:
    now: float = 100.0
    sleeps: list[float] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def scripted(
    fake: FakeTime, outcomes: list[int | Exception], cost: float = 0.0
) -> tuple[httpx.MockTransport, list[float]]:
    """A transport replaying `outcomes` (the last repeats); each request takes `cost` seconds.

    Returns the transport and the read timeout each request was given.
    """
    timeouts: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        timeouts.append(request.extensions["timeout"]["read"])
        fake.now += cost
        outcome = outcomes[min(len(timeouts), len(outcomes)) - 1]
        if isinstance(outcome, Exception):
            raise outcome
        return httpx.Response(outcome)

    return httpx.MockTransport(handler), timeouts


def refused() -> httpx.ConnectError:
    try:
        raise httpx.ConnectError("[Errno 111] Connection refused") from ConnectionRefusedError(
            111, "Connection refused"
        )
    except httpx.ConnectError as exc:
        return exc


def test_back_off_doubles_between_attempts() -> None:
    fake = FakeTime()
    transport, _ = scripted(fake, [refused()])
    result = call_down(
        "http://app/down", attempts=5, transport=transport, clock=fake.clock, sleep=fake.sleep
    )
    assert (result.error, result.attempts) == ("refused", 5)
    assert fake.sleeps == pytest.approx([0.2, 0.4, 0.8, 1.6])
    assert result.elapsed_ms == pytest.approx(3000.0)


def test_each_attempt_gets_the_time_left_before_the_deadline() -> None:
    fake = FakeTime(now=0.0)
    transport, timeouts = scripted(fake, [503], cost=4.0)
    result = call_down(
        "http://app/down",
        timeout=5.0,
        attempts=10,
        deadline=10.0,
        transport=transport,
        clock=fake.clock,
        sleep=fake.sleep,
    )
    # 0 -> 4, back-off 0.2, 4.2 -> 8.2, back-off 0.4, 8.6 -> (1.4 s left); no room for a 4th.
    assert timeouts == pytest.approx([5.0, 5.0, 1.4])
    assert fake.sleeps == pytest.approx([0.2, 0.4])
    assert (result.status, result.attempts) == (503, 3)


def test_no_back_off_that_would_end_past_the_deadline() -> None:
    fake = FakeTime(now=0.0)
    transport, _ = scripted(fake, [refused()], cost=0.1)
    result = call_down(
        "http://app/down",
        attempts=10,
        deadline=0.5,
        transport=transport,
        clock=fake.clock,
        sleep=fake.sleep,
    )
    assert fake.sleeps == pytest.approx([0.2])
    assert result.attempts == 2
    assert fake.now <= 0.5


@pytest.mark.parametrize(
    ("raised", "error", "attempts"),
    [
        (httpx.ConnectTimeout("timed out"), "timeout", 3),
        (httpx.ReadTimeout("timed out"), "timeout", 3),
        (httpx.RemoteProtocolError("Server disconnected without sending a response."), "closed", 3),
        (httpx.UnsupportedProtocol("Request URL has an unsupported protocol 'ftp://'."), None, 1),
        (RuntimeError("boom"), "RuntimeError: boom", 1),
    ],
)
def test_errors_are_named_and_retried_when_transient(
    raised: Exception, error: str | None, attempts: int
) -> None:
    fake = FakeTime()
    transport, _ = scripted(fake, [raised])
    result = call_down(
        "http://app/down", attempts=3, transport=transport, clock=fake.clock, sleep=fake.sleep
    )
    assert result.status is None
    assert result.attempts == attempts
    assert result.error is not None
    if error is not None:
        assert result.error == error


def chained(outer: httpx.TransportError, cause: BaseException) -> httpx.TransportError:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    ("raised", "error", "attempts"),
    [
        (chained(httpx.ReadError("reset"), ConnectionResetError(104, "reset")), "reset", 3),
        (chained(httpx.WriteError("pipe"), BrokenPipeError(32, "pipe")), "reset", 3),
        (chained(httpx.ConnectError("dns"), socket.gaierror(-2, "unknown")), "dns", 1),
    ],
)
def test_os_errors_under_httpx_are_named(raised: Exception, error: str, attempts: int) -> None:
    fake = FakeTime()
    transport, _ = scripted(fake, [raised])
    result = call_down(
        "http://app/down", attempts=3, transport=transport, clock=fake.clock, sleep=fake.sleep
    )
    assert (result.error, result.attempts) == (error, attempts)


def test_ok_is_2xx_only() -> None:
    def result(status: int | None) -> DownResult:
        return DownResult("http://app/", status, None, 1.0, 1)

    assert [result(s).ok for s in (199, 200, 204, 299, 300, 404, 500, None)] == [
        False,
        True,
        True,
        True,
        False,
        False,
        False,
        False,
    ]


def probe_answer(headers: list[tuple[str, str]], http_version: bytes) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=headers, extensions={"http_version": http_version})

    return httpx.MockTransport(handler)


@pytest.mark.parametrize(
    ("headers", "http_version", "closes"),
    [
        ([("Connection", "close")], b"HTTP/1.1", True),
        ([("Connection", "keep-alive, Close")], b"HTTP/1.1", True),
        ([("Connection", "Upgrade"), ("Connection", "close")], b"HTTP/1.1", True),
        ([("Connection", "closed")], b"HTTP/1.1", False),
        ([("Connection", "keep-alive")], b"HTTP/1.1", False),
        ([], b"HTTP/1.1", False),
        ([], b"HTTP/1.0", True),
        ([("Connection", "Keep-Alive")], b"HTTP/1.0", False),
    ],
)
def test_probe_reads_the_connection_header(
    headers: list[tuple[str, str]], http_version: bytes, closes: bool
) -> None:
    transport = probe_answer(headers, http_version)
    result = probe_connection_close("http://app/", transport=transport)
    assert result == ProbeResult(closes, 200, None)
    assert (result.warning() is not None) == (not closes)
