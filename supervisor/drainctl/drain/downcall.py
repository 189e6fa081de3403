"""The app's "down" endpoint call, and the `Connection: close` self-test probe.

After the delay, the drain tells the app it is going down (the incident's
`/ok.htm?down=true`); from then on the app must answer `Connection: close` so that keep-alive
clients finish their request, leave and reconnect to another pod (README, "Why"). The
probe checks that last part with one keep-alive request and turns a missing header into a
`contract.warning` event.

Both calls report one outcome and never raise: a failed down call is logged and the drain goes on
(docs/interface.md, "The down call"). httpx is imported inside the functions, not at module
level: it costs ~170 ms to import and the supervisor must start fast, while only a drain calls
this code.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from drainctl.redact import redact_url

if TYPE_CHECKING:
    import httpx

    from drainctl.drain.bounded_http import DeadlineBackend

__all__ = [
    "ATTEMPTS",
    "ATTEMPT_MARGIN_S",
    "DownResult",
    "ProbeResult",
    "call_down",
    "down_call_max_s",
    "probe_connection_close",
    "probe_url",
    "redact_url",
    "warm_up",
]

# Attempts of one down call (the first and two retries), as the supervisor makes it.
ATTEMPTS = 3
# What an attempt may take past its timeout: the deadline is checked before and enforced on
# every socket operation (bounded_http.py), so only the work between two operations (a few
# milliseconds, more on a loaded node) and the thread hand-over come on top. Measured on loopback
# with the slow servers of tests/test_downcall_deadline.py: at most 30 ms, median 1-3 ms, on
# 2 cores at load average 15.
ATTEMPT_MARGIN_S = 0.1

# Back-off between attempts: 0.2 s, 0.4 s, 0.8 s... capped, so a few retries fit in the few
# seconds a drain gives the down call.
_BACKOFF_FIRST_S = 0.2
_BACKOFF_MAX_S = 2.0
# An attempt with less time than this is unlikely to connect and get an answer on a busy node;
# starting it would mostly add a timeout to the log. The deadline "leaves no room" below this.
_MIN_ATTEMPT_S = 0.05
# The down call's body is read (so the socket is not closed with unread data, which makes the
# kernel send a RST to the app) but never kept: cap what we are willing to read.
_BODY_CAP = 64 * 1024
# After a probe response without `Connection: close`, how long to watch for the server closing
# the connection by itself. On loopback a close that follows the response arrives within
# microseconds; a server that only closes after its keep-alive timeout counts as keeping it open.
_PROBE_CLOSE_WAIT_S = 0.05
_ERROR_MAX_CHARS = 200


@dataclass(frozen=True, slots=True)
class DownResult:
    """The outcome of the down call: a final status, or the last attempt's error."""

    url: str
    status: int | None  # final HTTP status; None when no response came
    error: str | None  # None on a response; else "refused", "timeout", "reset", "dns", ...
    elapsed_ms: float  # the whole call, all attempts and back-off
    attempts: int

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """Whether the app now ends keep-alive connections: the outcome of one keep-alive request."""

    closes: bool | None  # True: it closes; False: it kept the connection open; None: no probe
    status: int | None
    error: str | None

    def warning(self) -> str | None:
        """The `contract.warning` message when the app kept the connection open, else None."""
        if self.closes is not False:
            return None
        answer = f"its {self.status} response" if self.status is not None else "its response"
        return (
            f"The app kept a keep-alive connection open after the down call ({answer} had no "
            "`Connection: close`), so keep-alive clients will not leave and the drain will likely "
            "run to its deadline: the app must answer `Connection: close` after the down call, "
            "e.g. with drainctl.wsgi/asgi DrainMiddleware or the Java filter in examples/java."
        )


def down_call_max_s(timeout: float, attempts: int = ATTEMPTS) -> float:
    """The longest a down call with this `--down-timeout` can take, all attempts and back-off.

    Pure arithmetic, for the drain to give the down phase its share of the budget: `attempts`
    attempts of `timeout` (each may run ATTEMPT_MARGIN_S over) and the back-offs between them.
    `call_down` never runs past this, nor past the deadline it is given.
    """
    attempts = max(1, attempts)
    backoff, total = _BACKOFF_FIRST_S, 0.0
    for _ in range(attempts - 1):
        total += backoff
        backoff = min(backoff * 2, _BACKOFF_MAX_S)
    return attempts * (max(0.0, timeout) + ATTEMPT_MARGIN_S) + total


def probe_url(down_url: str, probe_path: str = "/") -> str:
    """The probe's URL: the down URL's scheme, host and port with `probe_path` (and its query)."""
    parts = urlsplit(down_url)
    path, _, query = probe_path.partition("?")
    if not path.startswith("/"):
        path = "/" + path
    return parts._replace(path=path, query=query, fragment="").geturl()


def call_down(
    url: str,
    method: str = "GET",
    timeout: float = 5.0,
    *,
    deadline: float | None = None,
    attempts: int = ATTEMPTS,
    transport: httpx.BaseTransport | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> DownResult:
    """Call the down endpoint; retry refused/reset/timeout and 5xx with back-off. Never raises.

    Stops at the first 2xx-4xx response (a 4xx will not change on retry), after `attempts`, or
    when `deadline` (on `clock`) leaves no room for another attempt. Each attempt ends within
    `min(timeout, time left)` (+ ATTEMPT_MARGIN_S) end to end, name resolution, connect, TLS,
    headers and body included, whatever the server does (bounded_http.py); the whole call within
    `down_call_max_s(timeout, attempts)` and the deadline. `transport` is the seam for tests
    (httpx.MockTransport); it is left open for its owner. An error never shows the URL's
    password or query values (redact.py).
    """
    start = clock()
    made = 0
    status: int | None = None
    error: str | None = None
    try:
        warm_up()  # the imports, once per process; the TLS context counts in the first attempt
        setup = clock()
        client, backend = _client(url, transport)
    except Exception as exc:  # never raise: the drain goes on without the down call
        return DownResult(url, None, _scrub(_short(exc), url), _ms(clock() - start), 0)
    try:
        if not timeout > 0:  # also catches NaN
            return DownResult(url, None, f"invalid timeout {timeout!r}", _ms(clock() - start), 0)
        # The room an attempt needs; a user's own shorter timeout is taken at its word.
        room = min(_MIN_ATTEMPT_S, timeout)
        backoff = _BACKOFF_FIRST_S
        for _ in range(max(1, attempts)):
            budget = timeout
            if made == 0:  # the first attempt's time includes setting up the client
                budget = max(room, timeout - (clock() - setup))
            if deadline is not None:
                budget = min(budget, deadline - clock())
            if budget < room:
                if made == 0:
                    error = "deadline"  # passed, or too close to start even one attempt
                break
            made += 1
            status, error, retry = _attempt(client, backend, method, url, budget, clock)
            if not retry or made >= attempts:
                break
            if deadline is not None and clock() + backoff + room > deadline:
                break  # no room for another attempt after the back-off: keep this outcome
            sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_S)
    except Exception as exc:  # a bug or an exotic error must not stop the drain
        status, error = None, _short(exc)
    finally:
        if transport is None:
            client.close()
    error = None if error is None else _scrub(error, url)
    return DownResult(url, status, error, _ms(clock() - start), made)


def probe_connection_close(
    url: str,
    timeout: float = 2.0,
    *,
    transport: httpx.BaseTransport | None = None,
) -> ProbeResult:
    """One HTTP/1.1 keep-alive GET: does the app now end the connection after answering?

    True when the response says so (the `close` connection option, or HTTP/1.0 without
    `keep-alive`: RFC 9112 section 9.3), or when the server closes the socket right after it.
    Never raises; None when no response came.
    """
    try:
        client, backend = _client(url, transport)
    except Exception as exc:
        return ProbeResult(None, None, _scrub(_short(exc), url))
    try:
        # No `Connection` header of our own: the point is to look like a keep-alive client.
        until = time.monotonic() + timeout
        if backend is not None:
            backend.until = until
        request = client.build_request("GET", url, timeout=timeout)
        response = client.send(request, stream=True, follow_redirects=False)
        try:
            status = response.status_code
            if _response_closes(response.http_version, response.headers.get_list("connection")):
                return ProbeResult(True, status, None)
            try:
                complete = _read_capped(response, clock=time.monotonic, until=until)
            except Exception as exc:
                return ProbeResult(None, status, _describe(exc)[0])
            # No `Connection: close`. Whether the server closes right after can only be seen
            # once the whole body is read; a body too long or slow for that counts as kept open.
            closed = complete and _server_closed(response.extensions.get("network_stream"))
            return ProbeResult(closed, status, None)
        finally:
            response.close()
    except Exception as exc:
        return ProbeResult(None, None, _describe(exc)[0])
    finally:
        if transport is None:
            client.close()


def warm_up(url: str | None = None) -> None:
    """Import httpx and the deadline transport, and build the TLS context an https `url` needs.

    Each is done once per process; `call_down` does what is left. The supervisor calls this
    during the delay, so that none of it (~0.2 s to import, ~40-130 ms to load the CA bundle)
    falls in the down call's time. Never raises for a bad URL.
    """
    import httpcore  # noqa: F401  (httpx imports it on first use)
    import httpx  # noqa: F401

    from drainctl.drain import bounded_http

    if url is not None and urlsplit(url).scheme.lower() == "https":
        bounded_http.tls_context()


def _client(
    url: str, transport: httpx.BaseTransport | None
) -> tuple[httpx.Client, DeadlineBackend | None]:
    """The client, and the backend whose deadline bounds each request (None with a test seam)."""
    import httpx

    from drainctl import __version__

    backend: DeadlineBackend | None = None
    if transport is None:
        from drainctl.drain.bounded_http import DeadlineBackend, deadline_transport

        backend = DeadlineBackend()
        # An http:// URL never does TLS here (no redirects are followed), so no SSL context is
        # built: loading the CA bundle costs ~40 ms of the drain's budget.
        transport = deadline_transport(backend, https=urlsplit(url).scheme.lower() == "https")
    client = httpx.Client(
        transport=transport,
        # A pod's HTTP_PROXY / ALL_PROXY must not catch a loopback call to the app, and
        # SSL_CERT_FILE & co. are the app's settings, not ours (our own transport ignores both).
        trust_env=False,
        follow_redirects=False,
        headers={"User-Agent": f"drainctl/{__version__}"},
    )
    return client, backend


def _attempt(
    client: httpx.Client,
    backend: DeadlineBackend | None,
    method: str,
    url: str,
    budget: float,
    clock: Callable[[], float],
) -> tuple[int | None, str | None, bool]:
    """One request, ended by `budget` end to end: (status, error, worth retrying)."""
    until = clock() + budget
    if backend is not None:
        backend.until = time.monotonic() + budget  # the backend's own clock, the real one
    try:
        # `Connection: close`: our own connection to the app's port counts among the connections
        # the drain waits for, so ask the app to end it as soon as it has answered.
        request = client.build_request(
            method.upper(), url, timeout=budget, headers={"Connection": "close"}
        )
        response = client.send(request, stream=True, follow_redirects=False)
    except Exception as exc:
        error, retry = _describe(exc)
        return None, error, retry
    try:
        # Read (and drop) the body: closing with unread data would send the app a RST. A body
        # error after the status line does not change the outcome.
        _read_capped(response, clock=clock, until=until)
    except Exception:
        pass
    finally:
        response.close()
    return response.status_code, None, response.status_code >= 500


def _read_capped(
    response: httpx.Response, *, clock: Callable[[], float], until: float | None
) -> bool:
    """Read the raw body up to _BODY_CAP and (if given) until `until`; True if it was all read.

    Iterates `response.stream` rather than `iter_raw()`, which closes the response at the end:
    httpcore would then hand the connection back to its pool, and close it if the server already
    has, before the probe could look at it. httpx's timeouts bound each read, not the whole
    body, hence the clock check between chunks.
    """
    import httpx

    stream = response.stream
    if not isinstance(stream, httpx.SyncByteStream):
        return False
    size = 0
    for chunk in stream:
        size += len(chunk)
        if size > _BODY_CAP or (until is not None and clock() >= until):
            return False
    return True


def _response_closes(http_version: str, connection_headers: list[str]) -> bool:
    """RFC 9112 section 9.3: does this response end the connection?"""
    tokens = {
        token.strip().lower()
        for header in connection_headers
        for token in header.split(",")
        if token.strip()
    }
    if "close" in tokens:
        return True
    # HTTP/1.0 is not persistent unless it says `keep-alive`.
    return http_version.upper() == "HTTP/1.0" and "keep-alive" not in tokens


def _server_closed(network_stream: object) -> bool:
    """Whether the server closed the probe's socket right after its response.

    Peeks at the socket httpcore exposes through the `network_stream` response extension; a
    transport without one (httpx.MockTransport) reports False.
    """
    get_extra_info = getattr(network_stream, "get_extra_info", None)
    sock = get_extra_info("socket") if callable(get_extra_info) else None
    if not isinstance(sock, socket.socket):
        return False
    try:
        readable, _, _ = select.select([sock], [], [], _PROBE_CLOSE_WAIT_S)
        if not readable:
            return False
        # MSG_PEEK leaves any bytes for httpcore; b"" is the server's FIN.
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (OSError, ValueError):
        return False


def _describe(exc: BaseException) -> tuple[str, bool]:
    """A short name for an httpx failure, and whether another attempt may fare better."""
    import ssl

    import httpx

    if isinstance(exc, httpx.TimeoutException):
        return "timeout", True
    # httpx wraps httpcore's exception, which wraps the OSError: walk the chain to the cause.
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            # Certificate or protocol mismatch: configuration, the same on every attempt.
            return _short(cause, prefix="tls"), False
        if isinstance(cause, ConnectionRefusedError):
            return "refused", True
        if isinstance(cause, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
            return "reset", True
        if isinstance(cause, socket.gaierror):
            # Not retried: a name that does not resolve is a configuration error in practice
            # (the down URL is normally loopback), and retries would only eat the budget.
            return "dns", False
        if isinstance(cause, TimeoutError):
            return "timeout", True
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.RemoteProtocolError) and "disconnected" in str(exc).lower():
        return "closed", True  # accepted and closed without an answer: like a reset
    if isinstance(exc, httpx.NetworkError):
        return _short(exc), True  # other connection-level errors (unreachable...): transient
    return _short(exc), False


def _scrub(text: str, url: str) -> str:
    """`text` with `url` (as an error message may quote it) shown redacted."""
    return text.replace(url, redact_url(url)) if url and url in text else text


def _short(exc: BaseException, prefix: str | None = None) -> str:
    """A one-line description of an unexpected error."""
    text = " ".join(str(exc).split())
    name = prefix or type(exc).__name__
    line = f"{name}: {text}" if text else name
    return line if len(line) <= _ERROR_MAX_CHARS else line[: _ERROR_MAX_CHARS - 3] + "..."


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)
