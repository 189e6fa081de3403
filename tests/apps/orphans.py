"""Test app: double-forks N short-lived orphans, then keeps running.

    orphans.py [N] [LIFETIME]

Each grandchild sleeps LIFETIME seconds (default 0.3) after its parent exited, so it is
re-parented to the nearest subreaper (or PID 1) before it dies: a zombie unless that one reaps.
Prints "ppid <pid>" first and "forked" once every orphan exists.
"""

from __future__ import annotations

import os
import sys
import time


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    lifetime = float(sys.argv[2]) if len(sys.argv) > 2 else 0.3
    print("ppid", os.getppid(), flush=True)
    for _ in range(count):
        if os.fork() == 0:
            if os.fork() == 0:
                time.sleep(lifetime)
                os._exit(0)
            os._exit(0)
        os.waitpid(-1, 0)
    print("forked", flush=True)
    time.sleep(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
