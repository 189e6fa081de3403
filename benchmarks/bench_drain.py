"""Drain detection latency: the last client connection closes -> the app receives its stop signal.

    python3 benchmarks/bench_drain.py [--runs 10] [--poll 100ms,20ms]

With `--settle 0`, drainctl should notice the zero count at its next poll and forward the stop
signal at once: the goal is at most one poll interval + 20 ms. A report, never an assertion.
Loopback only; every run is bounded and cleans up its processes.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "tests" / "apps" / "httpapp.py"


def drainctl_argv() -> list[str]:
    binary = os.environ.get("DRAINCTL_BIN")
    return [binary] if binary else [sys.executable, "-m", "drainctl"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_text(path: Path, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text()
        if text in content:
            return content
        time.sleep(0.005)
    raise TimeoutError(f"{text!r} not seen in {path}")


def one_run(poll: str, tmp: Path, index: int) -> float:
    port = free_port()
    out, err = tmp / f"out{index}", tmp / f"err{index}"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "supervisor"), DRAINCTL_LOG_FORMAT="json")
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(
            [*drainctl_argv(), "run", "--delay", "0", "--settle", "0", "--poll-interval", poll,
             "--", sys.executable, str(APP), "--port", str(port), "--no-close"],
            stdout=o, stderr=e, start_new_session=True, env=env,
        )
    try:
        wait_for_text(out, "listening")
        client = socket.create_connection(("127.0.0.1", port))
        proc.send_signal(signal.SIGTERM)
        wait_for_text(err, '"count": 1')
        time.sleep(0.05)  # let a few polls see the connection
        closed_at = time.time()
        client.close()
        proc.wait(10)
        for line in out.read_text().splitlines():
            if line.startswith("signal SIGTERM "):
                return float(line.split()[2]) - closed_at
        raise RuntimeError("the app never got SIGTERM")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--poll", default="100ms,20ms")
    args = parser.parse_args()
    print(f"{'poll':>6} {'runs':>4} {'median ms':>10} {'p90 ms':>8} {'max ms':>8} {'goal ms':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for index, poll in enumerate(args.poll.split(",")):
            latencies = sorted(
                one_run(poll, Path(tmp), index * 1000 + i) * 1000 for i in range(args.runs)
            )
            p90 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.9))]
            poll_ms = float(poll.removesuffix("ms")) if poll.endswith("ms") else float(poll) * 1e3
            print(f"{poll:>6} {len(latencies):>4} {statistics.median(latencies):>10.1f} "
                  f"{p90:>8.1f} {latencies[-1]:>8.1f} {poll_ms + 20:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
