"""An httpx transport whose every request ends by a hard deadline, whatever the server does.

httpx's timeouts bound each socket operation, not a request: a server that sends its status line
one byte every 200 ms never trips a 1 s read timeout, and holds the down call as long as it likes.
And `socket.getaddrinfo`, which httpcore calls to connect, takes no timeout at all: a DNS server
that does not answer holds it for the resolver's own timeouts (resolv.conf(5): 5 s per try).
The drain cannot afford either (README, "Reliability").

So this module gives httpcore a network backend of its own (httpcore's documented extension
point, `httpcore.NetworkBackend`) with one deadline, on `time.monotonic`, for everything an
attempt does on the network:

- name resolution runs in a daemon thread and is waited for until the deadline only; an IP
  literal is not resolved at all. A resolver thread still stuck in getaddrinfo after the
  deadline holds no socket and no lock of ours, and ends when the resolver gives up;
- connect, the TLS handshake (non-blocking, driven by select), every read and every write get the
  time left until the deadline as their socket timeout, never more; past it, they raise
  httpcore's timeout exceptions, which httpx turns into `httpx.TimeoutException`.

Each socket operation thus ends at the deadline at the latest (CPython applies a socket timeout
to a whole `sendall` and a whole SSL read: socket(2)-level deadlines since Python 3.5), and
nothing is left behind: the socket is closed by the connection pool as usual.

Imported only when a down call or a probe is made (it imports httpx and httpcore).
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

__all__ = ["DeadlineBackend", "deadline_transport", "tls_context"]

_TLS_CONTEXT: list[ssl.SSLContext] = []  # built once per process: loading the CAs is slow

# Options as httpcore passes them to connect_tcp: (level, option, value).
SocketOption = (
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
)


class DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's sync backend, with one absolute deadline (`until`, on time.monotonic)."""

    def __init__(self) -> None:
        self.until: float | None = None  # set before each request; None: no deadline

    def left(self, timeout: float | None) -> float | None:
        """The timeout for the next operation: `timeout`, never past the deadline."""
        if self.until is None:
            return timeout
        left = self.until - time.monotonic()
        return left if timeout is None else min(timeout, left)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.NetworkStream:
        last: OSError | None = None
        for family, kind, proto, _, address in _resolve(host, port, self):
            left = self.left(timeout)
            if left is not None and left <= 0:
                break
            sock = socket.socket(family, kind, proto)
            try:
                for option in socket_options or ():
                    sock.setsockopt(*option)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if local_address is not None:
                    sock.bind((local_address, 0))
                sock.settimeout(left)
                sock.connect(address)
            except TimeoutError as exc:
                sock.close()
                raise httpcore.ConnectTimeout(str(exc) or "connect timed out") from exc
            except OSError as exc:
                sock.close()
                last = exc
                continue
            return DeadlineStream(sock, self)
        if last is not None:
            error = httpcore.ConnectError(str(last))
            # httpcore's pool re-raises `from None`, which drops the cause but keeps the
            # context: the caller finds the OSError there (refused, unreachable...).
            error.__context__ = last
            raise error from last
        raise httpcore.ConnectTimeout("connect timed out")

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not used by the down call")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class DeadlineStream(httpcore.NetworkStream):
    def __init__(self, sock: socket.socket, backend: DeadlineBackend) -> None:
        self._sock = sock
        self._backend = backend

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        left = self._backend.left(timeout)
        if left is not None and left <= 0:
            raise httpcore.ReadTimeout("deadline reached")
        try:
            self._sock.settimeout(left)
            return self._sock.recv(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc) or "read timed out") from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        left = self._backend.left(timeout)
        if left is not None and left <= 0:
            raise httpcore.WriteTimeout("deadline reached")
        try:
            self._sock.settimeout(left)
            self._sock.sendall(buffer)  # the timeout bounds the whole sendall
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc) or "write timed out") from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    def close(self) -> None:
        self._sock.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        """The handshake, non-blocking: a server that trickles its records cannot stretch it."""
        try:
            sock = ssl_context.wrap_socket(
                self._sock, server_hostname=server_hostname, do_handshake_on_connect=False
            )
        except Exception:
            self.close()
            raise
        try:
            sock.setblocking(False)
            while True:
                try:
                    sock.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    ready = _wait(sock, self._backend.left(timeout), write=False)
                except ssl.SSLWantWriteError:
                    ready = _wait(sock, self._backend.left(timeout), write=True)
                if not ready:
                    raise httpcore.ConnectTimeout("TLS handshake timed out")
        except httpcore.ConnectTimeout:
            sock.close()
            raise
        except OSError as exc:  # ssl.SSLError is an OSError
            sock.close()
            raise httpcore.ConnectError(str(exc)) from exc
        return DeadlineStream(sock, self._backend)

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object" and isinstance(self._sock, ssl.SSLSocket):
            return self._sock  # has selected_alpn_protocol(), which is all httpcore asks
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "socket":
            return self._sock
        if info == "is_readable":
            try:
                readable, _, _ = select.select([self._sock], [], [], 0)
            except (OSError, ValueError):
                return True
            return bool(readable)
        return None


def deadline_transport(backend: DeadlineBackend, *, https: bool) -> httpx.BaseTransport:
    """An httpx transport over `backend`: one connection, no proxy, no environment."""
    ssl_context = tls_context() if https else None
    pool = httpcore.ConnectionPool(
        ssl_context=ssl_context, max_connections=1, network_backend=backend
    )
    return _Transport(pool)


def tls_context() -> ssl.SSLContext:
    """What httpx uses with verify=True: the certifi bundle (a dependency of httpx); one per
    process, as loading it takes ~40-130 ms."""
    if not _TLS_CONTEXT:
        import certifi

        _TLS_CONTEXT.append(ssl.create_default_context(cafile=certifi.where()))
    return _TLS_CONTEXT[0]


class _Transport(httpx.HTTPTransport):
    """httpx's own transport (its request and exception mapping) over our connection pool.

    httpx.HTTPTransport takes no network backend, but does all its work through `_pool`; the
    down-call tests fail loudly if a future httpx changes that.
    """

    def __init__(self, pool: httpcore.ConnectionPool) -> None:  # no super(): no pool of its own
        self._pool = pool


def _wait(sock: socket.socket, left: float | None, *, write: bool) -> bool:
    if left is not None and left <= 0:
        return False
    if write:
        _, ready, _ = select.select([], [sock], [], left)
    else:
        ready, _, _ = select.select([sock], [], [], left)
    return bool(ready)


def _resolve(host: str, port: int, backend: DeadlineBackend) -> list[Any]:
    """getaddrinfo, bounded by the backend's deadline; an IP literal is not looked up."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        address = (host, port) if family == socket.AF_INET else (host, port, 0, 0)
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", address)]

    result: list[Any] = []
    failure: list[BaseException] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            result.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except BaseException as exc:  # reported to the caller, never lost
            failure.append(exc)
        finally:
            done.set()

    try:
        threading.Thread(target=lookup, name="drainctl-resolve", daemon=True).start()
    except RuntimeError as exc:  # no thread (the pids limit): an unbounded lookup is no option
        raise httpcore.ConnectError(f"cannot resolve {host}: no thread ({exc})") from exc
    left = backend.left(None)
    if not done.wait(None if left is None else max(0.0, left)):
        raise httpcore.ConnectTimeout(f"name resolution of {host} timed out")
    if failure:
        error = httpcore.ConnectError(str(failure[0]))
        error.__context__ = failure[0]  # as in connect_tcp: socket.gaierror is "dns"
        raise error from failure[0]
    return result
