"""The control channel between `drainctl run` and `prestop` / `status` in the same container.

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
    gets one error line and is logged as `control.refused`. The client checks the server the same
    way (it must run as root or as the client's uid, unless the client is root), so a process of
    another user squatting the abstract name cannot answer for the supervisor.

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
output unread, or when 32 clients are already connected.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import socket
import stat
import struct
import time

TYPE_CHECKING = False  # no typing or dataclasses at run time: PID 1's start-up (see drain.py)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

    from drainctl.config import Config
    from drainctl.connections import Counts
    from drainctl.drain import Drain, Runner
    from drainctl.events import Events
    from drainctl.supervise import Supervisor

__all__ = [
    "PROTOCOL_VERSION",
    "Client",
    "ControlError",
    "NoServer",
    "Peer",
    "Server",
    "Target",
    "connections_json",
    "default_address",
    "exit_code",
    "request_status",
    "resolve_address",
    "serve_supervisor",
    "status_fields",
    "supervisor_target",
]

PROTOCOL_VERSION = 1

MAX_REQUEST = 4096  # bytes, newline included
REQUEST_TIMEOUT = 5.0  # seconds from accept to a complete request
MAX_CLIENTS = 32
MAX_UNREAD = 256 * 1024  # output a client may leave unread before it is dropped
CLOSE_TIMEOUT = 2.0  # a closing client's last lines get this long to leave
_FLUSH_POLL = 0.05  # how soon to retry sending while output is pending (no write-readiness)
_ACCEPT_BATCH = 16  # connections accepted per wake-up, so a flood cannot starve the loop
# Connections the kernel queues before we accept them. A unix stream connect() to a full queue
# fails at once with EAGAIN when the client has a timeout (unix(7)): room for a burst.
_LISTEN_BACKLOG = 128
_CONNECT_RETRY = 0.02
_BACKLOG_MAX = 200  # events kept for replay to a prestop that joins late
_REFUSED_LOG_INTERVAL = 1.0  # at most one control.refused event per second
_CLIENT_LINE_MAX = 1024 * 1024  # the client's guard against a runaway server line

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


def _sockaddr(address: str) -> str | bytes:
    if address.startswith("@"):
        return b"\0" + address[1:].encode()  # the leading NUL makes it abstract (unix(7))
    return address


def _peer(sock: socket.socket) -> Peer:
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return Peer(pid, uid, gid)


class Peer:
    __slots__ = ("gid", "pid", "uid")

    def __init__(self, pid: int, uid: int, gid: int) -> None:
        self.pid = pid
        self.uid = uid
        self.gid = gid

    def __repr__(self) -> str:
        return f"Peer(pid={self.pid}, uid={self.uid}, gid={self.gid})"


def _encode(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, separators=(",", ":"), default=str) + "\n").encode()


def exit_code(reason: str) -> int:
    """prestop's exit code for a drain's reason: 1 only when the deadline left connections."""
    return 1 if reason == "timeout" else 0


# ---- what the server serves ---------------------------------------------------------------------


class Target:
    """One drain and what surrounds it: a supervisor's, or a standalone prestop's."""

    __slots__ = ("app_gone", "app_pid", "clock", "config", "drain", "mode", "runner",
                 "started_at", "state")

    def __init__(
        self,
        *,
        drain: Drain,
        config: Config,
        runner: Runner,  # for the status count, off the loop
        clock: Callable[[], float],
        started_at: float,
        mode: str,  # "supervisor" or "standalone"
        state: Callable[[], str],
        app_pid: Callable[[], int | None],
        app_gone: Callable[[], bool],
    ) -> None:
        self.drain = drain
        self.config = config
        self.runner = runner
        self.clock = clock
        self.started_at = started_at
        self.mode = mode
        self.state = state
        self.app_pid = app_pid
        self.app_gone = app_gone


def supervisor_target(supervisor: Supervisor) -> Target:
    drain, child = supervisor.drain, supervisor.child
    assert drain is not None and child is not None
    return Target(
        drain=drain,
        config=supervisor.config,
        runner=drain.seams.runner,
        clock=supervisor.clock,
        started_at=supervisor.started_at,
        mode="supervisor",
        state=supervisor.state,
        app_pid=lambda: child.pid,
        app_gone=lambda: supervisor.main_status is not None,
    )


def status_fields(target: Target, counts: Counts | Exception | None) -> dict[str, Any]:
    """The status reply (also `drainctl status --json`)."""
    drain = target.drain
    now = target.clock()
    fields: dict[str, Any] = {
        "mode": target.mode,
        "state": target.state(),
        "phase": drain.phase.value,
        "pid": target.app_pid(),
        "supervisor_pid": os.getpid(),
        "uptime_s": round(now - target.started_at, 3),
        "trigger": drain.record.trigger,
        "drain_elapsed_s": None if drain.t0 is None else round(now - drain.t0, 3),
        "time_left_s": None,
        "outcome": None,
        "ports": None,
        "connections": None,
        "established": None,
    }
    # By value, not Phase: the client side (prestop's join, status) never imports drain.py.
    if drain.draining or drain.phase.value == "await-sigterm":
        left = drain.time_left()
        fields["time_left_s"] = None if left is None else round(left, 3)
    if drain.outcome is not None:
        outcome = drain.outcome
        fields["outcome"] = {"reason": outcome.reason, "count": outcome.count,
                             "elapsed_s": outcome.elapsed_s}
    if isinstance(counts, Exception):
        fields["error"] = f"counting connections: {counts}"
    elif counts is not None:
        fields["ports"] = sorted(counts.ports)
        fields["connections"] = connections_json(counts, target.config.idle_grace is not None)
        fields["established"] = counts.established
    return fields


def connections_json(counts: Counts, with_idle: bool = False) -> dict[str, dict[str, int]]:
    """Per port, port numbers as strings (CONTRACT: `connections --json`)."""
    out: dict[str, dict[str, int]] = {}
    for port in sorted(counts.ports):
        each = counts.ports[port]
        entry = {"established": each.established, "close_wait": each.close_wait,
                 "other": each.other}
        if with_idle:
            entry["idle"] = each.idle
        out[str(port)] = entry
    return out


# ---- the server ---------------------------------------------------------------------------------


class _Conn:
    """One client: its socket, what it sent, what waits to be sent, where it stands."""

    __slots__ = ("closed", "deadline", "fd", "inbuf", "outbuf", "peer", "sock", "state")

    def __init__(self, sock: socket.socket, peer: Peer, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.deadline = deadline  # request deadline, then close deadline
        # request -> (waiting: a status count is running | streaming: prestop) -> closing
        self.state = "request"
        self.closed = False


class Server:
    """The non-blocking server, driven by its host's loop.

    `register(fd, callback)` / `unregister(fd)` hook sockets into the host's selector; the host
    calls `tick()` after every wake-up and includes `next_wakeup()` in its select timeout.
    Everything runs in the host loop's thread (events are emitted there too).
    """

    def __init__(
        self,
        sock: socket.socket,
        address: str,
        target: Target,
        events: Events,
        register: Callable[[int, Callable[[], None]], None],
        unregister: Callable[[int], None],
    ) -> None:
        self.sock = sock
        self.address = address
        self.target = target
        self.events = events
        self._register = register
        self._unregister = unregister
        self._clock = target.clock
        self._conns: dict[int, _Conn] = {}
        self._backlog: list[dict[str, Any]] | None = None  # None: no drain yet
        self._refused_logged_at: float | None = None
        self._refused_unlogged = 0
        self._path_ino: int | None = None
        self._uid = os.geteuid()
        if not address.startswith("@"):
            self._path_ino = os.stat(address).st_ino
        sock.setblocking(False)
        register(sock.fileno(), self._accept)
        events.subscribe(self._on_event)
        if target.drain.t0 is not None:
            self._backlog = []  # opened mid-drain: the story starts here

    @classmethod
    def open(
        cls,
        address: str,
        target: Target,
        events: Events,
        register: Callable[[int, Callable[[], None]], None],
        unregister: Callable[[int], None],
    ) -> Server:
        """Bind and listen. Raises OSError (EADDRINUSE when another server answers there)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if not address.startswith("@"):
                _clear_stale(address)
            sock.bind(_sockaddr(address))
            if not address.startswith("@"):
                os.chmod(address, 0o600)  # SO_PEERCRED decides; the mode is a second fence
            sock.listen(_LISTEN_BACKLOG)
        except OSError:
            sock.close()
            raise
        return cls(sock, address, target, events, register, unregister)

    def close(self) -> None:
        """Send what can leave without waiting, then close everything."""
        self.events.unsubscribe(self._on_event)
        for conn in list(self._conns.values()):
            if conn.state == "streaming":
                self._send_result(conn)
            self._flush(conn)
            self._drop(conn)
        try:
            self._unregister(self.sock.fileno())
        except (KeyError, ValueError):
            pass
        self.sock.close()
        if self._path_ino is not None:
            try:
                if os.stat(self.address).st_ino == self._path_ino:
                    os.unlink(self.address)
            except OSError:
                pass

    # ---- the loop's side ----------------------------------------------------------------------

    def next_wakeup(self) -> float | None:
        times = [c.deadline for c in self._conns.values() if c.state in ("request", "closing")]
        if any(c.outbuf for c in self._conns.values()):
            times.append(self._clock() + _FLUSH_POLL)
        return min(times) if times else None

    def tick(self) -> None:
        now = self._clock()
        drain = self.target.drain
        for conn in list(self._conns.values()):
            if conn.state == "streaming" and drain.outcome is not None:
                self._send_result(conn)
            if conn.state in ("request", "closing") and now >= conn.deadline:
                self._drop(conn)  # silent, slow, or not reading its last lines
                continue
            self._flush(conn)

    @property
    def clients(self) -> int:
        return len(self._conns)

    # ---- accepting ----------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return  # out of descriptors: the client waits in the backlog, we go on
                raise
            sock.setblocking(False)
            try:
                peer = _peer(sock)
            except OSError:
                sock.close()
                continue
            if peer.uid not in (0, self._uid):
                self._refuse(sock, peer)
                continue
            if len(self._conns) >= MAX_CLIENTS:
                _send_now(sock, {"v": PROTOCOL_VERSION, "type": "error",
                                 "error": f"busy: {MAX_CLIENTS} clients already connected"})
                sock.close()
                continue
            conn = _Conn(sock, peer, self._clock() + REQUEST_TIMEOUT)
            self._conns[conn.fd] = conn
            self._register(conn.fd, functools.partial(self._readable, conn))

    def _refuse(self, sock: socket.socket, peer: Peer) -> None:
        _send_now(sock, {"v": PROTOCOL_VERSION, "type": "error",
                         "error": f"refused: uid {peer.uid} may not use this supervisor "
                                  f"(only uid {self._uid} or root)"})
        sock.close()
        now = self._clock()
        if self._refused_logged_at is None or now - self._refused_logged_at >= (
            _REFUSED_LOG_INTERVAL
        ):
            fields: dict[str, Any] = {"uid": peer.uid, "pid": peer.pid}
            if self._refused_unlogged:
                fields["more"] = self._refused_unlogged
            self._refused_logged_at, self._refused_unlogged = now, 0
            self.events.emit("control.refused", **fields)
        else:
            self._refused_unlogged += 1

    # ---- reading ------------------------------------------------------------------------------

    def _readable(self, conn: _Conn) -> None:
        if conn.closed:
            return  # its fd number was reused in the same wake-up
        try:
            data = conn.sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:
            self._drop(conn)  # the client left (a prestop killed by the kubelet, ^C...)
            return
        if conn.state != "request":
            return  # one request per connection: anything more is ignored
        conn.inbuf += data
        line, newline, _rest = bytes(conn.inbuf).partition(b"\n")
        if not newline:
            if len(conn.inbuf) >= MAX_REQUEST:
                self._error(conn, f"request longer than {MAX_REQUEST} bytes")
            return
        self._handle(conn, line)

    def _handle(self, conn: _Conn, line: bytes) -> None:
        try:
            request = json.loads(line)
        except ValueError:
            self._error(conn, "not a JSON request")
            return
        if not isinstance(request, dict):
            self._error(conn, "not a JSON object")
            return
        if request.get("v") != PROTOCOL_VERSION:
            self._error(conn, f"unsupported protocol version {request.get('v')!r} "
                              f"(this is drainctl protocol {PROTOCOL_VERSION})")
            return
        op = request.get("op")
        if op == "status":
            self._status(conn)
        elif op == "prestop":
            self._prestop(conn)
        else:
            self._error(conn, f"unknown op {op!r} (status, prestop)")

    # ---- serving ------------------------------------------------------------------------------

    def _status(self, conn: _Conn) -> None:
        target = self.target
        drain = target.drain
        ports = drain.ports
        lookup, count = drain.seams.lookup_ports, drain.seams.count
        grace = target.config.idle_grace
        conn.state = "waiting"

        def work() -> Counts:
            # Off the loop: a port lookup walks /proc and a count may see many sockets.
            from drainctl.discovery import ports_of

            return count(ports if ports is not None else ports_of(lookup()), grace)

        def done(result: Counts | Exception) -> None:
            if conn.closed:
                return
            self._reply(conn, {"type": "status", **status_fields(target, result)})

        target.runner.submit(work, done)

    def _prestop(self, conn: _Conn) -> None:
        target = self.target
        drain = target.drain
        if drain.t0 is None and target.app_gone():
            # The app is gone and no drain ever ran: there is nothing left to drain.
            self._send(conn, {"type": "accepted", "started": False, "trigger": None,
                              "time_left_s": 0.0})
            self._reply(conn, {"type": "result", "reason": "child-exited", "count": 0,
                               "elapsed_s": 0.0, "code": 0})
            return
        joined = drain.t0 is not None
        self.events.emit("prestop.received", pid=conn.peer.pid, joined=joined)
        if not joined:
            drain.start("prestop")
        left = drain.time_left()
        self._send(conn, {"type": "accepted", "started": not joined,
                          "trigger": drain.record.trigger,
                          "time_left_s": None if left is None else round(left, 3)})
        for record in self._backlog or []:
            self._send(conn, {"type": "event", "event": record})
        conn.state = "streaming"
        if drain.outcome is not None:
            self._send_result(conn)
        self._flush(conn)

    def _send_result(self, conn: _Conn) -> None:
        outcome = self.target.drain.outcome
        if outcome is None:
            self._error(conn, "the drain did not finish (the supervisor is exiting)")
            return
        self._reply(conn, {"type": "result", "reason": outcome.reason, "count": outcome.count,
                           "elapsed_s": outcome.elapsed_s, "code": exit_code(outcome.reason)})

    def _on_event(self, record: dict[str, Any]) -> None:
        """Every logged event: remembered once a drain has started, streamed to prestops."""
        if record.get("event") == "drain.started":
            self._backlog = []
        if self._backlog is None:
            return
        backlog = self._backlog
        if record.get("event") == "connections" and backlog and (
            backlog[-1].get("event") == "connections"
        ):
            backlog[-1] = record  # a late joiner needs the latest count, not every one
        else:
            if len(backlog) >= _BACKLOG_MAX:
                del backlog[1]  # keep drain.started, lose the oldest after it
            backlog.append(record)
        for conn in list(self._conns.values()):
            if conn.state == "streaming":
                self._send(conn, {"type": "event", "event": record}, flush=False)

    # ---- writing ------------------------------------------------------------------------------

    def _error(self, conn: _Conn, message: str) -> None:
        self._reply(conn, {"type": "error", "error": message})

    def _reply(self, conn: _Conn, message: dict[str, Any]) -> None:
        """The last message: send it, then close once it has left (or CLOSE_TIMEOUT passed)."""
        self._send(conn, message)
        conn.state = "closing"
        conn.deadline = self._clock() + CLOSE_TIMEOUT
        if not conn.outbuf and not conn.closed:
            self._drop(conn)

    def _send(self, conn: _Conn, message: dict[str, Any], flush: bool = True) -> None:
        if conn.closed:
            return
        conn.outbuf += _encode({"v": PROTOCOL_VERSION, **message})
        if len(conn.outbuf) > MAX_UNREAD:
            self._drop(conn)  # it stopped reading
        elif flush:
            self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        while conn.outbuf and not conn.closed:
            try:
                sent = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(conn)  # EPIPE, ECONNRESET: it left
                return
            del conn.outbuf[:sent]
        if conn.state == "closing" and not conn.outbuf and not conn.closed:
            self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.pop(conn.fd, None)
        try:
            self._unregister(conn.fd)
        except (KeyError, ValueError):
            pass
        conn.sock.close()


def _send_now(sock: socket.socket, message: dict[str, Any]) -> None:
    """One line to a client we are about to close, if its buffer takes it at once."""
    try:
        sock.send(_encode(message))
    except OSError:
        pass


def _clear_stale(path: str) -> None:
    """Remove a socket file left by a previous run; refuse one a live server answers on."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody answers: stale
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another drainctl already listens on {path}")


# ---- the client ---------------------------------------------------------------------------------


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
            peer = _peer(self.sock)
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
                self.sock.connect(_sockaddr(address))
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
            self.sock.sendall(_encode({"v": PROTOCOL_VERSION, "op": op, **fields}))
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


def serve_supervisor(supervisor: Supervisor) -> Server | None:
    """Open `drainctl run`'s server; on failure warn and go on without one (the app matters)."""
    address = resolve_address(supervisor.config.control_socket)
    try:
        return Server.open(address, supervisor_target(supervisor), supervisor.events,
                           supervisor.register, supervisor.unregister)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            why = ("another drainctl already listens there (two supervisors in one mount "
                   "namespace?): give this one its own --control-socket")
        else:
            why = exc.strerror or str(exc)
        supervisor.events.emit("warning", message=f"control socket {address}: {why}; "
                               "prestop and status cannot reach this supervisor")
        return None
