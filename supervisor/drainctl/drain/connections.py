"""The connection counter: TCP connections per local port, and the ports a process tree listens on.

A connection holds a drain while it is TCP ESTABLISHED (IPv4 or IPv6) and its *local* port is one
of the drained ports, in this network namespace: the same number as
`ss -Htn state established '( sport = :P )' | wc -l`.

Three methods, fastest first (benchmarks/bench_connections.py measures them):

- ``netlink``: NETLINK_SOCK_DIAG, what `ss` itself uses (sock_diag(7)). The port filter runs in
  the kernel as inet_diag bytecode, so only the drained ports' sockets cross into Python.
- ``proc``: parse /proc/net/tcp and /proc/net/tcp6 (proc(5)). The kernel formats every socket of
  the namespace as text, so it is several times slower than netlink at thousands of connections,
  and it has no timers: with this method ``idle`` is always 0, and a CLOSE_WAIT connection holds
  only while its queues are not empty.
- ``psutil``: ``psutil.net_connections()``, which parses the same files and also maps every
  socket to its process; the last resort. ``idle`` is always 0 here too, and CLOSE_WAIT never
  holds.

``make_counter("auto")`` picks netlink when one cheap request works here (sandboxes such as gVisor
refuse NETLINK_SOCK_DIAG), else /proc, else psutil. psutil is imported lazily, and nothing here
imports dataclasses or typing: the supervisor's start-up and its first drain must stay lean.

In-flight truth (``judge``): a connection is busy, never idle, while the app has unread bytes in
its receive queue, unacknowledged bytes in its send queue, or while the last data came from the
client after the last data the app sent (tcp_info's tcpi_last_data_recv < tcpi_last_data_sent, in
ms since: a request not yet answered). An ESTABLISHED connection also needs `idle_grace` without
data either way to be idle; a CLOSE_WAIT one (the client half-closed) holds only while busy.
``inflight()`` gives that verdict per connection, with the reason.
"""

from __future__ import annotations

import collections
import errno
import os
import socket
import struct
from collections.abc import Iterator, Sequence

__all__ = [
    "METHODS",
    "Connection",
    "Counter",
    "Counts",
    "PortCounts",
    "all_listening_ports",
    "inflight",
    "judge",
    "make_counter",
]

METHODS = ("netlink", "proc", "psutil")

# --- TCP states, include/net/tcp_states.h (the numbers /proc/net/tcp prints in hex) ----------
TCP_ESTABLISHED = 1
TCP_TIME_WAIT = 6
TCP_CLOSE_WAIT = 8
TCP_LISTEN = 10
TCP_NEW_SYN_RECV = 12  # a request socket; inet_diag reports it as SYN_RECV

# --- netlink, linux/netlink.h ----------------------------------------------------------------
NETLINK_SOCK_DIAG = 4
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_TYPE_MASK = 0x3FFF  # ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)

# --- sock_diag, linux/sock_diag.h and linux/inet_diag.h ---------------------------------------
SOCK_DIAG_BY_FAMILY = 20
INET_DIAG_REQ_BYTECODE = 1  # request attribute: a filter program run per socket in the kernel
INET_DIAG_INFO = 2  # reply attribute (struct tcp_info); ask with idiag_ext bit 1 << (2 - 1)
INET_DIAG_BC_JMP = 1
INET_DIAG_BC_S_GE = 2
INET_DIAG_BC_S_LE = 3
INET_DIAG_BC_S_EQ = 11  # newer than GE/LE (Linux 4.17); older kernels answer EINVAL

# Every state but LISTEN, for counting. NEW_SYN_RECV is named explicitly: inet_diag dumps request
# sockets only when that bit (or SYN_RECV's) is set.
_COUNT_STATES = ((1 << 12) - 2) & ~(1 << TCP_LISTEN) | (1 << TCP_NEW_SYN_RECV)
_LISTEN_STATES = 1 << TCP_LISTEN

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# struct inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed inet_diag_sockid
# (48 bytes) that a dump ignores.
_REQ_V2 = struct.Struct("=BBBBI48x")
_NLATTR = struct.Struct("=HH")  # nla_len, nla_type
_BC_OP = struct.Struct("=BBH")  # struct inet_diag_bc_op: code, yes, no
# One reply, from the start of its nlmsghdr: nlmsg_len, then (struct inet_diag_msg at +16)
# idiag_state at +17 and the two bytes of idiag_sport (big-endian) at +20.
_REPLY = struct.Struct("=I13xB2xBB")
_REPLY_MIN = 16 + 72  # nlmsghdr + struct inet_diag_msg
_QUEUES = struct.Struct("=II")  # idiag_rqueue, idiag_wqueue
_QUEUES_AT = 16 + 56
# struct tcp_info (linux/tcp.h): tcpi_last_data_sent at 44, tcpi_last_data_recv at 52, in ms;
# tcpi_data_segs_in and tcpi_data_segs_out at 152 and 156 (Linux 4.6+; 0 when absent).
_TCPI_LAST_DATA = struct.Struct("=I4xI")
_TCPI_LAST_DATA_AT = 44
_TCPI_MIN = _TCPI_LAST_DATA_AT + _TCPI_LAST_DATA.size
_TCPI_DATA_SEGS = struct.Struct("=II")
_TCPI_DATA_SEGS_AT = 152
_TCPI_SEGS_MIN = _TCPI_DATA_SEGS_AT + _TCPI_DATA_SEGS.size
_UID_INODE = struct.Struct("=II")  # idiag_uid, idiag_inode
_UID_INODE_AT = 16 + 64
# tcpi_last_data_sent, _last_ack_sent (unused by Linux), _last_data_recv, _last_ack_recv
_TCPI_LAST = struct.Struct("=IIII")
_NLMSGHDR_HEAD = struct.Struct("=IH")  # nlmsg_len, nlmsg_type
_U32 = struct.Struct("=I")
_U16 = struct.Struct("=H")
_I32 = struct.Struct("=i")

# The kernel caps one dump skb at 32 KiB once it has seen a large recv (netlink_recvmsg records
# max_recvmsg_len); 64 KiB leaves room, and MSG_TRUNC below catches a kernel that sends more.
_RECV_BUFSIZE = 65536
_NETLINK_TIMEOUT = 5.0  # seconds per recv; a 30k-socket dump takes well under 0.1 s


class PortCounts:
    """TCP sockets on one local port, by state (LISTEN is never counted)."""

    __slots__ = ("close_wait", "close_wait_busy", "established", "idle", "other")

    def __init__(
        self,
        established: int = 0,
        close_wait: int = 0,
        other: int = 0,  # SYN_RECV, FIN_WAIT*, TIME_WAIT, LAST_ACK, CLOSING...
        # ESTABLISHED ones idle for at least idle_grace and not busy (see judge()). Only the
        # netlink method can see it; 0 with the others, or without idle_grace.
        idle: int = 0,
        # CLOSE_WAIT ones still busy (see judge()): a half-closed client awaiting its answer.
        close_wait_busy: int = 0,
    ) -> None:
        self.established = established
        self.close_wait = close_wait
        self.other = other
        self.idle = idle
        self.close_wait_busy = close_wait_busy

    def _key(self) -> tuple[int, int, int, int, int]:
        return (self.established, self.close_wait, self.other, self.idle, self.close_wait_busy)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PortCounts):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"PortCounts(established={self.established}, close_wait={self.close_wait}, "
            f"other={self.other}, idle={self.idle}, close_wait_busy={self.close_wait_busy})"
        )

    @property
    def holding(self) -> int:
        """Connections that still hold a drain."""
        return self.established - self.idle + self.close_wait_busy


class Counts:
    """One count: an entry per requested port (zeros included), and the method that made it."""

    __slots__ = ("again_in", "closed", "closed_with_answer", "method", "ports", "warning")

    def __init__(self, ports: dict[int, PortCounts], method: str,
                 closed: dict[int, int] | None = None, warning: str | None = None) -> None:
        self.ports = ports
        self.method = method
        # --close-idle (drain/closer.py): connections closed before this count, per port; the
        # one warning to log when closing cannot work here (then the drain waits instead); and
        # how soon the closer wants to look again (an answer waits to be closed with).
        self.closed = closed if closed is not None else {}
        self.warning = warning
        self.again_in: float | None = None
        self.closed_with_answer = 0  # of `closed`, those closed with an answer (not unused)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Counts):
            return NotImplemented
        return (self.ports, self.method) == (other.ports, other.method)

    __hash__ = None  # type: ignore[assignment]  # mutable dict inside, like the dataclass was

    def __repr__(self) -> str:
        return f"Counts(ports={self.ports!r}, method={self.method!r})"

    @property
    def established(self) -> int:
        return sum(p.established for p in self.ports.values())

    @property
    def close_wait_busy(self) -> int:
        return sum(p.close_wait_busy for p in self.ports.values())

    @property
    def holding(self) -> int:
        return sum(p.holding for p in self.ports.values())


class Counter:
    """Counts connections per local port with one method; see make_counter()."""

    __slots__ = ("_eq_ops", "method")

    def __init__(self, method: str) -> None:
        if method not in METHODS:
            raise ValueError(_unknown_method(method))
        self.method = method
        self._eq_ops = True  # S_EQ until the kernel says EINVAL, then S_GE + S_LE

    def __repr__(self) -> str:
        return f"Counter({self.method!r})"

    def count(self, ports: Sequence[int], idle_grace: float | None = None) -> Counts:
        """Count TCP sockets whose local port is in `ports`, in this network namespace.

        `idle_grace` (seconds) also counts ESTABLISHED ones idle that long (netlink only).
        Raises OSError when the kernel could not be read; a later call may well succeed.
        """
        wanted = sorted({_check_port(p) for p in ports})
        if not wanted:
            return Counts(ports={}, method=self.method)
        if self.method == "netlink":
            tallies = self._count_netlink(wanted, idle_grace)
        elif self.method == "proc":
            tallies = _count_proc(wanted)
        else:
            tallies = _count_psutil(wanted)
        return Counts(
            ports={port: PortCounts(*tallies[port]) for port in wanted}, method=self.method
        )

    def _count_netlink(self, ports: list[int], idle_grace: float | None) -> dict[int, list[int]]:
        try:
            return _count_netlink(ports, idle_grace, eq_ops=self._eq_ops)
        except OSError as exc:
            if not self._fall_back_from_eq(exc):
                raise
            return _count_netlink(ports, idle_grace, eq_ops=False)

    def _fall_back_from_eq(self, exc: OSError) -> bool:
        # Kernels before 4.17 lack INET_DIAG_BC_S_EQ and reject the whole program with EINVAL; a
        # port is also the range [P, P], which every kernel with inet_diag_req_v2 understands.
        if exc.errno != errno.EINVAL or not self._eq_ops:
            return False
        self._eq_ops = False
        return True

    def _probe(self) -> bool:
        """Whether this method sees a listener opened just now on loopback: one cheap request.

        It proves more than "no error": a sandbox that answers sock_diag with an empty dump
        would otherwise count zero connections forever, and end every drain at once.
        """
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
                listener.bind(("127.0.0.1", 0))
                listener.listen(1)
                port = listener.getsockname()[1]
                if self.method == "netlink":
                    try:
                        return _netlink_listeners(port, eq_ops=self._eq_ops) == 1
                    except OSError as exc:
                        if not self._fall_back_from_eq(exc):
                            raise
                        return _netlink_listeners(port, eq_ops=False) == 1
                if self.method == "proc":
                    return port in _listening_inodes_proc().values()
                self.count([port])  # psutil: no error is all that can be checked cheaply
                return True
        except OSError:
            return False


def make_counter(method: str = "auto") -> Counter:
    """A Counter for `method`: "auto", "netlink", "proc" or "psutil".

    "auto" takes the first of netlink and proc that sees a listener opened for the purpose on
    127.0.0.1 (see Counter._probe), else psutil's counter, unprobed: it is the last resort either
    way, and if it cannot read either, count() raises OSError and the caller retries.
    An unknown name raises ValueError.
    """
    if method != "auto":
        return Counter(method)
    for name in METHODS[:-1]:
        counter = Counter(name)
        if counter._probe():
            return counter
    return Counter("psutil")


def all_listening_ports() -> list[int]:
    """Every TCP port (IPv4 and IPv6) something listens on in this network namespace, sorted."""
    return sorted(set(_listening_inodes().values()))


# --- netlink -------------------------------------------------------------------------------


def _count_netlink(
    ports: list[int], idle_grace: float | None, *, eq_ops: bool
) -> dict[int, list[int]]:
    # established, close_wait, other, idle, close_wait_busy
    tallies = {port: [0, 0, 0, 0, 0] for port in ports}
    bytecode = _port_filter(ports, eq_ops=eq_ops)
    grace_ms = None if idle_grace is None else max(0.0, idle_grace) * 1000.0
    # tcp_info costs 200+ bytes per socket on the wire: without idle_grace, only the CLOSE_WAIT
    # sockets (few, and whether they hold depends on it) are dumped apart with it.
    info = 1 << (INET_DIAG_INFO - 1)
    if grace_ms is None:
        dumps = [(_COUNT_STATES & ~(1 << TCP_CLOSE_WAIT), 0), (1 << TCP_CLOSE_WAIT, info)]
    else:
        dumps = [(_COUNT_STATES, info)]
    with _diag_socket() as sock:
        for family in (socket.AF_INET, socket.AF_INET6):
            for states, ext in dumps:
                for buf, start, end, stride in _dump(sock, family, states, ext, bytecode):
                    if ext:
                        _tally_idle(buf, start, end, stride, tallies, grace_ms)
                    elif stride:
                        _tally_strided(buf, start, end, stride, tallies)
                    else:
                        _tally(buf, start, end, tallies)
    return tallies


def _tally_strided(
    buf: bytearray, start: int, end: int, stride: int, tallies: dict[int, list[int]]
) -> None:
    """Add a run of same-length replies to the tallies, without a Python loop per socket.

    Every reply in the run starts `stride` bytes after the previous one, so a field is one
    extended slice: idiag_state at +17, idiag_sport (big-endian) at +20 and +21.
    """
    states = buf[start + 17 : end : stride]
    port_hi = buf[start + 20 : end : stride]
    port_lo = buf[start + 21 : end : stride]
    total = len(states)
    if port_hi.count(port_hi[0]) == total and port_lo.count(port_lo[0]) == total:
        # One port in the whole run (always so when one port is drained): count states in C.
        tally = tallies.get(port_hi[0] << 8 | port_lo[0])
        if tally is not None:
            established = states.count(TCP_ESTABLISHED)
            close_wait = states.count(TCP_CLOSE_WAIT)
            tally[0] += established
            tally[1] += close_wait
            tally[2] += total - established - close_wait - states.count(TCP_LISTEN)
        return
    for (hi, lo, state), n in collections.Counter(
        zip(port_hi, port_lo, states, strict=True)
    ).items():
        _add(tallies.get(hi << 8 | lo), state, n)


def _tally(buf: bytearray, start: int, end: int, tallies: dict[int, list[int]]) -> None:
    """Add a run of replies of mixed lengths to the tallies, one socket at a time."""
    unpack = _REPLY.unpack_from
    off = start
    while off < end:
        length, state, port_hi, port_lo = unpack(buf, off)
        _add(tallies.get(port_hi << 8 | port_lo), state, 1)
        off += (length + 3) & ~3


def judge(
    state: int,
    rqueue: int,
    wqueue: int,
    since_sent: int,
    since_recv: int,
    grace_ms: float | None,
    segs_in: int = 0,
    segs_out: int = 0,
    since_ack_recv: int | None = None,
) -> str:
    """Whether one connection is busy, and why: "idle", or the reason it is busy.

    Pure: the fields come from inet_diag_msg (idiag_rqueue, idiag_wqueue) and tcp_info
    (tcpi_last_data_sent, tcpi_last_data_recv: ms since the last data segment each way;
    tcpi_data_segs_in, tcpi_data_segs_out: data segments each way, 0 when unknown). Busy:
    - "unread": bytes in the app's receive queue it has not read yet (a request waiting). In
      CLOSE_WAIT the client's FIN takes one unit of the queue until the app reads the end of
      the stream, so there it takes more than 1;
    - "unsent": bytes in its send queue the client has not acknowledged (an answer under way);
    - "unanswered": the last data came from the client after the last data the app sent (a
      request the app is still working on, however long it stays silent), or the client sent
      data and the app never sent any;
    - "active" (ESTABLISHED only): data either way within `grace_ms` (None: always active).
    Otherwise "idle": an ESTABLISHED connection quiet for the grace after its last answer, or a
    CLOSE_WAIT one whose client has its answer (or never asked) and left.

    Both timers start equal when the connection is set up (tcp_create_openreq_child() sets
    lsndtime and lrcvtime alike), so a connection that never carried data is not "unanswered".
    They tick in jiffies (1-10 ms): a first request that comes within the tick of the handshake
    is caught by the segment counts; a later one that comes within the tick the previous answer
    went out in looks answered, and then only the queues and the grace hold it, unless
    `since_ack_recv` (tcpi_last_ack_recv) is given: the client's acknowledgements order equal
    timers (an answer is acknowledged after it left; a request carries the acknowledgement of
    the answer before it), so with equal timers and no acknowledgement received since the
    client's last data, it may be a request: "unanswered" (--close-idle passes it, drain/closer.py).
    """
    if rqueue > (1 if state == TCP_CLOSE_WAIT else 0):
        return "unread"
    if wqueue:
        return "unsent"
    if since_recv < since_sent or (segs_in and not segs_out):
        return "unanswered"
    if since_ack_recv is not None and since_recv == since_sent and since_ack_recv >= since_recv:
        return "unanswered"
    if state == TCP_CLOSE_WAIT:
        return IDLE
    if grace_ms is None or since_sent < grace_ms:  # since_recv >= since_sent here
        return "active"
    return IDLE


IDLE = "idle"


def _tally_idle(
    buf: bytearray,
    start: int,
    end: int,
    stride: int,
    tallies: dict[int, list[int]],
    grace_ms: float | None,
) -> None:
    """Like _tally, and judges each ESTABLISHED and CLOSE_WAIT socket by its queues and
    tcp_info (see judge()): idle ESTABLISHED ones and busy CLOSE_WAIT ones are counted."""
    if stride and _tally_idle_strided(buf, start, end, stride, tallies, grace_ms):
        return
    info_at = 0  # where the last reply had INET_DIAG_INFO: replies of a kind share a layout
    for off, length in _replies(buf, start, end, stride):
        _length, state, port_hi, port_lo = _REPLY.unpack_from(buf, off)
        tally = tallies.get(port_hi << 8 | port_lo)
        _add(tally, state, 1)
        if tally is None or state not in (TCP_ESTABLISHED, TCP_CLOSE_WAIT):
            continue
        rqueue, wqueue = _QUEUES.unpack_from(buf, off + _QUEUES_AT)
        if not (info_at and _is_tcp_info(buf, off + info_at, off + length)):
            info_at = _find_tcp_info(buf, off + _REPLY_MIN, off + length) - off
            if info_at < 0:
                info_at = 0
                # No tcp_info: cannot tell. ESTABLISHED holds; CLOSE_WAIT by its queues only.
                if state == TCP_CLOSE_WAIT and (rqueue > 1 or wqueue):
                    tally[4] += 1
                continue
        sent, received, segs_in, segs_out = _timers(buf, off + info_at)
        verdict = judge(state, rqueue, wqueue, sent, received, grace_ms, segs_in, segs_out)
        if state == TCP_ESTABLISHED:
            if verdict == IDLE:
                tally[3] += 1
        elif verdict != IDLE:
            tally[4] += 1


def _tally_idle_strided(
    buf: bytearray,
    start: int,
    end: int,
    stride: int,
    tallies: dict[int, list[int]],
    grace_ms: float | None,
) -> bool:
    """_tally_idle for a run of same-length replies, reading each field as one strided slice.

    False (nothing counted) when tcp_info is not at the same offset in every reply.
    """
    states = buf[start + 17 : end : stride]
    if not states.count(TCP_ESTABLISHED) and not states.count(TCP_CLOSE_WAIT):
        _tally_strided(buf, start, end, stride, tallies)  # e.g. TIME_WAIT: no tcp_info to read
        return True
    info_at = _find_tcp_info(buf, start + _REPLY_MIN, start + stride) - start
    if info_at < 0 or (start + info_at) & 3:
        return False
    count = (end - start) // stride
    step = stride // 4
    grace = float("inf") if grace_ms is None else grace_ms
    idle: collections.Counter[int] = collections.Counter()
    busy: collections.Counter[int] = collections.Counter()
    with memoryview(buf) as raw, raw.cast("I") as words:

        def column(at: int) -> memoryview:  # the u32 at `at` in every reply of the run
            return words[(start + at) // 4 : end // 4 : step]

        header = buf[start + info_at : start + info_at + 4]
        if column(info_at).tobytes() != header * count:
            return False
        timers_at = info_at + 4 + _TCPI_LAST_DATA_AT
        segs_at = info_at + 4 + _TCPI_DATA_SEGS_AT
        if _U16.unpack_from(buf, start + info_at)[0] - 4 >= _TCPI_SEGS_MIN:
            segs_in, segs_out = column(segs_at).tolist(), column(segs_at + 4).tolist()
        else:
            segs_in = segs_out = [0] * count
        fields = zip(
            buf[start + 20 : end : stride],  # idiag_sport, high byte
            buf[start + 21 : end : stride],  # and low byte
            states,  # idiag_state
            column(_QUEUES_AT).tolist(),  # idiag_rqueue
            column(_QUEUES_AT + 4).tolist(),  # idiag_wqueue
            column(timers_at).tolist(),  # tcpi_last_data_sent
            column(timers_at + 8).tolist(),  # tcpi_last_data_recv
            segs_in,  # tcpi_data_segs_in
            segs_out,  # tcpi_data_segs_out
            strict=True,
        )
        # judge() inlined: idle = empty queues, not unanswered, received >= sent >= grace.
        for hi, lo, state, rqueue, wqueue, sent, received, seg_in, seg_out in fields:
            if state == TCP_ESTABLISHED:
                if (
                    not rqueue
                    and not wqueue
                    and received >= sent >= grace
                    and (seg_out or not seg_in)
                ):
                    idle[hi << 8 | lo] += 1
            elif state == TCP_CLOSE_WAIT and (
                rqueue > 1 or wqueue or received < sent or (seg_in and not seg_out)
            ):
                busy[hi << 8 | lo] += 1
    _tally_strided(buf, start, end, stride, tallies)
    for column_at, counted in ((3, idle), (4, busy)):
        for port, n in counted.items():
            tally = tallies.get(port)
            if tally is not None:
                tally[column_at] += n
    return True


class Connection:
    """One inbound connection on a drained port, as inflight() sees it."""

    __slots__ = ("cookie", "inode", "local", "reason", "remote", "state", "uid")

    def __init__(
        self,
        local: tuple[str, int],
        remote: tuple[str, int],
        state: int,
        inode: int,
        uid: int,
        cookie: int,
        reason: str,
    ) -> None:
        self.local = local
        self.remote = remote
        self.state = state  # TCP_ESTABLISHED or TCP_CLOSE_WAIT
        self.inode = inode  # the socket's inode: what /proc/PID/fd/N links name
        self.uid = uid
        self.cookie = cookie  # inet_diag's socket cookie: names this socket to the kernel
        self.reason = reason  # judge()'s verdict: "idle", or why it is busy

    @property
    def busy(self) -> bool:
        return self.reason != IDLE

    def __repr__(self) -> str:
        return (
            f"Connection({self.local[0]}:{self.local[1]} <- {self.remote[0]}:{self.remote[1]}, "
            f"state={self.state}, reason={self.reason!r})"
        )


def inflight(ports: Sequence[int], idle_grace: float | None) -> list[Connection]:
    """Every ESTABLISHED and CLOSE_WAIT connection whose local port is in `ports`, each judged
    busy or idle (judge()) with its reason, in this network namespace (netlink only).

    `idle_grace` (seconds): how long an ESTABLISHED connection must be quiet to be idle; None:
    never. A connection whose reply lacks tcp_info is judged by its queues alone, and an
    ESTABLISHED one then stays "active". Raises OSError when the kernel cannot be read.
    """
    wanted = sorted({_check_port(p) for p in ports})
    if not wanted:
        return []
    grace_ms = None if idle_grace is None else max(0.0, idle_grace) * 1000.0
    states = 1 << TCP_ESTABLISHED | 1 << TCP_CLOSE_WAIT
    found: list[Connection] = []
    with _diag_socket() as sock:
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                program = _port_filter(wanted)
                runs = list(_inflight_runs(sock, family, states, program, grace_ms))
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                program = _port_filter(wanted, eq_ops=False)  # before Linux 4.17
                runs = list(_inflight_runs(sock, family, states, program, grace_ms))
            found += runs
    return found


def _inflight_runs(
    sock: socket.socket, family: int, states: int, program: bytes, grace_ms: float | None
) -> Iterator[Connection]:
    for buf, start, end, stride in _dump(sock, family, states, 1 << (INET_DIAG_INFO - 1), program):
        for off, length in _replies(buf, start, end, stride):
            yield _connection(buf, off, length, grace_ms)


def _connection(buf: bytearray, off: int, length: int, grace_ms: float | None) -> Connection:
    """One reply (struct inet_diag_msg, then attributes) as a judged Connection."""
    msg = off + 16
    family, state = buf[msg], buf[msg + 1]
    sport, dport = struct.unpack_from(">HH", buf, msg + 4)
    size = 4 if family == socket.AF_INET else 16
    src = socket.inet_ntop(family, bytes(buf[msg + 8 : msg + 8 + size]))
    dst = socket.inet_ntop(family, bytes(buf[msg + 24 : msg + 24 + size]))
    (cookie,) = struct.unpack_from("=Q", buf, msg + 44)
    rqueue, wqueue = _QUEUES.unpack_from(buf, off + _QUEUES_AT)
    uid, inode = struct.unpack_from("=II", buf, msg + 64)
    info_at = _find_tcp_info(buf, off + _REPLY_MIN, off + length)
    if info_at < 0:
        sent = received = segs_in = segs_out = 0  # unknown: the queues decide...
        grace = None  # ...and ESTABLISHED stays active
    else:
        sent, received, segs_in, segs_out = _timers(buf, info_at)
        grace = grace_ms
    reason = judge(state, rqueue, wqueue, sent, received, grace, segs_in, segs_out)
    return Connection((src, sport), (dst, dport), state, inode, uid, cookie, reason)


def _add(tally: list[int] | None, state: int, n: int) -> None:
    if tally is None:
        return  # not a requested port: the kernel filtered already, this only guards
    if state == TCP_ESTABLISHED:
        tally[0] += n
    elif state == TCP_CLOSE_WAIT:
        tally[1] += n
    elif state != TCP_LISTEN:
        tally[2] += n


def _timers(buf: bytearray, at: int) -> tuple[int, int, int, int]:
    """(last_data_sent, last_data_recv, data_segs_in, data_segs_out) of the INET_DIAG_INFO
    attribute at `at` (checked by _is_tcp_info); the segment counts are 0 when it is too short."""
    sent, received = _TCPI_LAST_DATA.unpack_from(buf, at + 4 + _TCPI_LAST_DATA_AT)
    if _U16.unpack_from(buf, at)[0] - 4 >= _TCPI_SEGS_MIN:
        segs_in, segs_out = _TCPI_DATA_SEGS.unpack_from(buf, at + 4 + _TCPI_DATA_SEGS_AT)
        return sent, received, segs_in, segs_out
    return sent, received, 0, 0


def _is_tcp_info(buf: bytearray, at: int, end: int) -> bool:
    """Whether the attribute at `at` is INET_DIAG_INFO, long enough for the timers we read."""
    if at + 4 > end:
        return False
    nla_len, nla_type = _NLATTR.unpack_from(buf, at)
    # tcp_info only grows (linux/tcp.h appends fields), so older kernels' shorter ones still fit.
    return bool(nla_type & NLA_TYPE_MASK == INET_DIAG_INFO and _TCPI_MIN <= nla_len - 4)


def _find_tcp_info(buf: bytearray, at: int, end: int) -> int:
    """Offset of the INET_DIAG_INFO attribute among the attributes in [at, end), or -1."""
    while at + 4 <= end:
        nla_len, _nla_type = _NLATTR.unpack_from(buf, at)
        if nla_len < 4 or at + nla_len > end:
            break
        if _is_tcp_info(buf, at, end):
            return at
        at += (nla_len + 3) & ~3
    return -1


def _replies(buf: bytearray, start: int, end: int, stride: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each reply in a run from _dump."""
    if stride:
        for off in range(start, end, stride):
            yield off, stride
        return
    off = start
    while off < end:
        (length,) = _U32.unpack_from(buf, off)
        yield off, length
        off += (length + 3) & ~3


def _netlink_listeners(port: int, *, eq_ops: bool) -> int:
    """How many IPv4 listeners on `port` a LISTEN dump filtered in the kernel returns."""
    found = 0
    with _diag_socket() as sock:
        bytecode = _port_filter([port], eq_ops=eq_ops)
        for buf, start, end, stride in _dump(sock, socket.AF_INET, _LISTEN_STATES, 0, bytecode):
            found += sum(1 for _reply in _replies(buf, start, end, stride))
    return found


def _listening_inodes_netlink() -> dict[int, int]:
    inodes: dict[int, int] = {}
    with _diag_socket() as sock:
        for family in (socket.AF_INET, socket.AF_INET6):
            for buf, start, end, stride in _dump(sock, family, _LISTEN_STATES, 0, None):
                for off, _length in _replies(buf, start, end, stride):
                    _length, _state, port_hi, port_lo = _REPLY.unpack_from(buf, off)
                    (inode,) = _U32.unpack_from(buf, off + 16 + 68)  # idiag_inode
                    inodes[inode] = port_hi << 8 | port_lo
    return inodes


def _diag_socket() -> socket.socket:
    # sock_diag(7): a raw AF_NETLINK socket of protocol NETLINK_SOCK_DIAG. Unprivileged users may
    # dump; a sandbox may refuse the protocol (EPROTONOSUPPORT), which sends "auto" to /proc.
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
    )
    # A dump that stalls must not stall the supervisor's loop: TimeoutError is an OSError, which
    # the caller logs and retries like any failed count.
    sock.settimeout(_NETLINK_TIMEOUT)
    return sock


def _dump(
    sock: socket.socket, family: int, states: int, ext: int, bytecode: bytes | None
) -> Iterator[tuple[bytearray, int, int, int]]:
    """Send one SOCK_DIAG_BY_FAMILY dump request for TCP; yield its inet_diag_msg replies as
    runs (buffer, start, end, stride) until NLMSG_DONE. NLMSG_ERROR becomes OSError.

    stride > 0: the run's replies all have that length (checked), so fields can be sliced out;
    0: walk them by nlmsg_len. The buffer is reused: consume a run before asking for the next.
    """
    payload = _REQ_V2.pack(family, socket.IPPROTO_TCP, ext, 0, states)
    if bytecode is not None:
        payload += _NLATTR.pack(_NLATTR.size + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode
    flags = NLM_F_REQUEST | NLM_F_DUMP
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), SOCK_DIAG_BY_FAMILY, flags, 1, 0)
    sock.send(header + payload)
    buf = bytearray(_RECV_BUFSIZE)
    view = memoryview(buf)
    lengths, types = view.cast("I"), view.cast("H")
    while True:
        # MSG_TRUNC makes recv return the datagram's real length, so a cut one is detected.
        size = sock.recv_into(buf, _RECV_BUFSIZE, socket.MSG_TRUNC)
        if size > _RECV_BUFSIZE:
            raise OSError(errno.EMSGSIZE, f"sock_diag reply of {size} bytes truncated")
        off = run = _uniform_prefix(buf, size, lengths, types)
        if run:
            yield buf, 0, run, lengths[0]
        while off + _NLMSGHDR.size <= size:
            length, msg_type = _NLMSGHDR_HEAD.unpack_from(buf, off)
            if length < _NLMSGHDR.size or off + length > size:
                raise OSError(errno.EBADMSG, "malformed sock_diag reply")
            if msg_type == SOCK_DIAG_BY_FAMILY and length >= _REPLY_MIN:
                off += (length + 3) & ~3
                continue
            if off > run:
                yield buf, run, off, 0
            if msg_type in (NLMSG_DONE, NLMSG_ERROR):
                # Both carry an int: 0, or a negative errno (for ERROR, struct nlmsgerr's error).
                code = -_I32.unpack_from(buf, off + 16)[0] if length >= 20 else 0
                if msg_type == NLMSG_ERROR or code:
                    raise OSError(code, f"sock_diag: {os.strerror(code)}")
                return
            off += (length + 3) & ~3  # anything else (NLMSG_NOOP...) is skipped
            run = off
        if size > run:
            yield buf, run, size, 0


def _uniform_prefix(buf: bytearray, size: int, lengths: memoryview, types: memoryview) -> int:
    """Bytes at the start of `buf` that hold replies all as long as the first one, else 0.

    The ESTABLISHED sockets of one family carry the same attributes, so a dump's datagrams are
    mostly such runs. If the message at k * L has length L for every k, the messages do sit at
    those offsets (by induction from 0): checking each nlmsg_len and nlmsg_type (one strided
    copy each, in C) proves the layout.
    """
    if size < 2 * _REPLY_MIN:
        return 0
    stride = lengths[0]
    if stride < _REPLY_MIN or stride & 3 or types[2] != SOCK_DIAG_BY_FAMILY:
        return 0
    count = size // stride
    end = count * stride
    if lengths[0 : end // 4 : stride // 4].tobytes() != _U32.pack(stride) * count:
        return 0
    if types[2 : end // 2 : stride // 2].tobytes() != _U16.pack(SOCK_DIAG_BY_FAMILY) * count:
        return 0
    return end


def _port_filter(ports: Sequence[int], *, eq_ops: bool = True) -> bytes:
    """inet_diag bytecode that accepts a socket whose local port is one of `ports`.

    The program (linux/inet_diag.h; run by inet_diag_bc_run() in net/ipv4/inet_diag.c) is a list
    of struct inet_diag_bc_op {code, yes, no}: each op jumps `yes` or `no` bytes ahead, and the
    socket is accepted when a jump lands exactly on the end, rejected when it lands 4 bytes past
    it. A port comparison is two ops, the second holding the port in `no`. Like ss's
    `sport = :A or sport = :B`, each port is one test; a match jumps (through a JMP) to the end,
    a miss falls to the next test, and a miss in the last test jumps past the end.
    `eq_ops=False` spells each test as S_GE P then S_LE P, for kernels without S_EQ.
    """
    tests: list[list[tuple[int, int]]] = []
    for port in ports:
        if eq_ops:
            tests.append([(INET_DIAG_BC_S_EQ, port)])
        else:
            tests.append([(INET_DIAG_BC_S_GE, port), (INET_DIAG_BC_S_LE, port)])
    # Each comparison is 8 bytes; every test but the last is followed by a 4-byte JMP.
    sizes = [8 * len(test) + (4 if i < len(tests) - 1 else 0) for i, test in enumerate(tests)]
    total = sum(sizes)
    out = bytearray()
    for test, size in zip(tests, sizes, strict=True):
        next_test = len(out) + size  # where a miss goes; == total + 4 (reject) after the last
        if next_test == total:
            next_test = total + 4
        for code, port in test:
            here = len(out)
            out += _BC_OP.pack(code, 8, next_test - here)
            out += _BC_OP.pack(0, 0, port)  # the operand: the port, host order, in `no`
        if len(out) < total:
            # The audit (inet_diag_bc_audit) wants `yes` >= 4 even though JMP never takes it.
            out += _BC_OP.pack(INET_DIAG_BC_JMP, 4, total - len(out))
    return bytes(out)


# --- /proc/net/tcp ---------------------------------------------------------------------------

_PROC_FILES = ("/proc/net/tcp", "/proc/net/tcp6")


def _count_proc(ports: list[int]) -> dict[int, list[int]]:
    tallies = {port: [0, 0, 0, 0, 0] for port in ports}
    for path in _PROC_FILES:
        _tally_proc_lines(_read_proc(path) or [], tallies)
    return tallies


def _tally_proc_lines(lines: Sequence[bytes], tallies: dict[int, list[int]]) -> None:
    """Add the sockets listed in /proc/net/tcp or tcp6 text (header line first) to the tallies.

    proc(5): "sl local_address rem_address st ..." with addresses as HEXIP:HEXPORT and the state
    as two hex digits. The port and the state are compared as text: no int() per line.

    The kernel makes this file about a page per read(), and each read resumes its walk of the
    socket hash by position (tcp_seek_last_pos() in net/ipv4/tcp_ipv4.c): sockets opened or
    closed meanwhile can make a line come twice (seen here: 30008 of 30000) or not at all.
    A socket is one local and remote address pair, so repeats are dropped; a miss cannot be
    seen, and the next count has it.
    """
    by_hex = {b"%04X" % port: tally for port, tally in tallies.items()}
    seen: set[tuple[bytes, bytes]] = set()
    established = b"%02X" % TCP_ESTABLISHED
    close_wait = b"%02X" % TCP_CLOSE_WAIT
    listen = b"%02X" % TCP_LISTEN
    for line in lines[1:]:
        fields = line.split(None, 5)  # sl, local_address, rem_address, st, queues, the rest
        if len(fields) < 4:
            continue
        tally = by_hex.get(fields[1][-4:])
        if tally is None:
            continue
        pair = (fields[1], fields[2])
        if pair in seen:
            continue
        seen.add(pair)
        state = fields[3]
        if state == established:
            tally[0] += 1
        elif state == close_wait:
            tally[1] += 1
            # tx_queue:rx_queue, hex: bytes unacknowledged, bytes unread. With no timers here,
            # a CLOSE_WAIT connection holds only while one of them is not empty (judge()).
            if len(fields) > 4 and _close_wait_busy(fields[4]):
                tally[4] += 1
        elif state != listen:
            tally[2] += 1


def _close_wait_busy(queues: bytes) -> bool:
    """From /proc/net/tcp's "tx_queue:rx_queue" (hex) of a CLOSE_WAIT socket: bytes
    unacknowledged, or unread beyond the FIN's one (judge())."""
    tx, _, rx = queues.partition(b":")
    try:
        return int(tx, 16) > 0 or int(rx, 16) > 1
    except ValueError:
        return False


def _listening_inodes_proc() -> dict[int, int]:
    inodes: dict[int, int] = {}
    for path in _PROC_FILES:
        inodes.update(_listeners_from_proc_lines(_read_proc(path) or []))
    return inodes


def _listeners_from_proc_lines(lines: Sequence[bytes]) -> dict[int, int]:
    """inode -> port of the LISTEN sockets in /proc/net/tcp or tcp6 text (header line first)."""
    inodes: dict[int, int] = {}
    listen = b"%02X" % TCP_LISTEN
    for line in lines[1:]:
        fields = line.split(None, 10)  # ... st(3) queues(4) timer(5) retrnsmt(6) uid timeout inode
        if len(fields) > 9 and fields[3] == listen:
            inodes[int(fields[9])] = int(fields[1][-4:], 16)
    return inodes


def _read_proc(path: str) -> list[bytes] | None:
    """The lines of a /proc/net file; None when the file does not exist (tcp6 without IPv6)."""
    try:
        with open(path, "rb", buffering=0) as f:
            return f.readall().splitlines()
    except FileNotFoundError:
        if path.endswith("6"):
            return None
        raise


def _listening_inodes() -> dict[int, int]:
    """inode -> port for every TCP listener in this namespace (netlink, else /proc)."""
    try:
        return _listening_inodes_netlink()
    except OSError:
        return _listening_inodes_proc()


def _socket_inodes(pid: int) -> Iterator[int]:
    """Socket inodes among `pid`'s open files; nothing when it is gone or unreadable."""
    try:
        fd_dir = os.open(f"/proc/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        names = os.listdir(fd_dir)
        for name in names:
            try:
                # readlink relative to the open directory: no path walk per fd.
                target = os.readlink(name, dir_fd=fd_dir)
            except OSError:
                continue  # closed since listdir
            if target.startswith("socket:["):
                yield int(target[8:-1])
    except OSError:
        return
    finally:
        os.close(fd_dir)


# --- psutil ----------------------------------------------------------------------------------


def _count_psutil(ports: list[int]) -> dict[int, list[int]]:
    import psutil  # lazily: see the module docstring

    tallies = {port: [0, 0, 0, 0, 0] for port in ports}
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.Error as exc:
        raise OSError(errno.EIO, f"psutil.net_connections: {exc}") from exc
    for conn in connections:
        tally = tallies.get(conn.laddr.port) if conn.laddr else None
        if tally is None:
            continue
        if conn.status == psutil.CONN_ESTABLISHED:
            tally[0] += 1
        elif conn.status == psutil.CONN_CLOSE_WAIT:
            tally[1] += 1
        elif conn.status != psutil.CONN_LISTEN:
            tally[2] += 1
    return tallies


# --- helpers ---------------------------------------------------------------------------------


def _check_port(port: int) -> int:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"not a TCP port: {port}")
    return port


def _unknown_method(method: str) -> str:
    return f"unknown connection count method {method!r}: use auto, " + ", ".join(METHODS)
