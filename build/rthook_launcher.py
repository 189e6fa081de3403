"""PyInstaller runtime hook: undo what starting through the launcher changed, before drainctl runs.

- The launcher starts the bundle through its own glibc loader, so the kernel names the process
  after the loader's file ("ld-linux-x86-64"); comm is ours to set (proc(5), /proc/pid/comm), so
  ps, top and psutil show "drainctl".
- sys.argv[0] is the unpacked bundle's path; the launcher passes the path it was started as
  (e.g. /drainctl, what a manifest names) in _DRAINCTL_LAUNCHER. Popped: the app never sees it.
"""

import os
import sys

try:
    with open("/proc/self/comm", "w") as comm:
        comm.write("drainctl")
except OSError:
    pass  # no /proc: only the name is wrong

_launcher = os.environ.pop("_DRAINCTL_LAUNCHER", None)
if _launcher and sys.argv:
    sys.argv[0] = _launcher
