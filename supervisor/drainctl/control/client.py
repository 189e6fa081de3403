"""The control channel's client: one request to a server, blocking, with deadlines.

It runs in `prestop`, `status` and `check`, never in PID 1. It trusts a server only if it runs
as root or as the client's own uid (unless the client is root), like the server trusts clients
(docs/control.md).
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
    encode,
    peer_of,
    resolve_address,
    sockaddr,
)

# What a command needs to talk to a supervisor, in one place.
__all__ = ["Client", "ControlError", "NoServer", "request_status", "resolve_address"]

_CONNECT_RETRY = 0.02
_CLIENT_LINE_MAX = 1024 * 1024  # the client's guard against a runaway server line


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
        except OSError as exc:
            self.sock.close()
            raise ControlError(f"cannot connect to {address}: {exc.strerror or exc}") from exc
        try:
            peer = peer_of(self.sock)
        except OSError as exc:
            self.sock.close()
            raise ControlError(f"{address}: cannot identify the server: {exc}") from exc
        me = os.geteuid()
        if peer.uid not in (0, me) and me != 0:
            self.sock.close()
            raise ControlError(f"{address} is served by uid {peer.uid}, not by root or uid {me}: "
                               "not talking to it")

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
        """The server's messages until it closes; `timeout()` bounds each wait (None: none).

        Raises TimeoutError when a wait runs out, ControlError on a broken message.
        """
        while True:
            line, newline, rest = bytes(self._buf).partition(b"\n")
            if newline:
                self._buf[:] = rest
                try:
                    message = json.loads(line)
                except ValueError as exc:
                    raise ControlError(f"{self.address}: not a JSON line: {line[:80]!r}") from exc
                if isinstance(message, dict):
                    yield message
                continue
            if len(self._buf) > _CLIENT_LINE_MAX:
                raise ControlError(f"{self.address}: a line longer than {_CLIENT_LINE_MAX} bytes")
            self.sock.settimeout(timeout())
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise
            except OSError as exc:
                raise ControlError(f"{self.address}: {exc.strerror or exc}") from exc
            if not data:
                if self._send_error is not None:
                    raise ControlError(f"{self.address}: sending the request: "
                                       f"{self._send_error.strerror or self._send_error}")
                return
            self._buf += data


def request_status(address: str, timeout: float = 5.0) -> dict[str, Any]:
    """Ask for the status. Raises NoServer, ControlError, or TimeoutError."""
    deadline = time.monotonic() + timeout
    with Client(address, timeout=min(timeout, 2.0)) as client:
        client.send("status")
        for message in client.messages(lambda: max(0.001, deadline - time.monotonic())):
            kind = message.get("type")
            if kind == "status":
                return message
            if kind == "error":
                raise ControlError(f"{address}: {message.get('error')}")
    raise ControlError(f"{address}: the server closed without answering")
