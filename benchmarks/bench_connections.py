#!/usr/bin/env python3
"""How long one connection count takes, per method, beside `ss`, at 1k, 10k and 30k connections.

Run by hand (as root or not), from the repository root:

    python3 benchmarks/bench_connections.py [--sizes 1000,10000,30000] [--repeat 5]

It opens N established loopback connections to one port on 127.0.0.1, then, in --repeat
rounds (so that all are timed in the same moments of a machine whose load drifts), times:
- `ss -Htn state established '( sport = :P )' | wc -l`, the reference, shell and all: what an
  operator would run;
- one count by each drainctl method (netlink, netlink with --idle-grace, proc, psutil), each
  in a process of its own that reports its peak RSS growth (ru_maxrss) since its imports, and
  the peak of Python allocations during one more count (tracemalloc, untimed). A first, cold
  count per method is reported apart; psutil gets fewer rounds (seconds each);
then listening_ports() of this process tree, which holds all 2N sockets, beside psutil's
per-process net_connections() over the same tree.
Every method's count is checked against N and against ss. It reports, never asserts: timings
depend on the machine. Connections are held by helper processes, each within RLIMIT_NOFILE
(a container may forbid raising the hard limit), with their own 127.0.0.x source addresses so
ephemeral ports do not run out, and closed with RST (SO_LINGER 0) so no TIME_WAIT sockets are
left to slow the next run's kernel walks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import socket
import statistics
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "supervisor"))

IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: bind() picks the address, connect() the port
BATCH = 256  # connects per round before accepting them: keeps the backlog well under somaxconn
BACKLOG = 4096
METHOD_ROWS = ("netlink", "netlink+idle", "proc", "psutil")
PSUTIL_ROUNDS = 1  # psutil takes seconds per count at 30k: its cold count and one more


# --- the helper processes that hold connections ----------------------------------------------


def hold(listener_fd: int, count: int, source: str) -> None:
    """--hold: open `count` connections to the inherited listener from `source`, accept as many,
    print "ready", and keep them until stdin closes."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = socket.socket(fileno=listener_fd)
    listener.settimeout(30)
    host, port = listener.getsockname()[:2]
    held: list[socket.socket] = []
    opened = 0
    while opened < count:
        batch = min(BATCH, count - opened)
        for _ in range(batch):
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            client.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            client.bind((source, 0))
            client.settimeout(30)
            client.connect((host, port))
            held.append(client)
        # The listener is shared: this may accept another helper's connections, but every
        # helper accepts exactly as many as it opened, so the totals meet.
        for _ in range(batch):
            held.append(listener.accept()[0])
        opened += batch
    listener.close()
    print("ready", flush=True)
    sys.stdin.read()
    for sock in held:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


class Connections:
    """N established connections to one port, grown on demand by helper processes."""

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(BACKLOG)
        self.port: int = self.listener.getsockname()[1]
        self.count = 0
        self.helpers: list[subprocess.Popen[str]] = []
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # Each connection is 2 fds in its helper; keep some for the interpreter.
        self.per_helper = max(1, min((hard - 200) // 2, 9000))

    def grow_to(self, total: int) -> float:
        started = time.perf_counter()
        new: list[subprocess.Popen[str]] = []
        while self.count < total:
            chunk = min(self.per_helper, total - self.count)
            source = f"127.0.0.{10 + len(self.helpers) + len(new)}"
            argv = [sys.executable, __file__, "--hold", str(self.listener.fileno()), str(chunk)]
            new.append(
                subprocess.Popen(
                    [*argv, source],
                    pass_fds=[self.listener.fileno()],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
            self.count += chunk
        self.helpers += new
        for helper in new:
            assert helper.stdout is not None
            if helper.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a helper failed (exit {helper.wait()})")
        return time.perf_counter() - started

    def close(self) -> None:
        for helper in self.helpers:
            assert helper.stdin is not None
            helper.stdin.close()
        for helper in self.helpers:
            try:
                helper.wait(timeout=30)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()
            if helper.stdout is not None:
                helper.stdout.close()
        self.listener.close()


@contextmanager
def connections() -> Iterator[Connections]:
    held = Connections()
    try:
        yield held
    finally:
        held.close()


# --- measuring -------------------------------------------------------------------------------


def serve_counts(row: str, port: int) -> None:
    """--worker: count with one method each time a line comes on stdin; answer with JSON.

    A process per method, so that its peak RSS growth is its own; kept for the whole round-robin
    so the methods and ss are timed in the same moments (a shared machine drifts).
    """
    import psutil  # imported before the baseline for every method: only the counts are measured

    from drainctl.drain.connections import Counter

    del psutil
    method, _, variant = row.partition("+")
    grace = 1.0 if variant == "idle" else None
    counter = Counter(method)
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for line in sys.stdin:
        if line.strip() == "trace":  # one more count, untimed, under tracemalloc
            tracemalloc.start()
            counter.count([port], grace)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            print(json.dumps({"alloc_peak_kib": peak // 1024}), flush=True)
            continue
        started = time.perf_counter()
        counts = counter.count([port], grace)
        elapsed = time.perf_counter() - started
        growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kib
        answer = {"ms": elapsed * 1000, "established": counts.established, "rss_kib": growth}
        print(json.dumps(answer), flush=True)


class Worker:
    def __init__(self, row: str, port: int) -> None:
        self.row = row
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", row, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.times: list[float] = []
        self.first_ms = 0.0
        self.counts: set[int] = set()
        self.rss_kib = 0
        self.alloc_peak_kib = 0

    def count(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("count\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        if self.counts:
            self.times.append(answer["ms"])
        else:
            self.first_ms = answer["ms"]  # cold: first socket, first buffers
        self.counts.add(answer["established"])
        self.rss_kib = answer["rss_kib"]

    def trace(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("trace\n")
        self.process.stdin.flush()
        self.alloc_peak_kib = json.loads(self.process.stdout.readline())["alloc_peak_kib"]

    def close(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)
        self.process.stdout.close()


def time_ss(port: int) -> tuple[float, int]:
    command = f"ss -Htn state established '( sport = :{port} )' | wc -l"
    started = time.perf_counter()
    out = subprocess.run(
        ["sh", "-c", command], check=True, capture_output=True, text=True, timeout=60
    )
    return (time.perf_counter() - started) * 1000, int(out.stdout)


def time_listening_ports(repeat: int) -> float:
    from drainctl.drain.discovery import listening_ports

    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        listening_ports(os.getpid())
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def time_psutil_tree() -> float:
    """What listening_ports() avoids: psutil's per-process net_connections() over the tree."""
    import psutil

    started = time.perf_counter()
    root = psutil.Process(os.getpid())
    for process in [root, *root.children(recursive=True)]:
        process.net_connections(kind="tcp")
    return (time.perf_counter() - started) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,30000")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--hold", nargs=3, metavar=("FD", "COUNT", "SOURCE"), help=argparse.SUPPRESS
    )
    parser.add_argument("--worker", nargs=2, metavar=("ROW", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hold:
        hold(int(args.hold[0]), int(args.hold[1]), args.hold[2])
        return 0
    if args.worker:
        serve_counts(args.worker[0], int(args.worker[1]))
        return 0

    sizes = sorted(int(size) for size in args.sizes.split(","))
    print(
        f"# drainctl connection count benchmark: {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    print(
        f"# {shlex.join(sys.argv)}; {args.repeat} rounds, each: ss, then one count per method "
        f"(psutil: first {PSUTIL_ROUNDS} rounds); medians after a cold first count"
    )
    header = (
        f"{'conns':>6}  {'method':<15} {'median ms':>9} {'vs ss':>6} {'first ms':>9} "
        f"{'RSS +KiB':>9} {'alloc KiB':>9} {'count':>6}"
    )
    print(header)
    print("-" * len(header))
    all_exact = True
    started = time.perf_counter()
    with connections() as held:
        for size in sizes:
            opened_in = held.grow_to(size)
            workers = [Worker(row, held.port) for row in METHOD_ROWS]
            ss_times: list[float] = []
            ss_counts: set[int] = set()
            try:
                for each in workers:
                    each.count()  # the cold count, outside the rounds
                for round_ in range(args.repeat):
                    ss_ms, ss_count = time_ss(held.port)
                    ss_times.append(ss_ms)
                    ss_counts.add(ss_count)
                    for each in workers:
                        if each.row != "psutil" or round_ < PSUTIL_ROUNDS:
                            each.count()
                for each in workers:
                    each.trace()
            finally:
                for each in workers:
                    each.close()
            ss_median = statistics.median(ss_times)
            all_exact &= ss_counts == {size}
            print(
                f"{size:>6}  {'ss | wc -l':<15} {ss_median:>9.1f} {1:>6.2f} {'':>29} "
                f"{','.join(map(str, sorted(ss_counts))):>6}"
            )
            for each in workers:
                median = statistics.median(each.times)
                exact = each.counts == {size}
                all_exact &= exact
                print(
                    f"{size:>6}  {each.row:<15} {median:>9.1f} {median / ss_median:>6.2f} "
                    f"{each.first_ms:>9.1f} {each.rss_kib:>9} {each.alloc_peak_kib:>9} "
                    f"{','.join(map(str, sorted(each.counts))):>6}"
                    + ("" if exact else "  MISMATCH")
                )
            lp_ms = time_listening_ports(min(3, args.repeat))
            psutil_ms = time_psutil_tree()
            print(
                f"{size:>6}  {'listening_ports':<15} {lp_ms:>9.1f} {lp_ms / ss_median:>6.2f}"
                f"   the tree holds {2 * size} sockets; psutil per-process "
                f"net_connections: {psutil_ms:.0f} ms"
            )
            print(f"        (connections opened in {opened_in:.1f} s)")
    elapsed = time.perf_counter() - started
    print(f"# counts exact (= N = ss) everywhere: {all_exact}; total {elapsed:.0f} s")
    return 0 if all_exact else 1


if __name__ == "__main__":
    sys.exit(main())
