"""`--close-idle`: close the app's keep-alive connections between requests, for it.

An app with no down endpoint and no `Connection: close` keeps its keep-alive connections open
until its own keep-alive timeout, often a minute or more: the drain would wait for nothing. With
`--close-idle`, each count of the drain first closes the connections on the app's ports that are
between requests, and never one that carries a request (README.md, "--close-idle").

A server may close a kept connection at any moment between requests, but its client may be
sending the next request at that very moment: the close and the request cross, and the request
is lost (a gateway counts it as the upstream's failure). The one moment the client sends nothing
is while it waits for an answer, since HTTP/1.1 clients do not pipeline. So the close rides on
an answer: the FIN leaves in the same segment as the last bytes of the app's answer, and the
client reads "answer, then end of stream" and never reuses the connection.

1. One sock_diag dump (sockets() below) gives every ESTABLISHED socket on the ports with its
   queues, inode and tcp_info (timers, bytes received, bytes not yet sent).
2. A connection seen for the first time is found by inode among the /proc/PID/fd links of the
   processes the closer was given (Closer below), drainctl takes a duplicate of that very
   socket with pidfd_open(2) + pidfd_getfd(2) (Linux 5.6) and sets TCP_CORK on it (tcp(7)):
   from then on the kernel keeps the last partial segment of whatever the app writes instead
   of sending it at once.
3. The app answers its next request: the answer waits in the socket (tcpi_notsent_bytes). A
   pass that sees the same unsent bytes as the pass before, at least HOLD_MIN later, with
   nothing more from the client and nothing unread, takes the answer as whole.
4. Right before the close, the same facts are checked again on a duplicate (ioctl SIOCOUTQNSD
   and SIOCINQ), then shutdown(SHUT_WR): the kernel appends the FIN to the held bytes and sends
   both. The app sees the client's close later and frees the connection itself; nothing is
   injected into the app, and the app's own descriptor stays its own.
5. The kernel sends corked bytes by itself when its probe timer fires, 200 ms after they were
   first held (tcp(7): the ceiling of TCP_CORK). The dump says when that timer fires
   (idiag_timer 4, idiag_expires): an answer is closed only while that moment is more than
   FLUSH_MARGIN away, and otherwise left to leave without the FIN; the next answer is the next
   chance. At most one answer per connection waits, 20-60 ms.
6. A connection that carried nothing for QUIET (no request in flight, nothing held) is one its
   client keeps in reserve; it is closed as it is, by the in-flight rule (connections.judge),
   as a keep-alive timeout would: the one residual risk (README.md, "--close-idle").

pidfd_getfd needs ptrace rights over the app (PTRACE_MODE_ATTACH_REALCREDS: the same uid, or
CAP_SYS_PTRACE), and the default seccomp profiles of Docker and containerd allow it only with
CAP_SYS_PTRACE. When it is refused, the closer logs one `warning` with the fix and stops trying:
the drain waits for the connections as it would without `--close-idle`.

ctypes (for the pidfd_getfd system call, which the os module lacks) is imported only when a
closer is made, so PID 1's start-up without `--close-idle` does not pay for it.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence

from drainctl.drain.connections import (
    _QUEUES,
    _QUEUES_AT,
    _REPLY,
    _REPLY_MIN,
    _TCPI_LAST,
    _TCPI_LAST_DATA_AT,
    _U16,
    _UID_INODE,
    _UID_INODE_AT,
    INET_DIAG_INFO,
    TCP_ESTABLISHED,
    _check_port,
    _diag_socket,
    _dump,
    _find_tcp_info,
    _port_filter,
    _replies,
    judge,
)

__all__ = [
    "FIX",
    "FLUSH_MARGIN",
    "HELD",
    "HOLD_MIN",
    "POLL",
    "QUIET",
    "SILENT",
    "Closer",
    "Pass",
    "can_close",
    "has_sys_ptrace",
    "in_flight",
    "process_tree",
]

# The timing of a close (module docstring): an answer that got no more bytes for HOLD_MIN is
# taken as whole; one the kernel sends by itself within FLUSH_MARGIN is left to it; a connection
# silent for QUIET is one nobody uses now. The drain counts every POLL.
HOLD_MIN = 0.02  # seconds
FLUSH_MARGIN = 0.01
QUIET = 1.0
POLL = 0.04

FIX = ('add CAP_SYS_PTRACE to drainctl\'s container (securityContext: capabilities: add: '
       '["SYS_PTRACE"]), run drainctl as the app\'s user, or close connections in the app '
       '(docs/app-side.md)')

SYS_PIDFD_GETFD = 438  # the same number on every architecture (asm-generic/unistd.h)
SIOCINQ = 0x541B  # FIONREAD: bytes in the receive queue, not yet read (tcp(7))
SIOCOUTQ = 0x5411  # TIOCOUTQ: bytes in the send queue, sent or not, not yet acknowledged
SIOCOUTQNSD = 0x894B  # bytes in the send queue not sent yet (tcp(7))
CAP_SYS_PTRACE = 19
# tcpi_state; tcpi_last_data_sent at 44, tcpi_last_data_recv at 52, tcpi_last_ack_recv at 56
_TCP_INFO = struct.Struct("=B43xI4xII")
_INT = struct.Struct("=i")
# tcpi_bytes_received (u64) at 128 and tcpi_notsent_bytes at 144 (Linux 4.6)
_TCPI_RECEIVED_NOTSENT = struct.Struct("=Q8xI")
_TCPI_RECEIVED_AT = 128
_TCPI_NOTSENT_MIN = 148
# struct inet_diag_msg: idiag_timer (u8) at 2, idiag_expires (u32, ms) at 52; 4: the probe timer
_TIMER = struct.Struct("=B49xI")
_TIMER_AT = 16 + 2
_TIMER_PROBE0 = 4

# What a pass decided for a connection.
HELD = "held"  # an answer waits, whole: the FIN goes with it
SILENT = "silent"  # nothing for QUIET: closed as it is


def in_flight(rqueue: int, wqueue: int, last_sent_ms: int, last_recv_ms: int,
              last_ack_recv_ms: int) -> bool:
    """Whether a connection carries a request (README.md, "--close-idle"), by the one in-flight
    rule (connections.judge): bytes the app has not read yet, bytes it sent that the client has
    not acknowledged, or data from the client more recent than the app's last data; with the
    timers equal (one clock tick: 4 ms at HZ=250), the client's acknowledgements decide."""
    return judge(TCP_ESTABLISHED, rqueue, wqueue, last_sent_ms, last_recv_ms, None,
                 since_ack_recv=last_ack_recv_ms) in _BUSY


_BUSY = frozenset({"unread", "unsent", "unanswered"})


class _Seen:
    """What the passes know of one connection (by socket inode)."""

    __slots__ = ("corked", "flush_at", "held", "held_at", "received")

    def __init__(self, now: float) -> None:
        self.corked: bool | None = None  # None: not tried yet; False: not the app's, or refused
        self.held = 0  # unsent bytes seen by the last pass
        self.held_at = now  # when the last pass saw `held` change
        self.received: int | None = None  # tcpi_bytes_received then
        self.flush_at: float | None = None  # when the kernel sends `held` by itself, if it will

    def in_time(self, now: float) -> bool:
        """Whether the held answer is still far enough from the kernel's own sending."""
        return self.flush_at is None or now + FLUSH_MARGIN < self.flush_at

    def decide(self, s: SocketInfo, now: float) -> str | None:
        """HELD, SILENT or None (leave it), from this pass's facts about the connection."""
        held = s.notsent or 0
        if held:  # an answer waits (corked), or the client's window is full
            # `now` was read before the dump, so the timer fires at now + flush_in or later
            self.flush_at = None if s.flush_in_ms is None else now + s.flush_in_ms / 1000.0
            if held != self.held or s.received != self.received:
                self.held, self.received, self.held_at = held, s.received, now
            elif (self.corked and not s.rqueue and s.received is not None
                  and now - self.held_at >= HOLD_MIN and self.in_time(now)):
                return HELD
            return None
        self.held, self.received = 0, s.received
        return SILENT if self.corked and _silent(s) else None  # only the app's own sockets


def _silent(s: SocketInfo) -> bool:
    sent, received, acked = s.last_data_sent_ms, s.last_data_recv_ms, s.last_ack_recv_ms
    if s.state != TCP_ESTABLISHED or sent is None or received is None or acked is None:
        return False
    if s.notsent or in_flight(s.rqueue, s.wqueue, sent, received, acked):
        return False
    return min(sent, received) >= QUIET * 1000.0


class Pass:
    """What one close pass did."""

    __slots__ = ("again", "closed", "held", "seen", "skipped", "warning")

    def __init__(self) -> None:
        self.again = False  # a pass HOLD_MIN from now may close an answer that appeared now
        self.closed: dict[int, int] = {}  # port -> connections closed
        self.held = 0  # of those, closed with an answer (the rest: silent for QUIET)
        self.seen = 0  # ESTABLISHED connections on the ports
        self.skipped = 0  # decided by the dump, changed by the second look
        self.warning: str | None = None  # once: closing cannot work here

    @property
    def total(self) -> int:
        return sum(self.closed.values())


class _Refused(Exception):
    """The kernel refused us the app's sockets: no rights, or the system call is filtered."""


class Closer:
    """Closes the app's connections between requests; one per drain (it remembers sockets,
    what it saw of them, and refusals).

    `app_pids()` lists the processes whose sockets may be closed, the app first: `drainctl run`
    gives every process it is responsible for (discovery.responsible_pids), the standalone
    prestop PID 1's tree. Only the first one's /proc/PID/fd being unreadable refuses the closer.
    `clock`: monotonic seconds, read at each pass and right before each close with an answer.
    """

    def __init__(self, app_pids: Callable[[], Iterable[int]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        import ctypes  # lazily: see the module docstring

        self._app_pids = app_pids
        self._clock = clock
        self._where: dict[int, tuple[int, int]] = {}  # socket inode -> (pid, fd)
        self._seen: dict[int, _Seen] = {}  # socket inode -> what the passes saw
        self.refused: str | None = None  # why closing cannot work here, once it is known
        self.warned = False  # the one warning was logged (by the start-up probe, or a pass)
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._ctypes = ctypes

    # ---- permissions ----------------------------------------------------------------------------

    def probe(self) -> str | None:
        """At start-up: whether closing can work, by pidfd_getfd on this process (the kernel, a
        seccomp filter), then on one of the app's descriptors (the rights). The warning to log,
        or None. It does not give up yet: the app may still be on its way to its own uid; the
        first pass that is refused does (without a second warning)."""
        why = can_close(self._app_pids(), self._getfd)
        return None if why is None else self._warning(why)

    def _refuse(self, why: str) -> str | None:
        """Stop closing; the warning to log, unless one was."""
        self.refused = why
        return self._warning(why)

    def _warning(self, why: str) -> str | None:
        if self.warned:
            return None
        self.warned = True
        return (f"--close-idle cannot close the app's connections here ({why}): the drain "
                f"waits for them instead; to fix, {FIX}")

    def _getfd(self, pidfd: int, fd: int) -> int:
        """pidfd_getfd(2): a duplicate of the process's `fd`, close-on-exec."""
        result = int(self._libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0))
        if result < 0:
            code = self._ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return result

    # ---- one pass -------------------------------------------------------------------------------

    def close_idle(self, ports: Sequence[int]) -> Pass:
        """Cork the connections on `ports` seen for the first time, and close those between
        requests (see the module docstring). Raises OSError when the dump fails (the drain logs
        it and counts again)."""
        done = Pass()
        if self.refused is not None or not ports:
            return done
        now = self._clock()  # before the dump: an answer it does not see is younger than this
        found = sockets(ports)
        done.seen = len(found)
        seen: dict[int, _Seen] = {}
        new: list[SocketInfo] = []
        decided: list[tuple[SocketInfo, _Seen, str]] = []
        for s in found:
            known = seen[s.inode] = self._seen.get(s.inode) or _Seen(now)
            if known.corked is None:
                new.append(s)
                continue
            verdict = known.decide(s, now)
            if verdict is not None:
                decided.append((s, known, verdict))
            elif known.held and known.held_at == now and known.corked:
                done.again = True  # an answer just appeared: whole or not, HOLD_MIN tells
        self._seen = seen  # the connections gone since are forgotten
        if not new and not decided:
            return done
        pidfds: dict[int, int] = {}
        try:
            missing = {s.inode for s in new} | {s.inode for s, _, _ in decided}
            missing -= self._where.keys()
            if missing:
                self._find(missing)
            for s in new:
                seen[s.inode].corked = self._cork(s, pidfds)
            for s, known, verdict in decided:
                if self._close_one(s, known, verdict, pidfds):
                    done.closed[s.port] = done.closed.get(s.port, 0) + 1
                    done.held += verdict == HELD
                else:
                    done.skipped += 1
        except _Refused as exc:
            done.warning = self._refuse(str(exc))
        finally:
            for pidfd in pidfds.values():
                os.close(pidfd)
        return done

    def _find(self, inodes: set[int]) -> None:
        """Where the sockets `inodes` are open: (pid, fd), from the app's /proc/PID/fd links.
        Only the first process (the app itself) not letting us read them refuses us: another
        one (of another uid) is skipped."""
        left = set(inodes)
        for i, pid in enumerate(self._app_pids()):
            try:
                names = os.listdir(f"/proc/{pid}/fd")
            except FileNotFoundError:
                continue  # gone
            except PermissionError as exc:
                if i:
                    continue
                raise _Refused(f"cannot read /proc/{pid}/fd: {exc.strerror}") from None
            except OSError:
                continue
            fd_dir = f"/proc/{pid}/fd/"
            for name in names:
                try:
                    target = os.readlink(fd_dir + name)
                except OSError:
                    continue  # closed since listdir
                if target.startswith("socket:["):
                    inode = int(target[8:-1])
                    if inode in left:
                        self._where[inode] = (pid, int(name))
                        left.discard(inode)
                        if not left:
                            return

    def _duplicate(self, s: SocketInfo, pidfds: dict[int, int]) -> socket.socket | None:
        """A duplicate of the app's socket `s`, or None when it is not the app's or is gone.
        Raises _Refused when the kernel refuses us the app's descriptors."""
        where = self._where.get(s.inode)
        if where is None:
            return None  # not the app's (or closed since the dump)
        pid, fd = where
        pidfd = pidfds.get(pid)
        try:
            if pidfd is None:
                pidfd = pidfds[pid] = os.pidfd_open(pid)
            dup = self._getfd(pidfd, fd)
        except OSError as exc:
            self._where.pop(s.inode, None)
            if exc.errno in (errno.EPERM, errno.EACCES, errno.ENOSYS):
                raise _Refused(f"pidfd_getfd: {exc.strerror}") from None
            return None  # ESRCH, EBADF: the process or the descriptor is gone
        try:
            if os.fstat(dup).st_ino != s.inode:
                self._where.pop(s.inode, None)  # the fd was reused for something else
                os.close(dup)
                return None
            return socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            return None

    def _cork(self, s: SocketInfo, pidfds: dict[int, int]) -> bool:
        """TCP_CORK on the app's socket: its next answer waits for the FIN (or 200 ms)."""
        sock = self._duplicate(s, pidfds)
        if sock is None:
            return False
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            return True
        except OSError:
            return False  # closed meanwhile: it will not be seen again
        finally:
            sock.close()  # our duplicate only: the app's descriptor is untouched

    def _close_one(self, s: SocketInfo, known: _Seen, verdict: str,
                   pidfds: dict[int, int]) -> bool:
        if verdict == HELD and not known.in_time(self._clock()):
            return False  # this pass took long: the kernel may send the answer any moment now
        sock = self._duplicate(s, pidfds)
        if sock is None:
            return False
        try:
            if not _still(sock, known.held if verdict == HELD else 0):
                return False
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return False  # e.g. ENOTCONN: the client closed meanwhile
        finally:
            sock.close()
        self._where.pop(s.inode, None)
        del self._seen[s.inode]
        return True


def _still(sock: socket.socket, held: int) -> bool:
    """The pass's decision checked again on the socket itself, right before the close: `held`
    unsent bytes waiting (the answer) and nothing unread; or, for a silent connection (`held`
    0), the in-flight rule and QUIET."""
    import fcntl

    def ioctl(request: int) -> int:
        return int(_INT.unpack(fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0])

    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size)
    if len(info) < _TCP_INFO.size:
        return False
    state, sent, received, acked = _TCP_INFO.unpack_from(info)
    if state != TCP_ESTABLISHED or ioctl(SIOCINQ):
        return False
    if held:
        return ioctl(SIOCOUTQNSD) == held
    if min(sent, received) < QUIET * 1000.0 or ioctl(SIOCOUTQNSD):
        return False
    return not in_flight(0, ioctl(SIOCOUTQ), sent, received, acked)


# ---- who the app is, and whether we may ----------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (walked in /proc, as discovery does); [] when it is gone."""
    from drainctl.drain.discovery import _descendants, _parents

    if not os.path.exists(f"/proc/{pid}"):
        return []
    try:
        return [pid, *_descendants(pid, _parents())]
    except OSError:
        return [pid]


def can_close(
    app_pids: Iterable[int], getfd: Callable[[int, int], int] | None = None
) -> str | None:
    """None when pidfd_getfd works here, on this process and on the first of `app_pids` that
    has a descriptor; else why not, in a few words (for `drainctl check` and the warning)."""
    if getfd is None:
        getfd = Closer(lambda: ())._getfd
    try:
        own = os.pidfd_open(os.getpid())
    except OSError as exc:
        return f"pidfd_open: {exc.strerror} (Linux 5.3 or later is needed)"
    try:
        os.close(getfd(own, own))
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            return "pidfd_getfd: not in this kernel (Linux 5.6 or later is needed)"
        return f"pidfd_getfd is refused to drainctl itself ({exc.strerror}): a seccomp filter"
    finally:
        os.close(own)
    for pid in app_pids:
        if pid == os.getpid():
            continue
        try:
            names = sorted(os.listdir(f"/proc/{pid}/fd"), key=int)
        except FileNotFoundError:
            continue
        except PermissionError as exc:
            return f"cannot read /proc/{pid}/fd: {exc.strerror}"
        if not names:
            continue
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            os.close(getfd(pidfd, int(names[0])))
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES):
                return f"pidfd_getfd on the app (pid {pid}): {exc.strerror}"
            continue  # that descriptor closed meanwhile: try the next process
        finally:
            os.close(pidfd)
        return None
    return None


def has_sys_ptrace() -> bool:
    """Whether this process has CAP_SYS_PTRACE in its effective set (proc(5): CapEff)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_PTRACE & 1)
    except (OSError, ValueError):
        pass
    return False


# ---- one sock_diag dump with what the closer needs ------------------------------------------


class SocketInfo:
    """One TCP socket from a sock_diag dump, with what --close-idle needs (drain/closer.py)."""

    __slots__ = (
        "flush_in_ms",
        "inode",
        "last_ack_recv_ms",
        "last_data_recv_ms",
        "last_data_sent_ms",
        "notsent",
        "port",
        "received",
        "rqueue",
        "state",
        "uid",
        "wqueue",
    )

    def __init__(
        self,
        port: int,
        state: int,
        uid: int,
        inode: int,
        rqueue: int,
        wqueue: int,
        last_data_sent_ms: int | None = None,
        last_data_recv_ms: int | None = None,
        last_ack_recv_ms: int | None = None,
        received: int | None = None,
        notsent: int | None = None,
        flush_in_ms: int | None = None,
    ) -> None:
        self.port = port
        self.state = state
        self.uid = uid
        self.inode = inode
        self.rqueue = rqueue
        self.wqueue = wqueue
        self.last_data_sent_ms = last_data_sent_ms
        self.last_data_recv_ms = last_data_recv_ms
        self.last_ack_recv_ms = last_ack_recv_ms
        self.received = received  # tcpi_bytes_received: bytes from the client so far
        self.notsent = notsent  # tcpi_notsent_bytes: bytes the app wrote, not sent yet
        # the probe timer (idiag_timer 4) fires in this many ms: the kernel sends held bytes
        self.flush_in_ms = flush_in_ms


def sockets(ports: Sequence[int], states: int = 1 << TCP_ESTABLISHED) -> list[SocketInfo]:
    """Every TCP socket (IPv4 and IPv6) on a local port in `ports` and in one of `states` (a
    bitmask of 1 << TCP_*), one netlink dump per family with tcp_info. Raises OSError."""
    wanted = sorted({_check_port(p) for p in ports})
    if not wanted:
        return []
    try:
        return _sockets(wanted, states, eq_ops=True)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return _sockets(wanted, states, eq_ops=False)  # before Linux 4.17: no S_EQ


def _sockets(ports: list[int], states: int, *, eq_ops: bool) -> list[SocketInfo]:
    found: list[SocketInfo] = []
    bytecode = _port_filter(ports, eq_ops=eq_ops)
    with _diag_socket() as sock:
        for family in (socket.AF_INET, socket.AF_INET6):
            ext = 1 << (INET_DIAG_INFO - 1)
            for buf, start, end, stride in _dump(sock, family, states, ext, bytecode):
                for off, length in _replies(buf, start, end, stride):
                    _length, state, port_hi, port_lo = _REPLY.unpack_from(buf, off)
                    rqueue, wqueue = _QUEUES.unpack_from(buf, off + _QUEUES_AT)
                    uid, inode = _UID_INODE.unpack_from(buf, off + _UID_INODE_AT)
                    info = _find_tcp_info(buf, off + _REPLY_MIN, off + length)
                    sent = received = acked = total = notsent = None
                    if info >= 0:
                        sent, _, received, acked = _TCPI_LAST.unpack_from(
                            buf, info + 4 + _TCPI_LAST_DATA_AT)
                        if _U16.unpack_from(buf, info)[0] - 4 >= _TCPI_NOTSENT_MIN:
                            total, notsent = _TCPI_RECEIVED_NOTSENT.unpack_from(
                                buf, info + 4 + _TCPI_RECEIVED_AT)
                    timer, expires = _TIMER.unpack_from(buf, off + _TIMER_AT)
                    found.append(SocketInfo(port_hi << 8 | port_lo, state, uid, inode, rqueue,
                                            wqueue, sent, received, acked, total, notsent,
                                            expires if timer == _TIMER_PROBE0 else None))
    return found
