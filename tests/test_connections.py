"""The connection counter against real loopback sockets, with `ss` as the reference count.

Every test opens its own listeners on free ports (127.0.0.1 and ::1), so other sockets on the
machine never change its numbers, and closes what it opened. Nothing is mocked: the pure-logic
tests feed the parsers bytes shaped like the kernel's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from drainctl.drain import connections as conn
from drainctl.drain.connections import (
    METHODS,
    Counter,
    Counts,
    PortCounts,
    all_listening_ports,
    make_counter,
)
from drainctl.drain.discovery import listening_ports
from tests.conftest import wait_for

T = TypeVar("T")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


HAS_IPV6 = _ipv6_loopback()
needs_ipv6 = pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback (::1) here")
needs_ss = pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")


# --- helpers ---------------------------------------------------------------------------------


class Sockets:
    """Every socket a test opens, closed at teardown with an RST (SO_LINGER 0), so no FIN_WAIT or
    TIME_WAIT sockets outlive the test."""

    def __init__(self) -> None:
        self._open: list[socket.socket] = []

    def keep(self, sock: socket.socket) -> socket.socket:
        self._open.append(sock)
        return sock

    def listener(self, host: str = "127.0.0.1", port: int = 0) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = self.keep(socket.socket(family, socket.SOCK_STREAM))
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(128)
        return sock

    def pair(self, listener: socket.socket) -> tuple[socket.socket, socket.socket]:
        """(client, server) of one new connection to `listener`."""
        host, port = listener.getsockname()[:2]
        client = self.keep(socket.create_connection((host, port), timeout=5))
        server, _addr = listener.accept()
        return client, self.keep(server)

    def close_all(self) -> None:
        for sock in reversed(self._open):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        self._open.clear()


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    opened = Sockets()
    try:
        yield opened
    finally:
        opened.close_all()


def port_of(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


def dual_listeners(sockets: Sockets) -> tuple[int, socket.socket, socket.socket | None]:
    """A port with a listener on 127.0.0.1 and, where IPv6 works, another on ::1."""
    for _ in range(20):
        v4 = sockets.listener("127.0.0.1")
        if not HAS_IPV6:
            return port_of(v4), v4, None
        try:
            v6 = sockets.listener("::1", port_of(v4))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            continue  # that port is taken on ::1: try another
        return port_of(v4), v4, v6
    raise AssertionError("no port free on both 127.0.0.1 and ::1")


def ss_established(port: int) -> int:
    """The reference: the count the contract promises to match."""
    out = subprocess.run(
        f"ss -Htn state established '( sport = :{port} )' | wc -l",
        shell=True,
        check=True,
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    return int(out)


def eventually(probe: Callable[[], T], done: Callable[[T], bool], timeout: float = 3.0) -> T:
    """Poll `probe` until `done` holds of its value (a state change on loopback is quick, but
    not synchronous with close()); return the last value either way."""
    deadline = time.monotonic() + timeout
    value = probe()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.02)
        value = probe()
    return value


# --- counting --------------------------------------------------------------------------------


@needs_ss
@pytest.mark.parametrize("method", METHODS)
def test_counts_established_v4_and_v6_like_ss(sockets: Sockets, method: str) -> None:
    port, v4, v6 = dual_listeners(sockets)
    clients = [sockets.pair(v4)[0] for _ in range(5)]
    if v6 is not None:
        clients += [sockets.pair(v6)[0] for _ in range(3)]
    expected = 8 if v6 is not None else 5

    counts = Counter(method).count([port])

    assert counts.method == method
    assert counts.ports == {port: PortCounts(established=expected)}
    assert counts.established == counts.holding == expected
    assert ss_established(port) == expected
    # The client ends have the drained port as their *remote* port: never counted on it; on
    # their own (ephemeral) local port each is one established connection.
    client_port = port_of(clients[0])
    assert Counter(method).count([client_port]).ports[client_port].established == 1


@pytest.mark.parametrize("method", METHODS)
def test_counts_each_requested_port_even_when_zero(sockets: Sockets, method: str) -> None:
    first, second = sockets.listener(), sockets.listener()
    for _ in range(2):
        sockets.pair(first)
    sockets.pair(second)
    unused = port_of(sockets.listener())  # listening, never connected: LISTEN is not counted

    ports = [port_of(second), port_of(first), unused, port_of(first)]  # duplicate on purpose
    counts = Counter(method).count(ports)

    assert counts.ports == {
        port_of(first): PortCounts(established=2),
        port_of(second): PortCounts(established=1),
        unused: PortCounts(),
    }
    assert counts.established == 3


@pytest.mark.parametrize("method", METHODS)
def test_no_ports_is_an_empty_count(method: str) -> None:
    assert Counter(method).count([]) == Counts(ports={}, method=method)


def test_a_port_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="not a TCP port"):
        Counter("netlink").count([70000])


@pytest.mark.parametrize("method", METHODS)
def test_half_closed_and_closing_connections_are_reported_apart(
    sockets: Sockets, method: str
) -> None:
    listener = sockets.listener()
    port = port_of(listener)
    sockets.pair(listener)  # stays established
    peer_closed_client, _server = sockets.pair(listener)
    _client, server_closing = sockets.pair(listener)
    counter = Counter(method)

    # The client closes and the server does not: the server's end sits in CLOSE_WAIT, which never
    # holds a drain (the app has yet to notice the peer left).
    peer_closed_client.close()
    # The server closes first and the client does not: the server's end goes FIN_WAIT2: "other".
    server_closing.shutdown(socket.SHUT_WR)

    counts = eventually(
        lambda: counter.count([port]).ports[port],
        lambda p: p.close_wait == 1 and p.other == 1,
    )
    assert counts == PortCounts(established=1, close_wait=1, other=1)


@needs_ss
def test_netlink_counts_mixed_reply_lengths(sockets: Sockets) -> None:
    """TIME_WAIT replies are shorter than ESTABLISHED ones: one dump mixes lengths, which takes
    the reply-by-reply path instead of the strided one; both must agree with ss."""
    listener = sockets.listener()
    port = port_of(listener)
    for _ in range(30):
        sockets.pair(listener)
    for _ in range(10):
        client, server = sockets.pair(listener)
        server.close()  # the server closes first and ends in TIME_WAIT
        client.close()
    counter = Counter("netlink")

    counts = eventually(lambda: counter.count([port]).ports[port], lambda p: p.other == 10)

    assert counts == PortCounts(established=30, other=10)
    assert ss_established(port) == 30
    assert Counter("proc").count([port]).ports[port] == counts


def test_netlink_ge_le_filter_counts_like_eq(sockets: Sockets) -> None:
    """The S_GE/S_LE spelling of the kernel filter (kernels before 4.17) counts the same."""
    listeners = [sockets.listener() for _ in range(3)]
    for n, listener in enumerate(listeners):
        for _ in range(n + 1):
            sockets.pair(listener)
    ports = [port_of(listener) for listener in listeners] + [1, 2, 3]

    with_eq = conn._count_netlink(sorted(ports), None, eq_ops=True)
    with_ranges = conn._count_netlink(sorted(ports), None, eq_ops=False)

    assert with_eq == with_ranges
    assert [with_eq[port_of(listener)][0] for listener in listeners] == [1, 2, 3]


def test_netlink_error_reply_is_an_oserror() -> None:
    # An unknown bytecode op: inet_diag_bc_audit() refuses the request with EINVAL, which
    # arrives as an NLMSG_ERROR reply.
    bogus = conn._BC_OP.pack(0xFF, 4, 8)
    with conn._diag_socket() as sock, pytest.raises(OSError) as caught:
        list(conn._dump(sock, socket.AF_INET, conn._COUNT_STATES, 0, bogus))
    assert caught.value.errno == errno.EINVAL


# --- idle ------------------------------------------------------------------------------------


def test_idle_grace_counts_quiet_connections_only(sockets: Sockets) -> None:
    listener = sockets.listener()
    port = port_of(listener)
    sockets.pair(listener)  # quiet from the start
    busy_client, busy_server = sockets.pair(listener)
    unread_client, _unread_server = sockets.pair(listener)
    unread_client.sendall(
        b"never read"
    )  # the server never reads it: its receive queue is not empty
    stop = threading.Event()

    def chatter() -> None:  # data both ways every 50 ms; each side reads what it gets
        while not stop.is_set():
            busy_client.sendall(b"ping")
            busy_server.recv(64)
            busy_server.sendall(b"pong")
            busy_client.recv(64)
            stop.wait(0.05)

    thread = threading.Thread(target=chatter, daemon=True)
    thread.start()
    try:
        time.sleep(0.6)  # twice the grace below
        counts = Counter("netlink").count([port], idle_grace=0.3)
    finally:
        stop.set()
        thread.join(timeout=5)

    assert counts.ports[port] == PortCounts(established=3, idle=1)
    assert counts.holding == 2
    # Without a grace, nothing is idle; a grace longer than the quiet so far: nothing yet either.
    assert Counter("netlink").count([port]).ports[port].idle == 0
    assert Counter("netlink").count([port], idle_grace=60).ports[port].idle == 0


@pytest.mark.parametrize("method", ["proc", "psutil"])
def test_idle_is_unknown_without_netlink(sockets: Sockets, method: str) -> None:
    listener = sockets.listener()
    sockets.pair(listener)
    port = port_of(listener)
    # No timers in /proc/net/tcp: every established connection holds, as documented.
    assert Counter(method).count([port], idle_grace=0.0).ports[port] == PortCounts(established=1)


def test_idle_grace_zero_counts_every_quiet_connection(sockets: Sockets) -> None:
    listener = sockets.listener()
    port = port_of(listener)
    for _ in range(4):
        sockets.pair(listener)
    counts = Counter("netlink").count([port], idle_grace=0.0)
    assert counts.ports[port] == PortCounts(established=4, idle=4)
    assert counts.holding == 0


def test_inflight_judges_each_connection_with_its_reason(sockets: Sockets) -> None:
    listener = sockets.listener()
    port = port_of(listener)

    def reasons() -> dict[int, str]:  # client's port -> verdict
        return {c.remote[1]: c.reason for c in conn.inflight([port], idle_grace=0.05)}

    quiet_client, _quiet = sockets.pair(listener)
    working_client, working = sockets.pair(listener)
    working_client.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert working.recv(100)  # read: the app is working on it, nothing in its queue
    unread_client, _unread = sockets.pair(listener)
    unread_client.sendall(b"GET / HTTP/1.1\r\n\r\n")
    half_client, half = sockets.pair(listener)
    half_client.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert half.recv(100)
    half_client.shutdown(socket.SHUT_WR)  # CLOSE_WAIT with its request unanswered
    time.sleep(0.2)  # past the grace
    got = reasons()
    assert got[port_of(quiet_client)] == "idle"
    assert got[port_of(working_client)] == "unanswered"
    assert got[port_of(unread_client)] == "unread"
    assert got[port_of(half_client)] == "unanswered"
    states = {c.remote[1]: c.state for c in conn.inflight([port], idle_grace=0.05)}
    assert states[port_of(half_client)] == conn.TCP_CLOSE_WAIT
    working.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")  # answered
    half.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    wait_for(lambda: reasons()[port_of(working_client)] == "idle", timeout=5)
    assert reasons()[port_of(half_client)] == "idle"
    counts = Counter("netlink").count([port])  # without a grace: only the queue decides
    assert counts.ports[port].close_wait == 1 and counts.close_wait_busy == 0


# --- choosing a method -----------------------------------------------------------------------


def test_auto_takes_netlink_here() -> None:
    counter = make_counter()
    assert counter.method == "netlink"
    assert make_counter("auto").method == "netlink"


@pytest.mark.parametrize("method", METHODS)
def test_explicit_method(method: str) -> None:
    assert make_counter(method).method == method


def test_unknown_method_is_a_one_line_value_error() -> None:
    with pytest.raises(ValueError) as caught:
        make_counter("bogus")
    message = str(caught.value)
    assert "bogus" in message and "netlink" in message and "\n" not in message


@pytest.mark.parametrize("method", METHODS)
def test_probe_sees_its_own_listener(method: str) -> None:
    assert Counter(method)._probe()


# --- listening ports -------------------------------------------------------------------------

# A child that listens on 127.0.0.1 and ::1 and starts a grandchild that listens too; it prints
# the three ports as JSON once all are listening, then waits for stdin to close.
LISTENING_TREE = r"""
import json, socket, subprocess, sys
GRANDCHILD = '''
import socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(8)
print(s.getsockname()[1], flush=True)
sys.stdin.read()
'''
v4 = socket.socket(); v4.bind(("127.0.0.1", 0)); v4.listen(8)
ports = [v4.getsockname()[1]]
if sys.argv[1] == "v6":
    v6 = socket.socket(socket.AF_INET6); v6.bind(("::1", 0)); v6.listen(8)
    ports.append(v6.getsockname()[1])
grandchild = subprocess.Popen([sys.executable, "-c", GRANDCHILD],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
ports.append(int(grandchild.stdout.readline()))
print(json.dumps(ports), flush=True)
sys.stdin.read()
grandchild.stdin.close()
grandchild.wait()
"""


@pytest.fixture
def listening_tree() -> Iterator[tuple[int, list[int]]]:
    """(pid, ports) of a child process tree that listens on those ports."""
    with subprocess.Popen(
        [sys.executable, "-c", LISTENING_TREE, "v6" if HAS_IPV6 else "v4"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout is not None
            ports: list[int] = json.loads(child.stdout.readline())
            yield child.pid, ports
        finally:
            assert child.stdin is not None
            child.stdin.close()  # the child closes its grandchild's stdin, then exits
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def test_listening_ports_of_a_process_tree(
    sockets: Sockets, listening_tree: tuple[int, list[int]]
) -> None:
    pid, ports = listening_tree
    ours = port_of(sockets.listener())  # an unrelated listener, in this test's own process
    found = listening_ports(pid)
    assert found == sorted(ports)
    assert ours not in found


def test_all_listening_ports_includes_every_listener(
    sockets: Sockets, listening_tree: tuple[int, list[int]]
) -> None:
    _pid, ports = listening_tree
    ours = port_of(sockets.listener())
    everything = all_listening_ports()
    assert set(ports) | {ours} <= set(everything)
    assert everything == sorted(set(everything))


def test_listening_ports_are_not_established_ones(sockets: Sockets) -> None:
    listener = sockets.listener()
    client, _server = sockets.pair(listener)
    found = listening_ports(os.getpid())
    assert port_of(listener) in found
    assert port_of(client) not in found


def test_listening_ports_of_a_gone_process_is_empty() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=10)
    assert listening_ports(gone.pid) == []


# Run in a network namespace of its own: this process's listeners are the only ones there, so
# listening_ports() can stop scanning fds once it has found them (listeners come first).
ALONE_IN_NETNS = r"""
import json, os, socket
from drainctl.drain.connections import Counter, all_listening_ports
from drainctl.drain.discovery import listening_ports
v4 = socket.socket(); v4.bind(("127.0.0.1", 0)); v4.listen(64)
port = v4.getsockname()[1]
held = []
for _ in range(50):
    held.append(socket.create_connection(("127.0.0.1", port)))
    held.append(v4.accept()[0])
counts = Counter("netlink").count([port])
print(json.dumps({"port": port, "mine": listening_ports(os.getpid()),
                  "all": all_listening_ports(), "established": counts.established}))
"""


@pytest.mark.root
@pytest.mark.skipif(
    not (os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip")),
    reason="needs root, unshare(1) and ip(8) for a network namespace",
)
def test_alone_in_a_network_namespace() -> None:
    script = (
        f"ip link set lo up && exec {shlex.quote(sys.executable)} -c {shlex.quote(ALONE_IN_NETNS)}"
    )
    out = subprocess.run(
        ["unshare", "--net", "sh", "-c", script],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    result = json.loads(out.stdout)
    assert result["mine"] == result["all"] == [result["port"]]
    assert result["established"] == 50


def test_proc_fallback_finds_the_same_listeners(sockets: Sockets) -> None:
    listeners = [sockets.listener()]
    if HAS_IPV6:
        listeners.append(sockets.listener("::1"))
    from_netlink = conn._listening_inodes_netlink()
    from_proc = conn._listening_inodes_proc()
    for listener in listeners:
        inode = next(i for i, p in from_netlink.items() if p == port_of(listener))
        assert from_proc[inode] == port_of(listener)


# --- pure logic: the kernel filter program ----------------------------------------------------


def audit(program: bytes) -> None:
    """inet_diag_bc_audit() from net/ipv4/inet_diag.c, for the ops the counter emits."""

    def valid_cc(target_len: int) -> bool:  # a jump must land on an op boundary
        length, at = len(program), 0
        while length >= 0:
            if target_len > length:
                return False
            if target_len == length:
                return True
            yes = program[at + 1]
            if yes < 4 or yes & 3:
                return False
            length -= yes
            at += yes
        return False

    length, at = len(program), 0
    while length > 0:
        code, yes, no = conn._BC_OP.unpack_from(program, at)
        min_len = 4
        if code in (conn.INET_DIAG_BC_S_EQ, conn.INET_DIAG_BC_S_GE, conn.INET_DIAG_BC_S_LE):
            min_len += 4  # the port rides in a second op
            assert length >= min_len
        else:
            assert code == conn.INET_DIAG_BC_JMP, code
        assert min_len <= no <= length + 4 and not no & 3
        assert no >= length or valid_cc(length - no)
        assert min_len <= yes <= length + 4 and not yes & 3
        at += yes
        length -= yes
    assert length == 0


def run(program: bytes, sport: int) -> bool:
    """inet_diag_bc_run(): whether the program accepts a socket with local port `sport`."""
    length, at = len(program), 0
    while length > 0:
        code, yes_jump, no_jump = conn._BC_OP.unpack_from(program, at)
        operand = (
            conn._BC_OP.unpack_from(program, at + 4)[2] if code != conn.INET_DIAG_BC_JMP else 0
        )
        taken = {
            conn.INET_DIAG_BC_JMP: False,
            conn.INET_DIAG_BC_S_EQ: sport == operand,
            conn.INET_DIAG_BC_S_GE: sport >= operand,
            conn.INET_DIAG_BC_S_LE: sport <= operand,
        }[code]
        jump = yes_jump if taken else no_jump
        length -= jump
        at += jump
    return length == 0


@pytest.mark.parametrize("eq_ops", [True, False])
@pytest.mark.parametrize(
    "ports", [[8080], [80, 443], [1, 2, 3, 65535], list(range(1000, 1200, 7)), [0]]
)
def test_port_filter_accepts_exactly_its_ports(ports: list[int], eq_ops: bool) -> None:
    program = conn._port_filter(ports, eq_ops=eq_ops)
    audit(program)
    candidates = set(ports) | {p + 1 for p in ports if p < 65535} | {0, 22, 8081, 65535}
    for sport in sorted(candidates):
        assert run(program, sport) == (sport in ports), sport


def test_port_filter_layout_for_two_ports() -> None:
    # What ss compiles for `sport = :80 or sport = :443`: S_EQ 80 (miss: skip to the next
    # test), JMP to the end (accept), S_EQ 443 (miss: 4 bytes past the end, reject).
    program = conn._port_filter([80, 443])
    ops = [conn._BC_OP.unpack_from(program, at) for at in range(0, len(program), 4)]
    assert ops == [
        (conn.INET_DIAG_BC_S_EQ, 8, 12),
        (0, 0, 80),
        (conn.INET_DIAG_BC_JMP, 4, 12),
        (conn.INET_DIAG_BC_S_EQ, 8, 12),
        (0, 0, 443),
    ]


# --- pure logic: replies ---------------------------------------------------------------------


def reply(state: int, port: int, extra: int = 36) -> bytes:
    """One SOCK_DIAG_BY_FAMILY reply as the kernel lays it out: nlmsghdr, inet_diag_msg, then
    `extra` bytes of attributes (here one opaque attribute)."""
    length = 16 + 72 + extra
    header = struct.pack("=IHHII", length, conn.SOCK_DIAG_BY_FAMILY, 2, 1, 0)
    msg = struct.pack("=BBBB", socket.AF_INET, state, 0, 0) + struct.pack(">HH", port, 40000)
    msg += bytes(72 - len(msg))
    attrs = struct.pack("=HH", extra, 99) + bytes(extra - 4) if extra else b""
    return header + msg + attrs


DONE = struct.pack("=IHHII", 20, conn.NLMSG_DONE, 2, 1, 0) + struct.pack("=i", 0)


def views(buf: bytearray) -> tuple[memoryview, memoryview]:
    view = memoryview(buf)
    return view.cast("I"), view.cast("H")


def test_uniform_prefix_of_equal_replies_stops_before_done() -> None:
    chunk = b"".join(reply(1, 8080) for _ in range(10)) + DONE
    buf = bytearray(chunk + bytes(-len(chunk) % 4 + 64))
    assert conn._uniform_prefix(buf, len(chunk), *views(buf)) == 10 * 124


def test_uniform_prefix_refuses_mixed_lengths() -> None:
    chunk = reply(1, 8080) * 3 + reply(6, 8080, extra=8) + reply(1, 8080) * 3
    buf = bytearray(chunk + bytes(64))
    assert conn._uniform_prefix(buf, len(chunk), *views(buf)) == 0


def test_strided_and_walked_tallies_agree() -> None:
    states = [1, 1, 8, 1, 6, 1, 4, 1, 1, 8]
    ports = [8080, 8443, 8080, 8080, 8443, 8080, 8080, 9999, 8443, 8080]
    chunk = b"".join(reply(s, p) for s, p in zip(states, ports, strict=True))
    buf = bytearray(chunk)

    def fresh() -> dict[int, list[int]]:
        return {8080: [0, 0, 0, 0, 0], 8443: [0, 0, 0, 0, 0]}  # 9999 not requested: ignored

    strided, walked, one_port = fresh(), fresh(), {8080: [0, 0, 0, 0, 0]}
    conn._tally_strided(buf, 0, len(chunk), 124, strided)
    conn._tally(buf, 0, len(chunk), walked)
    only_8080 = b"".join(reply(s, 8080) for s in states)
    conn._tally_strided(bytearray(only_8080), 0, len(only_8080), 124, one_port)

    assert strided == walked == {8080: [3, 2, 1, 0, 0], 8443: [2, 0, 1, 0, 0]}
    assert one_port == {8080: [6, 2, 2, 0, 0]}


# --- pure logic: /proc/net/tcp ---------------------------------------------------------------

PROC_TCP = b"""\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 5001 1
   2: 0100007F:C350 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 5002 1
   3: 0100007F:1F90 0100007F:C351 08 00000000:00000000 00:00000000 00000000     0        0 5003 1
   4: 0100007F:1F90 0100007F:C352 06 00000000:00000000 03:00000F9C 00000000     0        0 0 3
10000: 0100007F:01BB 0100007F:C353 01 00000000:00000000 00:00000000 00000000     0        0 5004 1
"""


def test_proc_lines_tally_by_local_port_and_state() -> None:
    tallies = {8080: [0] * 5, 443: [0] * 5, 50000: [0] * 5, 22: [0] * 5}
    conn._tally_proc_lines(PROC_TCP.splitlines(), tallies)
    # 8080 (1F90): one established, one close_wait, one time_wait; LISTEN not counted.
    # 50000 (C350) is the client end of line 1: established on its own local port.
    # Line 10000 shows the sl column growing past its width: still parsed.
    assert tallies == {
        8080: [1, 1, 1, 0, 0],
        443: [1, 0, 0, 0, 0],
        50000: [1, 0, 0, 0, 0],
        22: [0, 0, 0, 0, 0],
    }


def test_proc_lines_repeated_by_a_resumed_read_count_once() -> None:
    lines = PROC_TCP.splitlines()
    repeated = [*lines[:3], lines[1].replace(b"   1:", b"  27:"), *lines[3:]]
    tallies = {8080: [0] * 5}
    conn._tally_proc_lines(repeated, tallies)
    assert tallies == {8080: [1, 1, 1, 0, 0]}


def test_proc_lines_listeners() -> None:
    assert conn._listeners_from_proc_lines(PROC_TCP.splitlines()) == {4242: 8080}


def test_module_does_not_import_psutil_at_import_time() -> None:
    code = "import sys, drainctl.drain.connections; print('psutil' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=30
    )
    assert out.stdout.strip() == "False"
