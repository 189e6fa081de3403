"""Test app: prints every signal it receives, one name per line, flushed (like tini's tests).

    sigprint.py [--children N] [--ignore-term] [--exit-on SIGNAME] [--linger SECONDS]

--children N   start N copies of itself (same group) that print as "child<i> SIGNAME"
--ignore-term  SIGTERM is printed and otherwise ignored (an app that will not stop)
--exit-on SIG  exit (code 0) after printing that signal
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--children", type=int, default=0)
    parser.add_argument("--name", default="main")
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--exit-on", default=None)
    args = parser.parse_args()
    received: list[int] = []

    def handler(signo: int, _frame: object) -> None:
        received.append(signo)

    for number in range(1, 32):
        if number in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD):
            continue
        try:
            signal.signal(number, handler)
        except (OSError, ValueError):
            pass
    kids = [
        subprocess.Popen([sys.executable, __file__, "--name", f"child{i}",
                          *(["--exit-on", args.exit_on] if args.exit_on else [])])
        for i in range(args.children)
    ]
    print(f"{args.name} ready {os.getpid()}", flush=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        while received:
            name = signal.Signals(received.pop(0)).name
            print(f"{args.name} {name}", flush=True)
            if name == args.exit_on or (name == "SIGTERM" and not args.ignore_term
                                        and args.exit_on is None):
                for kid in kids:
                    kid.wait(5)
                return 0
        time.sleep(0.01)
    return 3


if __name__ == "__main__":
    sys.exit(main())
