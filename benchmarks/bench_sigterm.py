#!/usr/bin/env python3
"""How long SIGTERM takes to reach the app when there is nothing to drain, beside tini.

Run by hand from the repository root (root for --pod):

    python3 benchmarks/bench_sigterm.py [-n 20] [--pod] [--drainctl-bin dist/drainctl]

The app (the same for every supervisor) installs a SIGTERM handler, says "ready" and sleeps; it
listens on nothing. Each round starts every supervisor once, in turn (interleaved: a shared
machine drifts, so all are timed in the same moments): `tini -s -- APP`, `dumb-init APP` when
installed, and `drainctl run --delay 0 -- APP` (source, with a temporary bytecode cache as an
installed wheel has; the binary given; another checkout's source with --also-source). After
"ready" and a short settle (start-up work done), it takes CLOCK_MONOTONIC, sends SIGTERM to the
supervisor, and the app's handler writes CLOCK_MONOTONIC the moment it runs: the difference is
the latency. drainctl must first see that nothing listens (its port lookup, drain.py's no-ports)
before it forwards; tini forwards at once. Reported: median, p90 and max per supervisor, and the
median of the per-round ratios against tini. `--pod` runs every supervisor as PID 1 of fresh
network and PID namespaces (`unshare --net --pid --fork --mount-proc`): a pod where nothing
listens at all. It reports, never asserts.
"""

from __future__ import annotations

import argparse
import os
import platform
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

APP = r"""
import os, signal, sys, time
def on_term(signo, frame):
    os.write(1, b"term %d\n" % time.monotonic_ns())
    os._exit(0)
signal.signal(signal.SIGTERM, on_term)
os.write(1, b"ready\n")
while True:
    time.sleep(60)
"""


# An installed wheel or the frozen binary has bytecode; a checkout run with
# PYTHONDONTWRITEBYTECODE would compile drainctl's modules at every start, on the signal's path.
_PYCACHE = tempfile.mkdtemp(prefix="bench-sigterm-pycache-")


def supervisors(args: argparse.Namespace) -> dict[str, list[str]]:
    app = [sys.executable, "-c", APP]
    rows: dict[str, list[str]] = {}
    if shutil.which("tini"):
        rows["tini"] = ["tini", "-s", "--", *app]
    if shutil.which("dumb-init"):
        rows["dumb-init"] = ["dumb-init", *app]
    rows["drainctl"] = [sys.executable, "-m", "drainctl", "run", "--delay", "0", "--", *app]
    if args.also_source:
        # Another checkout's source (e.g. the main branch, for a before/after in one run).
        source = str(Path(args.also_source).resolve() / "supervisor")
        rows[f"drainctl ({Path(args.also_source).name})"] = [
            "env", f"PYTHONPATH={source}", *rows["drainctl"]]
    if args.drainctl_bin:
        binary = str(Path(args.drainctl_bin).resolve())
        rows["drainctl (binary)"] = [binary, "run", "--delay", "0", "--", *app]
    return rows


def once(argv: list[str], pod: bool, settle: float) -> float | None:
    """Milliseconds from SIGTERM sent to the app's handler running; None if it never ran."""
    if pod:
        argv = ["unshare", "--net", "--pid", "--fork", "--mount-proc", *argv]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "supervisor"), DRAINCTL_LOG_FORMAT="json",
               PYTHONPYCACHEPREFIX=_PYCACHE)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    assert proc.stdout is not None
    try:
        if not _wait_line(proc, b"ready", 15):
            return None
        time.sleep(settle)
        target = _inner(proc.pid) if pod else proc.pid
        sent = time.monotonic_ns()
        os.kill(target, signal.SIGTERM)
        line = _wait_line(proc, b"term ", 15)
        if not line:
            return None
        return (int(line.split()[1]) - sent) / 1e6
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
        proc.stdout.close()


def _wait_line(proc: subprocess.Popen[bytes], prefix: bytes, timeout: float) -> bytes | None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buffered = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(deadline - time.monotonic()):
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                return None
            buffered += chunk
            for line in buffered.split(b"\n")[:-1]:
                if line.startswith(prefix):
                    return line
    return None


def _inner(pid: int) -> int:
    """The child unshare --fork made (PID 1 of the new namespace)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                children = f.read().split()
        except OSError:
            children = []
        if not children:
            children = [p for p in _all_pids() if _ppid(p) == pid]
        if children:
            return int(children[0])
        time.sleep(0.01)
    raise RuntimeError("unshare started no child")


def _all_pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return -1
    return int(data[data.rfind(b")") + 2 :].split()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--runs", type=int, default=20)
    parser.add_argument("--settle", type=float, default=0.3,
                        help="seconds between the app's 'ready' and SIGTERM (default 0.3)")
    parser.add_argument("--pod", action="store_true",
                        help="each supervisor as PID 1 of fresh net and PID namespaces (root)")
    parser.add_argument("--drainctl-bin", default=os.environ.get("DRAINCTL_BIN"))
    parser.add_argument("--also-source", metavar="CHECKOUT",
                        help="one more drainctl row from another checkout's supervisor/")
    args = parser.parse_args()
    rows = supervisors(args)
    print(f"# SIGTERM -> app's handler, nothing to drain: {platform.system()} "
          f"{platform.release()}, Python {platform.python_version()}, {os.cpu_count()} CPUs; "
          f"{args.runs} interleaved rounds{', as PID 1 of a fresh pod' if args.pod else ''}")
    for argv in rows.values():
        once(argv, args.pod, args.settle)  # warm the page cache, untimed
    times: dict[str, list[float]] = {name: [] for name in rows}
    failed: dict[str, int] = dict.fromkeys(rows, 0)
    ratios: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.runs):
        this_round: dict[str, float] = {}
        for name, argv in rows.items():
            ms = once(argv, args.pod, args.settle)
            if ms is None:
                failed[name] += 1
            else:
                times[name].append(ms)
                this_round[name] = ms
        if "tini" in this_round:
            for name, ms in this_round.items():
                ratios[name].append(ms / max(this_round["tini"], 1e-3))
    header = f"{'supervisor':<18} {'median ms':>9} {'p90 ms':>8} {'max ms':>8} {'vs tini':>8}"
    print(header)
    print("-" * len(header))
    for name in rows:
        got = sorted(times[name])
        if not got:
            print(f"{name:<18} {'failed':>9}")
            continue
        p90 = got[min(len(got) - 1, int(0.9 * len(got)))]
        ratio = f"{statistics.median(ratios[name]):.2f}" if ratios[name] else "-"
        note = f"  ({failed[name]} failed)" if failed[name] else ""
        print(f"{name:<18} {statistics.median(got):>9.2f} {p90:>8.2f} {got[-1]:>8.2f} "
              f"{ratio:>8}{note}")
    print("# vs tini: median of the per-round ratios (same round, same moment); goal: drainctl "
          "within 2x of tini")
    shutil.rmtree(_PYCACHE, ignore_errors=True)
    return 0 if not any(failed.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
