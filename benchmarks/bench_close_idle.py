#!/usr/bin/env python3
"""--close-idle: the cost of one close pass at 1k and 10k connections, and how soon an idle
connection is closed (README.md, "--close-idle").

Run by hand, from the repository root (Linux 5.6+; as root or not: the app is our own child):

    python3 benchmarks/bench_close_idle.py [--sizes 1000,10000] [--repeat 5] [--latency 30]

For each size N, a child process (the "app") accepts N loopback connections from this process,
which holds the client ends. Then, in the same moments of the machine, it times:
- the reference: one connection count of the port (drainctl's netlink counter, as each poll of
  a drain without --close-idle makes it);
- the first pass: it finds every socket in the app's /proc/PID/fd, takes it with pidfd_getfd
  and sets TCP_CORK on it;
- a pass with nothing to close: every connection carries a request the app has read and not
  answered (the dump with tcp_info, and the decision for each connection);
- the app answers every request (the answers wait, corked): a pass that sees them, and
  HOLD_MIN later the pass that closes each with its answer (a second look on the socket, then
  shutdown). Every client end must then read its answer, then EOF.
Then the detection latency: one connection, the app answers, and close passes run every POLL
(40 ms, the drain's cadence with --close-idle) from a random phase, plus one HOLD_MIN after a
pass that saw an answer appear (as the drain does); the time from the answer to the client
reading it with its EOF (the answer waited that long), against the goal of one poll + 20 ms.
It reports, never asserts.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "supervisor"))

from drainctl.drain.closer import HOLD_MIN, POLL, Closer
from drainctl.drain.connections import make_counter


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def app(listener: socket.socket, n: int, commands: int, acks: int) -> None:
    """The child: accept n connections, then on each command byte: b"r" read every request,
    b"a" answer every one; b"q" quit. Acknowledge each command with one byte."""
    raise_nofile()
    conns = []
    while len(conns) < n:
        conn, _ = listener.accept()
        conns.append(conn)
    os.write(acks, b"k")
    while True:
        command = os.read(commands, 1)
        if command == b"r":
            for conn in conns:
                conn.recv(64)
        elif command == b"a":
            for conn in conns:
                conn.sendall(b"answer")
        else:
            os._exit(0)
        os.write(acks, b"k")


def timed(work: object, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = work()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def one_size(n: int, repeat: int) -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    port = listener.getsockname()[1]
    commands_r, commands_w = os.pipe()
    acks_r, acks_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        app(listener, n, commands_r, acks_w)
    listener.close()
    clients = []
    try:
        for i in range(n):
            # Sources across 127.0.0.0/8 so that ephemeral ports never run out.
            sock = socket.socket()
            sock.bind((f"127.0.{1 + i // 20000}.{1 + i % 250}", 0))
            sock.connect(("127.0.0.1", port))
            clients.append(sock)
        os.read(acks_r, 1)

        def command(c: bytes) -> None:
            os.write(commands_w, c)
            os.read(acks_r, 1)

        for sock in clients:
            sock.sendall(b"request")
        command(b"r")  # read, not answered: every connection is in flight
        time.sleep(0.05)
        counter = make_counter("netlink")
        closer = Closer(lambda: [pid])
        count_s, counts = timed(lambda: counter.count([port]), repeat)
        start = time.perf_counter()
        closer.close_idle([port])  # the first look: each socket found, taken and corked
        cork_s = time.perf_counter() - start
        busy_s, busy = timed(lambda: closer.close_idle([port]), repeat)
        command(b"a")  # every answer written; corked, they wait in the sockets
        start = time.perf_counter()
        seen = closer.close_idle([port])
        seen_s = time.perf_counter() - start
        time.sleep(max(0.0, HOLD_MIN - seen_s))
        start = time.perf_counter()
        done = closer.close_idle([port])
        close_s = time.perf_counter() - start
        time.sleep(0.3)  # the kernel has sent every corked answer by now (200 ms)
        whole = 0
        for sock in clients:
            sock.setblocking(False)
            data = b""
            try:
                while chunk := sock.recv(64):
                    data += chunk
            except BlockingIOError:
                continue  # its answer, no EOF: left to the kernel's timer, not closed
            whole += data == b"answer"
        print(f"N={n:>6}: reference count {count_s * 1000:8.2f} ms "
              f"(established {counts.established})")  # type: ignore[attr-defined]
        print(f"          first pass, corking all {cork_s * 1000:8.2f} ms "
              f"({cork_s / n * 1e6:.0f} us a connection)")
        print(f"          pass, nothing to close {busy_s * 1000:8.2f} ms "
              f"({busy_s / count_s:.2f}x the count; closed {busy.total})")  # type: ignore[attr-defined]
        print(f"          pass seeing the answers {seen_s * 1000:8.2f} ms "
              f"(closed {seen.total})")
        print(f"          pass closing all {close_s * 1000:8.2f} ms "
              f"({close_s / n * 1e6:.0f} us a connection, {close_s / count_s:.1f}x the count; "
              f"closed {done.total}, with their answer {done.held}; clients that read their "
              f"answer, then EOF: {whole})")
        os.write(commands_w, b"q")  # the app exits without an answer
    finally:
        for sock in clients:
            sock.close()
        os.kill(pid, 9)  # also when the run failed before the app was told to quit
        os.waitpid(pid, 0)
        for fd in (commands_r, commands_w, acks_r, acks_w):
            os.close(fd)


def latency(rounds: int) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    closer = Closer(lambda: [os.getpid()])
    found = []
    for _ in range(rounds):
        client = socket.create_connection(("127.0.0.1", port))
        server, _ = listener.accept()
        try:
            closer.close_idle([port])  # the first look: corked
            client.sendall(b"request")
            server.recv(64)
            time.sleep(0.01)  # worked on it for a moment
            passes = time.perf_counter() + random.uniform(0, POLL)  # the drain's phase
            server.sendall(b"answer")
            answered = time.perf_counter()
            while time.perf_counter() - answered < 2.0:
                time.sleep(max(0.0, passes - time.perf_counter()))
                done = closer.close_idle([port])
                if done.total:
                    break
                # as the drain: every POLL, and HOLD_MIN after a pass that saw an answer appear
                passes = time.perf_counter() + HOLD_MIN if done.again else passes + POLL
            client.settimeout(2)
            data = b""
            while chunk := client.recv(64):
                data += chunk
            if data == b"answer":
                found.append(time.perf_counter() - answered)
        finally:
            client.close()
            server.close()
    listener.close()
    found.sort()
    ms = [round(x * 1000, 1) for x in found]
    print(f"detection latency over {len(found)}/{rounds} rounds, passes every "
          f"{POLL * 1000:.0f} ms (and {HOLD_MIN * 1000:.0f} ms after an answer appeared): "
          f"median {statistics.median(ms)} ms, "
          f"p90 {ms[int(len(ms) * 0.9) - 1]} ms, max {ms[-1]} ms "
          f"(goal: one poll + 20 ms = {(POLL + 0.02) * 1000:.0f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--latency", type=int, default=30, help="rounds of the latency test")
    args = parser.parse_args()
    raise_nofile()
    print(f"{os.uname().release}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    for n in (int(x) for x in args.sizes.split(",")):
        one_size(n, args.repeat)
    latency(args.latency)


if __name__ == "__main__":
    main()
