"""The control channel's server, driven by its host's loop (protocol.py says what it speaks).

It never blocks the loop: the listening socket and every client socket are non-blocking and
watched by the loop's selector; output is buffered per client and sent as the socket takes it. A
client is dropped when its request is not complete within REQUEST_TIMEOUT (silent or slow), is
longer than MAX_REQUEST or is not a request (garbage), when it leaves more than MAX_UNREAD of
output unread, or when MAX_CLIENTS are already connected. It knows nothing of the supervisor: the
host hands it the drain and the loop (a Target).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import select
import socket
import stat

from drainctl.control.protocol import (
    CLOSE_TIMEOUT,
    MAX_CLIENTS,
    MAX_REQUEST,
    MAX_UNREAD,
    PROTOCOL_VERSION,
    REQUEST_TIMEOUT,
    Peer,
    encode,
    listener_of,
    peer_of,
    resolve_address,
    sockaddr,
)
from drainctl.control.render import connections_json

TYPE_CHECKING = False  # no typing at run time: PID 1's start-up (drain/machine.py)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from drainctl.drain.connections import Counts
    from drainctl.drain.machine import Drain
    from drainctl.events import Events
    from drainctl.pid1.loop import Loop

__all__ = ["Server", "Target", "parse_request", "serve", "status_reply"]

_FLUSH_POLL = 0.05  # how soon to retry sending while output is pending (no write-readiness)
_ACCEPT_BATCH = 16  # connections accepted per wake-up, so a flood cannot starve the loop
# Connections the kernel queues before we accept them. A unix stream connect() to a full queue
# fails at once with EAGAIN when the client has a timeout (unix(7)): room for a burst.
_LISTEN_BACKLOG = 128
_BACKLOG_MAX = 200  # events kept for replay to a prestop that joins late
_REFUSED_LOG_INTERVAL = 1.0  # at most one control.refused event per second
# Out of file descriptors (EMFILE) while accepting: the listening socket stays readable with the
# client still queued, so the loop would wake at once, again and again. Stop watching it this long.
_ACCEPT_PAUSE = 0.25
_ERRORS_LOGGED = 5  # unexpected exceptions logged as `error` events; the rest are counted


class Target:
    """What a server serves: one drain, and what status says around it."""

    __slots__ = ("app_pid", "drain", "mode", "started_at")

    def __init__(
        self, *, drain: Drain, mode: str, started_at: float, app_pid: Callable[[], int | None]
    ) -> None:
        self.drain = drain
        self.mode = mode  # "supervisor" or "standalone"
        self.started_at = started_at
        self.app_pid = app_pid


def status_reply(target: Target, counts: Counts | Exception | None, now: float) -> dict[str, Any]:
    """The status reply (also `drainctl status --json`)."""
    fields: dict[str, Any] = {
        "mode": target.mode,
        "pid": target.app_pid(),
        "supervisor_pid": os.getpid(),
        "uptime_s": round(now - target.started_at, 3),
        **target.drain.status(),
        "ports": None,
        "connections": None,
        "established": None,
    }
    if isinstance(counts, Exception):
        fields["error"] = f"counting connections: {counts}"
    elif counts is not None:
        fields["ports"] = sorted(counts.ports)
        fields["connections"] = connections_json(counts, target.drain.config.idle_grace is not None)
        fields["established"] = counts.established
    return fields


class _Conn:
    """One client: its socket, what it sent, what waits to be sent, where it stands."""

    __slots__ = ("closed", "deadline", "eof", "fd", "inbuf", "outbuf", "peer", "sock", "state")

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
        self.eof = False  # the client shut down its side (or left): no longer watched for reading


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
        loop: Loop,
    ) -> None:
        self.sock = sock
        self.address = address
        self.target = target
        self.drain = target.drain
        self.events = events
        self._loop = loop
        self._register = loop.register
        self._unregister = loop.unregister
        self._clock = loop.clock
        self._conns: dict[int, _Conn] = {}
        self._backlog: list[dict[str, Any]] | None = None  # None: no drain yet
        self._refused_logged_at: float | None = None
        self._refused_unlogged = 0
        self._path_ino: int | None = None
        self._uid = os.geteuid()
        self._accept_paused_until: float | None = None  # out of descriptors: see _ACCEPT_PAUSE
        self._emfile_warned = False
        self._errors = 0
        if not address.startswith("@"):
            self._path_ino = os.stat(address).st_ino
        sock.setblocking(False)
        loop.register(sock.fileno(), self._accept)
        events.subscribe(self._on_event)
        if self.drain.t0 is not None:
            self._backlog = []  # opened mid-drain: the story starts here

    @classmethod
    def open(cls, address: str, target: Target, events: Events, loop: Loop) -> Server:
        """Bind and listen. Raises OSError (EADDRINUSE when another server answers there)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if not address.startswith("@"):
                _clear_stale(address)
            sock.bind(sockaddr(address))
            if not address.startswith("@"):
                os.chmod(address, 0o600)  # SO_PEERCRED decides; the mode is a second fence
            sock.listen(_LISTEN_BACKLOG)
        except OSError:
            sock.close()
            raise
        return cls(sock, address, target, events, loop)

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
        if self._accept_paused_until is not None:
            times.append(self._accept_paused_until)
        return min(times) if times else None

    def tick(self) -> None:
        try:
            self._tick()
        except Exception as exc:
            self._unexpected(exc, None)

    def _tick(self) -> None:
        now = self._clock()
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            self._register(self.sock.fileno(), self._accept)
        drain = self.drain
        for conn in list(self._conns.values()):
            if conn.closed:
                continue
            if conn.state == "streaming" and drain.outcome is not None:
                self._send_result(conn)
            if conn.state in ("request", "closing") and now >= conn.deadline:
                self._drop(conn)  # silent, slow, or not reading its last lines
                continue
            if conn.eof and _hung_up(conn.sock):
                self._drop(conn)  # half-closed earlier, gone now: nobody reads its lines
                continue
            self._flush(conn)

    @property
    def clients(self) -> int:
        return len(self._conns)

    # ---- accepting ----------------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            self._accept_batch()
        except Exception as exc:
            self._unexpected(exc, None)

    def _accept_batch(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # that one client is gone (accept(2)): the next one
                self._pause_accepting(exc)
                return
            self._emfile_warned = False  # accepting works again: warn again next time
            try:
                sock.setblocking(False)
                peer = peer_of(sock)
            except OSError:
                sock.close()
                continue
            if peer.uid not in (0, self._uid):
                self._refuse(sock, peer)
                continue
            if len(self._conns) >= MAX_CLIENTS:
                _send_now(sock, {"v": PROTOCOL_VERSION, "type": "error",
                                 "error": f"busy: {MAX_CLIENTS} clients already connected",
                                 "busy": True})
                sock.close()
                continue
            conn = _Conn(sock, peer, self._clock() + REQUEST_TIMEOUT)
            self._conns[conn.fd] = conn
            self._register(conn.fd, functools.partial(self._readable, conn))

    def _pause_accepting(self, exc: OSError) -> None:
        """accept() failed (EMFILE, ENFILE, ENOBUFS, ENOMEM...): the client stays queued and the
        listening socket readable, so stop watching it for _ACCEPT_PAUSE instead of spinning."""
        if self._accept_paused_until is None:
            try:
                self._unregister(self.sock.fileno())
            except (KeyError, ValueError):
                pass
        self._accept_paused_until = self._clock() + _ACCEPT_PAUSE
        if not self._emfile_warned:
            self._emfile_warned = True
            name = errno.errorcode.get(exc.errno or 0, "error")
            self.events.emit("warning", message=(
                f"control socket {self.address}: cannot accept clients ({name}: "
                f"{exc.strerror or exc}); retrying every {_ACCEPT_PAUSE}s, clients wait in the "
                "queue meanwhile"))

    def _unexpected(self, exc: Exception, conn: _Conn | None) -> None:
        """A bug of ours, or a case we did not foresee: log it (a few times), drop the client
        involved, and go on; the supervisor's loop must never see it."""
        self._errors += 1
        if self._errors <= _ERRORS_LOGGED:
            self.events.emit("error", where="control", type=type(exc).__name__,
                             message=str(exc)[:200],
                             **({"more": "further errors are not logged"}
                                if self._errors == _ERRORS_LOGGED else {}))
        if conn is not None:
            try:
                self._drop(conn)
            except Exception:
                pass

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
            self._read(conn)
        except Exception as exc:
            self._unexpected(exc, conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:
            self._end_of_input(conn)
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

    def _end_of_input(self, conn: _Conn) -> None:
        """The client will send nothing more: it left, or it shut down its side (shutdown(2),
        SHUT_WR) and still reads. The end of input stays readable: stop watching it."""
        conn.eof = True
        try:
            self._unregister(conn.fd)
        except (KeyError, ValueError):
            pass
        if _hung_up(conn.sock):
            self._drop(conn)  # gone (a prestop killed by the kubelet, ^C...): nobody reads
        elif conn.state == "request":
            self._error(conn, "incomplete request: the input ended before a newline"
                        if conn.inbuf else "no request: the input ended")

    def _handle(self, conn: _Conn, line: bytes) -> None:
        op, error = parse_request(line)
        if op == "status":
            self._status(conn)
        elif op == "prestop":
            self._prestop(conn)
        else:
            self._error(conn, error)

    # ---- serving ------------------------------------------------------------------------------

    def _status(self, conn: _Conn) -> None:
        target, drain = self.target, self.drain
        ports = drain.ports
        lookup, count = drain.seams.lookup_ports, drain.seams.count
        grace = drain.config.idle_grace
        conn.state = "waiting"

        def work() -> Counts:
            # Off the loop: a port lookup walks /proc and a count may see many sockets.
            from drainctl.drain.discovery import ports_of

            return count(ports if ports is not None else ports_of(lookup()), grace)

        def done(result: Counts | Exception) -> None:
            if conn.closed:
                return
            try:
                self._reply(conn, {"type": "status",
                                   **status_reply(target, result, self._clock())})
            except Exception as exc:
                self._unexpected(exc, conn)

        self._loop.runner_for("server").submit(work, done)

    def _prestop(self, conn: _Conn) -> None:
        drain = self.drain
        joined = drain.prestop(conn.peer.pid)
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
        outcome = self.drain.outcome
        if outcome is None:
            self._error(conn, "the drain did not finish (the supervisor is exiting)")
            return
        self._reply(conn, {"type": "result", "reason": outcome.reason, "count": outcome.count,
                           "elapsed_s": outcome.elapsed_s, "code": self.drain.prestop_code()})

    def _on_event(self, record: dict[str, Any]) -> None:
        """Every logged event: remembered once a drain has started, streamed to prestops."""
        try:
            self._remember_and_stream(record)
        except Exception as exc:
            self._unexpected(exc, None)

    def _remember_and_stream(self, record: dict[str, Any]) -> None:
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
        conn.outbuf += encode({"v": PROTOCOL_VERSION, **message})
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


def parse_request(line: bytes) -> tuple[str | None, str]:
    """(op, "") for a valid request line, op "status" or "prestop"; (None, the error to answer).

    Never raises, whatever the bytes: invalid UTF-8, nesting deep enough to exhaust the parser's
    recursion (RecursionError, not a ValueError), numbers past int()'s digit limit.
    """
    try:
        request = json.loads(line)
    except (ValueError, RecursionError):
        return None, "not a JSON request"
    if not isinstance(request, dict):
        return None, "not a JSON object"
    version = request.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # not true, 1.0 nor "1"
        return None, (f"unsupported protocol version {_short(version)} "
                      f"(this is drainctl protocol {PROTOCOL_VERSION})")
    op = request.get("op")
    if op == "status" or op == "prestop":
        return op, ""
    return None, f"unknown op {_short(op)} (status, prestop)"


def _short(value: object) -> str:
    """A value from a request, for an error line: bounded, whatever it is."""
    try:
        text = json.dumps(value)
    except (ValueError, TypeError, RecursionError):
        text = "?"
    return text if len(text) <= 40 else text[:37] + "..."


def _hung_up(sock: socket.socket) -> bool:
    """Whether the peer closed its socket (POLLHUP), not just shut down its sending side: for a
    Unix stream socket the kernel reports HUP only once both directions are shut (unix(7))."""
    poller = select.poll()
    try:
        poller.register(sock.fileno(), select.POLLIN)
        return any(mask & (select.POLLHUP | select.POLLERR) for _fd, mask in poller.poll(0))
    except (OSError, ValueError):
        return True


def _send_now(sock: socket.socket, message: dict[str, Any]) -> None:
    """One line to a client we are about to close, if its buffer takes it at once."""
    try:
        sock.send(encode(message))
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


def serve(
    control_socket: str | None, target: Target, events: Events, loop: Loop
) -> Server | None:
    """Open a supervisor's server; on failure warn and go on without one (the app matters)."""
    address = resolve_address(control_socket)
    try:
        return Server.open(address, target, events, loop)
    except OSError as exc:
        fields: dict[str, Any] = {}
        if exc.errno == errno.EADDRINUSE:
            holder = listener_of(address)
            if holder is None:
                why = ("another process already listens there (two supervisors in one mount "
                       "namespace?): give this one its own --control-socket")
            else:
                fields = {"holder_uid": holder.uid, "holder_pid": holder.pid}
                who = f"uid {holder.uid}, pid {holder.pid or 'outside this PID namespace'}"
                if holder.uid in (0, os.geteuid()):
                    why = (f"another drainctl already listens there ({who}; two supervisors in "
                           "one mount namespace?): give this one its own --control-socket")
                else:
                    why = (f"taken by a process of another user ({who}), not by a drainctl of "
                           "ours: prestop and status will refuse to talk to it")
        else:
            why = exc.strerror or str(exc)
        events.emit("warning", message=f"control socket {address}: {why}; "
                    "prestop and status cannot reach this supervisor", **fields)
        return None
