"""Pure logic of auto ports and in-flight truth: the parsers and the busy/idle rule, with
Hypothesis; the kernel's layouts are built here byte by byte (linux/inet_diag.h, linux/tcp.h,
proc(5)). The real processes and sockets are in tests/test_discovery.py and test_connections.py.
"""

from __future__ import annotations

import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from drainctl.drain import connections as conn
from drainctl.drain import discovery
from drainctl.drain.connections import TCP_CLOSE_WAIT, TCP_ESTABLISHED, judge

u32 = st.integers(0, 2**32 - 1)
ports = st.integers(0, 65535)

# ---- /proc/PID/stat and status ------------------------------------------------------------------

# comm is at most 15 bytes and may hold anything but NUL, spaces and parentheses included.
comms = st.binary(min_size=0, max_size=15).filter(lambda b: b"\0" not in b)


@given(pid=st.integers(1, 2**22), comm=comms, state=st.sampled_from(b"RSDZTtXI"),
       ppid=st.integers(0, 2**22), rest=st.lists(st.integers(0, 2**40), max_size=40))
def test_stat_ppid_whatever_the_command_name(
    pid: int, comm: bytes, state: int, ppid: int, rest: list[int]
) -> None:
    line = b"%d (%s) %c %d " % (pid, comm, state, ppid) + b" ".join(b"%d" % r for r in rest)
    assert discovery.parse_stat_ppid(line + b"\n") == ppid


def test_stat_ppid_of_a_malformed_line_is_a_value_error() -> None:
    for bad in (b"", b"12 (x", b"12 (x) S"):
        try:
            discovery.parse_stat_ppid(bad)
        except ValueError:
            continue
        raise AssertionError(bad)


@given(uids=st.lists(st.integers(0, 2**32 - 2), min_size=4, max_size=4),
       state=st.sampled_from([b"R (running)", b"S (sleeping)", b"Z (zombie)", b"D (disk sleep)"]))
def test_status_uids(uids: list[int], state: bytes) -> None:
    text = (b"Name:\tpython3\nUmask:\t0022\nState:\t" + state + b"\nTgid:\t7\nPid:\t7\n"
            b"Uid:\t" + b"\t".join(b"%d" % u for u in uids) + b"\nGid:\t0\t0\t0\t0\n")
    expected = None if state.startswith(b"Z") else set(uids)
    assert discovery.parse_status_uids(text) == expected


# ---- listeners: /proc/net/tcp and sock_diag -----------------------------------------------------

sockets = st.lists(
    st.tuples(ports, u32, st.integers(0, 2**31), st.sampled_from([1, 6, 8, 10])),
    max_size=30)


@given(sockets, st.booleans())
def test_proc_listeners_are_the_listen_lines(
    rows: list[tuple[int, int, int, int]], v6: bool
) -> None:
    address = "00000000000000000000000001000000" if v6 else "0100007F"
    lines = [b"  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
             b"   uid  timeout inode"]
    for i, (port, uid, inode, state) in enumerate(rows):
        lines.append((f"{i:4d}: {address}:{port:04X} {address}:0000 {state:02X} "
                      f"00000000:00000000 00:00000000 00000000 {uid:5d}        0 {inode} 1 "
                      "0000000000000000 100 0 0 10 0").encode())
    found = discovery.parse_proc_listeners(lines)
    assert found == [discovery.Listener(inode, port, uid)
                     for port, uid, inode, state in rows if state == 10]


@given(port=ports, uid=u32, inode=u32, family=st.sampled_from([socket.AF_INET, socket.AF_INET6]))
def test_diag_listener_fields(port: int, uid: int, inode: int, family: int) -> None:
    msg = struct.pack("=BBBB", family, 10, 0, 0) + struct.pack(">HH", port, 0)
    msg += bytes(32 + 4 + 8)  # src, dst, if, cookie
    msg += struct.pack("=IIIII", 0, 0, 0, uid, inode)  # expires, rqueue, wqueue, uid, inode
    reply = struct.pack("=IHHII", 16 + len(msg), conn.SOCK_DIAG_BY_FAMILY, 2, 1, 0) + msg
    assert len(msg) == 72
    assert discovery.parse_diag_listener(bytearray(b"pad!" + reply), 4) == discovery.Listener(
        inode, port, uid)


# ---- the process tree ---------------------------------------------------------------------------


@given(st.dictionaries(st.integers(2, 60), st.integers(0, 60), max_size=50), st.integers(0, 60))
def test_descendants_are_everything_below_the_root(parents: dict[int, int], root: int) -> None:
    def below(pid: int, seen: frozenset[int]) -> set[int]:
        found: set[int] = set()
        for child, parent in parents.items():
            if parent == pid and child not in seen and child != root:
                found |= {child} | below(child, seen | {child})
        return found

    got = discovery._descendants(root, parents)
    assert len(got) == len(set(got))
    assert set(got) == below(root, frozenset({root}))


# ---- in-flight truth ----------------------------------------------------------------------------

states = st.sampled_from([TCP_ESTABLISHED, TCP_CLOSE_WAIT])
ms = st.integers(0, 10**7)
graces = st.one_of(st.none(), st.floats(0, 10**6, allow_nan=False))


@given(states, st.integers(0, 2**20), st.integers(0, 2**20), ms, ms, graces, ms, ms)
def test_judge_busy_reasons(
    state: int, rqueue: int, wqueue: int, sent: int, received: int, grace: float | None,
    segs_in: int, segs_out: int,
) -> None:
    reason = judge(state, rqueue, wqueue, sent, received, grace, segs_in, segs_out)
    unread = rqueue > (1 if state == TCP_CLOSE_WAIT else 0)
    unanswered = received < sent or (segs_in > 0 and segs_out == 0)
    if unread:
        assert reason == "unread"
    elif wqueue:
        assert reason == "unsent"
    elif unanswered:
        assert reason == "unanswered"  # however long ago: a silent request is never idle
    elif state == TCP_CLOSE_WAIT:
        assert reason == "idle"  # answered and the client left: holds nothing
    elif grace is None or sent < grace:
        assert reason == "active"
    else:
        assert reason == "idle"


def test_judge_the_cases_by_name() -> None:
    grace = 1000.0
    # A request read, the app working for 4 s without a byte: the last data came in.
    assert judge(TCP_ESTABLISHED, 0, 0, 4100, 4000, grace, 1, 1) == "unanswered"
    # A first request within the handshake's tick: equal timers, data in, nothing out yet.
    assert judge(TCP_ESTABLISHED, 0, 0, 4000, 4000, grace, 1, 0) == "unanswered"
    # Connected and never a word: idle after the grace.
    assert judge(TCP_ESTABLISHED, 0, 0, 4000, 4000, grace, 0, 0) == "idle"
    # Answered 4 s ago, keep-alive: idle; answered 0.5 s ago: active.
    assert judge(TCP_ESTABLISHED, 0, 0, 4000, 4100, grace, 2, 2) == "idle"
    assert judge(TCP_ESTABLISHED, 0, 0, 500, 600, grace, 2, 2) == "active"
    # Half-closed: the FIN alone is one unit of the receive queue.
    assert judge(TCP_CLOSE_WAIT, 1, 0, 4000, 4100, grace, 2, 2) == "idle"
    assert judge(TCP_CLOSE_WAIT, 1, 0, 4100, 4000, grace, 2, 1) == "unanswered"
    assert judge(TCP_CLOSE_WAIT, 30, 0, 4000, 4000, grace, 1, 0) == "unread"
    # Equal timers after data both ways (one clock tick): the acknowledgements decide, when
    # given. An acknowledgement since the client's last data: the answer came last.
    assert judge(TCP_ESTABLISHED, 0, 0, 4000, 4000, grace, 2, 2, since_ack_recv=3990) == "idle"
    # None since: it may be a request sent in the tick the answer left in.
    assert judge(TCP_ESTABLISHED, 0, 0, 4000, 4000, grace, 2, 2,
                 since_ack_recv=4000) == "unanswered"
    # Without the acknowledgement's timer (the counts), equal timers look answered.
    assert judge(TCP_ESTABLISHED, 0, 0, 4000, 4000, grace, 2, 2) == "idle"


TCP_INFO_LEN = 232  # struct tcp_info of Linux 6.x; anything from 160 on carries every field read


def reply(state: int, port: int, rqueue: int, wqueue: int, sent: int, received: int,
          segs_in: int, segs_out: int) -> bytes:
    """One SOCK_DIAG_BY_FAMILY reply with INET_DIAG_INFO, as the kernel lays it out."""
    msg = struct.pack("=BBBB", socket.AF_INET, state, 0, 0) + struct.pack(">HH", port, 40000)
    msg += bytes(32 + 4 + 8)
    msg += struct.pack("=IIIII", 0, rqueue, wqueue, 0, 0)
    info = bytearray(TCP_INFO_LEN)
    struct.pack_into("=I", info, 44, sent)
    struct.pack_into("=I", info, 52, received)
    struct.pack_into("=II", info, 152, segs_in, segs_out)
    attr = struct.pack("=HH", 4 + TCP_INFO_LEN, conn.INET_DIAG_INFO) + bytes(info)
    body = msg + attr
    return struct.pack("=IHHII", 16 + len(body), conn.SOCK_DIAG_BY_FAMILY, 2, 1, 0) + body


# Few distinct values, so that every branch of the rule (equal timers, a FIN-only queue, no data
# out yet...) comes up often.
timer = st.sampled_from([0, 500, 1000, 1500, 3000])
rows = st.lists(
    st.tuples(st.sampled_from([TCP_ESTABLISHED, TCP_CLOSE_WAIT, 6, 4]), st.sampled_from([80, 81]),
              st.sampled_from([0, 0, 1, 2]), st.sampled_from([0, 0, 1]), timer, timer,
              st.sampled_from([0, 1, 2]), st.sampled_from([0, 0, 1])),
    min_size=1, max_size=25)


@settings(max_examples=300)
@given(rows, st.one_of(st.none(), st.sampled_from([0.0, 1000.0, 2500.0])))
def test_fast_and_walked_tallies_agree_with_judge(
    replies: list[tuple[int, int, int, int, int, int, int, int]], grace: float | None
) -> None:
    chunk = b"".join(reply(*r) for r in replies)
    stride = len(reply(*replies[0]))

    def fresh() -> dict[int, list[int]]:
        return {80: [0] * 5, 81: [0] * 5}

    strided, walked = fresh(), fresh()
    conn._tally_idle(bytearray(chunk), 0, len(chunk), stride, strided, grace)
    conn._tally_idle(bytearray(chunk), 0, len(chunk), 0, walked, grace)
    expected = fresh()
    for state, port, rq, wq, sent, received, s_in, s_out in replies:
        tally = expected[port]
        verdict = judge(state, rq, wq, sent, received, grace, s_in, s_out)
        if state == TCP_ESTABLISHED:
            tally[0] += 1
            tally[3] += verdict == "idle"
        elif state == TCP_CLOSE_WAIT:
            tally[1] += 1
            tally[4] += verdict != "idle"
        else:
            tally[2] += 1
    assert strided == walked == expected


@given(st.integers(0, 2**20), st.integers(0, 2**20))
def test_proc_close_wait_queues(tx: int, rx: int) -> None:
    busy = conn._close_wait_busy(b"%08X:%08X" % (tx, rx))
    assert busy == (tx > 0 or rx > 1)
