"""The control channel's protocol: where it listens, who may talk, what is said (version 1).

The channel links `drainctl run` with `prestop` and `status` in the same container; server.py
serves it inside a host's loop, client.py is the other end.

Where it listens
    By default an *abstract* Unix socket (unix(7): a name in the network namespace, no file)
    named ``@drainctl-mnt-<inode of /proc/self/ns/mnt>``:
    - no file means it works with a read-only root filesystem and without a writable /tmp;
    - the containers of one pod share the network namespace, hence the abstract names, but each
      has its own mount namespace: the inode in the name keeps two drainctl supervisors of one
      pod apart;
    - `kubectl exec` and the kubelet's exec hook enter the container's mount namespace (runc
      exec joins all of them), so `prestop` computes the same name without any configuration.
    When /proc cannot be read the name uses the root directory's device and inode instead
    (``@drainctl-root-<dev>-<ino>``; a container's root filesystem is its own mount).
    ``--control-socket PATH`` listens on a filesystem socket instead (mode 0600; a stale file is
    replaced), ``--control-socket @NAME`` on another abstract name.
    Two supervisors in one mount namespace (e.g. two `drainctl run` on one host) cannot share the
    default: the second warns at start-up and has no control channel unless given its own.

Who may talk
    Only a peer whose uid (SO_PEERCRED, unix(7)) is root or the supervisor's own uid; anyone else
    gets one error line and is logged as `control.refused`. The client, whatever its uid, talks
    only to a server it would have started: one running as root, as the client's uid, or PID 1 of
    the client's PID namespace (client.trusted), so a process of another user squatting the
    abstract name cannot answer for the supervisor; the supervisor names such a holder in its
    start-up warning (listener_of).

The protocol (version 1): JSON lines
    One request per connection. Every message is one JSON object on one line (UTF-8, ending in
    ``\\n``); requests are at most 4096 bytes. Every reply carries ``"v": 1`` and a ``"type"``.

    ``{"v": 1, "op": "status"}``
        -> ``{"v": 1, "type": "status", ...}`` (the fields of `drainctl status --json`), close.
    ``{"v": 1, "op": "prestop"}``
        Starts the drain (trigger ``prestop``) or joins the one running, then
        -> ``{"v": 1, "type": "accepted", "started": bool, "trigger": str, "time_left_s": float}``
        -> ``{"v": 1, "type": "event", "event": {...}}`` for each event of the drain: first those
           already logged (the story so far, `connections` condensed to the latest), then live
        -> ``{"v": 1, "type": "result", "reason": str, "count": int | null, "elapsed_s": float,
           "code": 0 | 1}`` once the drain has finished (at once if it already had), close.
    Any request the server cannot serve
        -> ``{"v": 1, "type": "error", "error": "..."}``, close.
    Compatibility: fields and message types may be added; clients ignore the ones they do not
    know. A server answers a request with an unknown ``"v"`` or ``"op"`` with an error; an
    incompatible change would increase ``v``.

The server never blocks the supervisor's loop: the listening socket and every client socket are
non-blocking and watched by the loop's selector; output is buffered per client and sent as the
socket takes it. A client is dropped when its request is not complete within 5 s (silent or slow),
is longer than 4096 bytes or is not a request (garbage), when it leaves more than 256 KiB of
output unread, or when 32 clients are already connected (``"busy": true`` in its error: clients
retry). Whatever bytes come in, the answer is an error line or a close (server.parse_request never
raises); whatever comes back, a client ends with a ControlError or TimeoutError (client.py).
"""

from __future__ import annotations

import json
import os
import socket
import struct

TYPE_CHECKING = False  # no typing at run time: PID 1's start-up (drain/machine.py)
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "CLOSE_TIMEOUT",
    "MAX_CLIENTS",
    "MAX_REQUEST",
    "MAX_UNREAD",
    "PROTOCOL_VERSION",
    "REQUEST_TIMEOUT",
    "ControlError",
    "NoServer",
    "Peer",
    "default_address",
    "encode",
    "listener_of",
    "peer_of",
    "resolve_address",
    "sockaddr",
]

PROTOCOL_VERSION = 1

MAX_REQUEST = 4096  # bytes, newline included
REQUEST_TIMEOUT = 5.0  # seconds from accept to a complete request
MAX_CLIENTS = 32
MAX_UNREAD = 256 * 1024  # output a client may leave unread before it is dropped
CLOSE_TIMEOUT = 2.0  # a closing client's last lines get this long to leave

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid (socket(7), SO_PEERCRED)


class ControlError(Exception):
    """The channel exists but did not serve us (refused, protocol error, lost)."""


class NoServer(ControlError):
    """Nothing listens at the address: no supervisor (or one that is gone)."""


# ---- addresses ----------------------------------------------------------------------------------


def default_address(mnt_ns: str = "/proc/self/ns/mnt") -> str:
    """The per-container default (see the module docstring). `mnt_ns`: for tests and `check`."""
    try:
        return f"@drainctl-mnt-{os.stat(mnt_ns).st_ino}"
    except OSError:
        root = os.stat("/")
        return f"@drainctl-root-{root.st_dev:x}-{root.st_ino}"


def resolve_address(configured: str | None) -> str:
    return configured if configured else default_address()


def sockaddr(address: str) -> str | bytes:
    if address.startswith("@"):
        return b"\0" + address[1:].encode()  # the leading NUL makes it abstract (unix(7))
    return address


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return Peer(pid, uid, gid)


def listener_of(address: str) -> Peer | None:
    """Who listens at `address` (its credentials as of listen(2)), without blocking; None when
    nothing answers or it cannot be told (a full accept queue)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setblocking(False)
        sock.connect(sockaddr(address))
        return peer_of(sock)
    except OSError:
        return None
    finally:
        sock.close()


class Peer:
    __slots__ = ("gid", "pid", "uid")

    def __init__(self, pid: int, uid: int, gid: int) -> None:
        self.pid = pid
        self.uid = uid
        self.gid = gid

    def __repr__(self) -> str:
        return f"Peer(pid={self.pid}, uid={self.uid}, gid={self.gid})"


def encode(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, separators=(",", ":"), default=str) + "\n").encode()
