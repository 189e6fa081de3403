"""The control channel's client: one request to a server, blocking, with deadlines.

It runs in `prestop`, `status` and `check`, never in PID 1. It talks only to a server it would
have started itself (docs/control.md, "Who may talk"): one running as root, as the client's own
uid, or PID 1 of the client's PID namespace (the container's entrypoint). Anything the server
sends is checked before use: a broken or hostile reply ends in a ControlError, never a crash.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from drainctl.control.protocol import (
    PROTOCOL_VERSION,
    ControlError,
    NoServer,
    Peer,
    encode,
    peer_of,
    resolve_address,
    sockaddr,
)

# What a command needs to talk to a supervisor, in one place.
__all__ = [
    "Busy",
    "Client",
    "ControlError",
    "NoServer",
    "Untrusted",
    "request_status",
    "resolve_address",
    "trusted",
]

_CONNECT_RETRY = 0.02
_CLIENT_LINE_MAX = 1024 * 1024  # the client's guard against a runaway server line
_RECV_WAIT_MAX = 60.0  # one recv() waits at most this long (settimeout takes no huge values)
BUSY_RETRY = 0.1  # a busy server (all its client slots taken) is asked again after this long


class Untrusted(ControlError):
    """Something listens at the address that we would not have started: not a supervisor."""

    def __init__(self, address: str, peer: Peer) -> None:
        where = f"pid {peer.pid}" if peer.pid else "a pid outside this PID namespace"
        super().__init__(
            f"{address} is held by uid {peer.uid} ({where}), which is neither root, nor uid "
            f"{os.geteuid()}, nor PID 1 here: not a drainctl this container started; not "
            "talking to it")
        self.peer = peer


class Busy(ControlError):
    """The server has as many clients as it takes: try again shortly."""


def trusted(peer: Peer) -> bool:
    """The rule of docs/control.md, "Who may talk": root, our own uid, or PID 1 of our PID
    namespace (SO_PEERCRED gives the pid as our namespace sees it; 0 when it cannot)."""
    return peer.uid == 0 or peer.uid == os.geteuid() or peer.pid == 1


class Client:
    """One request to a server; blocking, with deadlines (it runs in prestop/status)."""

    def __init__(self, address: str, timeout: float = 2.0) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        self._buf = bytearray()
        self._send_error: OSError | None = None
        try:
            self._connect(address, timeout)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self.sock.close()
            raise NoServer(f"no drainctl supervisor answers at {address}") from exc
        except BlockingIOError as exc:
            self.sock.close()  # its listen queue stayed full for our whole timeout
            raise Busy(f"{address}: busy: its queue of waiting clients is full") from exc
        except OSError as exc:
            self.sock.close()
            raise ControlError(f"cannot connect to {address}: {exc.strerror or exc}") from exc
        try:
            peer = peer_of(self.sock)
        except OSError as exc:
            self.sock.close()
            raise ControlError(f"{address}: cannot identify the server: {exc}") from exc
        self.peer = peer
        if not trusted(peer):
            self.sock.close()
            raise Untrusted(address, peer)

    def _connect(self, address: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(sockaddr(address))
                return
            except BlockingIOError:
                # The server's accept queue is full (a burst of clients): it drains quickly.
                if time.monotonic() >= deadline:
                    raise
                time.sleep(_CONNECT_RETRY)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, op: str, **fields: Any) -> None:
        try:
            self.sock.sendall(encode({"v": PROTOCOL_VERSION, "op": op, **fields}))
        except (BrokenPipeError, ConnectionResetError) as exc:
            # The server may have answered and closed before reading us (a refusal): its
            # answer is still in our receive queue, so read it before reporting this.
            self._send_error = exc
        except OSError as exc:
            raise ControlError(f"{self.address}: sending the request: {exc}") from exc

    def messages(self, timeout: Callable[[], float | None]) -> Iterator[dict[str, Any]]:
        """The server's messages until it closes; `timeout()` is the time left (None: no limit).

        Raises TimeoutError when the time is up, even while the server keeps talking, and
        ControlError on a broken message (not JSON, nested too deep, a line past
        _CLIENT_LINE_MAX). Lines that are JSON but not objects are skipped.
        """
        while True:
            left = timeout()
            if left is not None and not left > 0:  # NaN too
                raise TimeoutError
            line, newline, rest = bytes(self._buf).partition(b"\n")
            if newline:
                self._buf[:] = rest
                try:
                    message = json.loads(line)
                except (ValueError, RecursionError) as exc:
                    raise ControlError(f"{self.address}: not a JSON line: {line[:80]!r}") from exc
                if isinstance(message, dict):
                    yield message
                continue
            if len(self._buf) > _CLIENT_LINE_MAX:
                raise ControlError(f"{self.address}: a line longer than {_CLIENT_LINE_MAX} bytes")
            try:
                self.sock.settimeout(None if left is None else min(left, _RECV_WAIT_MAX))
                data = self.sock.recv(65536)
            except TimeoutError:
                continue  # the loop's check above says whether the time is up
            except OSError as exc:
                raise ControlError(f"{self.address}: {exc.strerror or exc}") from exc
            if not data:
                if self._send_error is not None:
                    raise ControlError(f"{self.address}: sending the request: "
                                       f"{self._send_error.strerror or self._send_error}")
                if self._buf:
                    raise ControlError(f"{self.address}: the server closed in the middle of a "
                                       "line")
                return
            self._buf += data


def error_of(message: dict[str, Any], address: str) -> ControlError:
    """The exception for an `error` message: Busy when the server said it is full."""
    text = message.get("error")
    text = text if isinstance(text, str) else repr(text)
    text = text[:300]  # whatever the server sends, one line of it
    text = " ".join(text.split())
    if message.get("busy") is True or text.startswith("busy"):
        return Busy(f"{address}: {text}")
    return ControlError(f"{address}: {text}")


def request_status(address: str, timeout: float = 5.0) -> dict[str, Any]:
    """Ask for the status; a busy server is asked again until `timeout`.

    Raises NoServer, ControlError (Untrusted, Busy...), or TimeoutError.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _status_once(address, deadline)
        except Busy:
            if time.monotonic() + BUSY_RETRY >= deadline:
                raise
            time.sleep(BUSY_RETRY)


def _status_once(address: str, deadline: float) -> dict[str, Any]:
    with Client(address, timeout=max(0.001, min(deadline - time.monotonic(), 2.0))) as client:
        client.send("status")
        for message in client.messages(lambda: deadline - time.monotonic()):
            kind = message.get("type")
            if kind == "status":
                return message
            if kind == "error":
                raise error_of(message, address)
    raise ControlError(f"{address}: the server closed without answering")
