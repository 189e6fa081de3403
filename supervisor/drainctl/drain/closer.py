"""`--close-idle`: close the app's keep-alive connections the moment they are idle, for it.

An app with no down endpoint and no `Connection: close` keeps its keep-alive connections open
until its own keep-alive timeout, often a minute or more: the drain would wait for nothing. With
`--close-idle`, each count of the drain first closes the connections on the app's ports that are
idle between requests, exactly as the server's keep-alive timeout would, and never one that
carries a request (README.md, "--close-idle"):

1. One sock_diag dump (sockets() below) gives every ESTABLISHED socket on the ports with its
   queues, tcp_info timers and inode.
2. A connection is a candidate when it is not in flight (`in_flight` below) and no data moved
   either way for at least MIN_IDLE.
3. Its owner is found by inode among the app's processes' /proc/PID/fd links, and drainctl takes
   a duplicate of that very socket with pidfd_open(2) + pidfd_getfd(2) (Linux 5.6).
4. Right before the close, the in-flight rule is checked again on the duplicate itself
   (getsockopt TCP_INFO, ioctl SIOCINQ and SIOCOUTQ: tcp(7)), then shutdown(SHUT_WR) sends the
   client an orderly FIN, and the duplicate is closed. The client (a gateway, a browser) sees the
   connection end like any keep-alive timeout and reconnects, through the load balancer, to
   another pod; the app sees the client's close and frees the connection itself. Nothing is
   injected into the app, and the app's own descriptor stays its own.

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
from collections.abc import Callable, Iterable, Sequence

from drainctl.drain.connections import (
    _QUEUES,
    _QUEUES_AT,
    _REPLY,
    _REPLY_MIN,
    _TCPI_LAST,
    _TCPI_LAST_DATA_AT,
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
    "MIN_IDLE",
    "POLL",
    "Closer",
    "Pass",
    "can_close",
    "has_sys_ptrace",
    "in_flight",
    "process_tree",
]

# When a connection is closed: the one risk is a request that the client sends at the very
# moment the close reaches it (README.md, "--close-idle"). A client that got its answer sends its
# next one either at once (back to back: within a round trip, well under MIN_IDLE) or after a
# pause of its own; a gateway hands a kept connection to the next request of the same client
# first. So the close comes in the quiet moment right after an answer, from MIN_IDLE to YOUNG,
# before a paced client's next request, and the drain counts at least every POLL so that every
# connection is seen once in that window. A connection silent for QUIET is one nobody uses now.
MIN_IDLE = 0.02  # seconds
YOUNG = 0.06
QUIET = 1.0
POLL = YOUNG - MIN_IDLE

FIX = ('add CAP_SYS_PTRACE to drainctl\'s container (securityContext: capabilities: add: '
       '["SYS_PTRACE"]), run drainctl as the app\'s user, or close connections in the app '
       '(docs/app-side.md)')

SYS_PIDFD_GETFD = 438  # the same number on every architecture (asm-generic/unistd.h)
SIOCINQ = 0x541B  # FIONREAD: bytes in the receive queue, not yet read (tcp(7))
SIOCOUTQ = 0x5411  # TIOCOUTQ: bytes in the send queue, sent or not, not yet acknowledged
CAP_SYS_PTRACE = 19
# tcpi_state; tcpi_last_data_sent at 44, tcpi_last_data_recv at 52, tcpi_last_ack_recv at 56
_TCP_INFO = struct.Struct("=B43xI4xII")
_INT = struct.Struct("=i")


def in_flight(rqueue: int, wqueue: int, last_sent_ms: int, last_recv_ms: int,
              last_ack_recv_ms: int) -> bool:
    """Whether a connection carries a request (README.md, "--close-idle"), by the one in-flight
    rule (connections.judge): bytes the app has not read yet, bytes it sent that the client has
    not acknowledged, or data from the client more recent than the app's last data; with the
    timers equal (one clock tick: 4 ms at HZ=250), the client's acknowledgements decide."""
    return judge(TCP_ESTABLISHED, rqueue, wqueue, last_sent_ms, last_recv_ms, None,
                 since_ack_recv=last_ack_recv_ms) in _BUSY


_BUSY = frozenset({"unread", "unsent", "unanswered"})


def _candidate(s: SocketInfo, min_idle_ms: float) -> bool:
    sent, received, acked = s.last_data_sent_ms, s.last_data_recv_ms, s.last_ack_recv_ms
    if s.state != TCP_ESTABLISHED or sent is None or received is None or acked is None:
        return False
    if in_flight(s.rqueue, s.wqueue, sent, received, acked):
        return False
    return _moment(min(sent, received), min_idle_ms)


def _moment(idle_ms: float, min_idle_ms: float) -> bool:
    """Whether a connection idle for `idle_ms` may be closed now (see MIN_IDLE)."""
    return min_idle_ms <= idle_ms <= YOUNG * 1000.0 or idle_ms >= QUIET * 1000.0


class Pass:
    """What one close pass did."""

    __slots__ = ("closed", "seen", "skipped", "warning")

    def __init__(self) -> None:
        self.closed: dict[int, int] = {}  # port -> connections closed
        self.seen = 0  # ESTABLISHED connections on the ports
        self.skipped = 0  # idle by the dump, busy or gone by the second look
        self.warning: str | None = None  # once: closing cannot work here

    @property
    def total(self) -> int:
        return sum(self.closed.values())


class _Refused(Exception):
    """The kernel refused us the app's sockets: no rights, or the system call is filtered."""


class Closer:
    """Closes the app's idle connections; one per drain (it remembers sockets and refusals).

    `app_pids()` lists the processes whose sockets may be closed (the app and its descendants).
    """

    def __init__(self, app_pids: Callable[[], Iterable[int]], min_idle: float = MIN_IDLE) -> None:
        import ctypes  # lazily: see the module docstring

        self._app_pids = app_pids
        self._min_idle_ms = min_idle * 1000.0
        self._where: dict[int, tuple[int, int]] = {}  # socket inode -> (pid, fd)
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
        """Close every idle connection on `ports` (see the module docstring). Raises OSError
        when the dump fails (the drain logs it and counts again)."""
        done = Pass()
        if self.refused is not None or not ports:
            return done
        found = sockets(ports)
        done.seen = len(found)
        candidates = [s for s in found if _candidate(s, self._min_idle_ms)]
        if not candidates:
            return done
        pidfds: dict[int, int] = {}
        try:
            missing = {s.inode for s in candidates} - self._where.keys()
            if missing:
                self._find(missing)
            for s in candidates:
                where = self._where.get(s.inode)
                if where is None:
                    continue  # not the app's (or closed since the dump)
                if self._close_one(s, where, pidfds):
                    done.closed[s.port] = done.closed.get(s.port, 0) + 1
                else:
                    done.skipped += 1
        except _Refused as exc:
            done.warning = self._refuse(str(exc))
        finally:
            for pidfd in pidfds.values():
                os.close(pidfd)
        return done

    def _find(self, inodes: set[int]) -> None:
        """Where the sockets `inodes` are open: (pid, fd), from the app's /proc/PID/fd links."""
        left = set(inodes)
        for pid in self._app_pids():
            try:
                names = os.listdir(f"/proc/{pid}/fd")
            except FileNotFoundError:
                continue  # gone
            except PermissionError as exc:
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

    def _close_one(self, s: SocketInfo, where: tuple[int, int], pidfds: dict[int, int]) -> bool:
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
            return False  # ESRCH, EBADF: the process or the descriptor is gone
        try:
            if os.fstat(dup).st_ino != s.inode:
                self._where.pop(s.inode, None)  # the fd was reused for something else
                return False
            sock = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            return False
        try:
            if not _idle_now(sock, self._min_idle_ms):
                return False
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return False  # e.g. ENOTCONN: the client closed meanwhile
        finally:
            sock.close()  # our duplicate only: the app's descriptor is untouched
        self._where.pop(s.inode, None)
        return True


def _idle_now(sock: socket.socket, min_idle_ms: float) -> bool:
    """The in-flight rule again, on the socket itself, right before the close."""
    import fcntl

    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size)
    if len(info) < _TCP_INFO.size:
        return False
    state, sent, received, acked = _TCP_INFO.unpack_from(info)
    if state != TCP_ESTABLISHED or not _moment(min(sent, received), min_idle_ms):
        return False
    outq = _INT.unpack(fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0" * 4))[0]
    inq = _INT.unpack(fcntl.ioctl(sock.fileno(), SIOCINQ, b"\0" * 4))[0]
    return not in_flight(inq, outq, sent, received, acked)


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
        "inode",
        "last_ack_recv_ms",
        "last_data_recv_ms",
        "last_data_sent_ms",
        "port",
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
        last_data_sent_ms: int | None,
        last_data_recv_ms: int | None,
        last_ack_recv_ms: int | None,
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
                    sent = received = acked = None
                    if info >= 0:
                        sent, _, received, acked = _TCPI_LAST.unpack_from(
                            buf, info + 4 + _TCPI_LAST_DATA_AT)
                    found.append(SocketInfo(port_hi << 8 | port_lo, state, uid, inode, rqueue,
                                            wqueue, sent, received, acked))
    return found
