"""Signals sent the instant a process has exec'd, and the signal state a process sees.

For the start-up tests of tests/test_run.py and tests/test_frozen.py: a SIGTERM that reaches PID 1
before drainctl blocks its signals is dropped by the kernel (the default action, for the init of
a PID namespace), so the test must hit that first moment after exec, not "some time later".
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import struct
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

# Prints the app's own mask and ignored set, as /proc/self/status shows them.
STATUS = (
    "import sys\n"
    "lines = open('/proc/self/status').read().splitlines()\n"
    "print('\\n'.join(l for l in lines if l.startswith(('SigBlk', 'SigIgn'))), flush=True)\n"
)


def odd_signal_state() -> None:
    """A preexec: some signals blocked and some ignored, as a parent may hand them down."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2, signal.SIGWINCH})
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)


def _first_child(parent: int) -> int | None:
    try:
        with open(f"/proc/{parent}/task/{parent}/children") as f:
            pids = f.read().split()
    except FileNotFoundError:  # a kernel without CONFIG_PROC_CHILDREN
        try:
            pids = [str(c.pid) for c in psutil.Process(parent).children()]
        except psutil.Error:
            return None
    except OSError:
        return None
    return int(pids[0]) if pids else None


def _comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


IN_OPEN = 0x20  # inotify(7)
IN_CREATE = 0x100
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)


class FileEvents:
    """An inotify(7) watch on `directories`, set up before the process to watch is started
    (else its first steps can come before the watch). Use as a context manager."""

    def __init__(self, directories: Sequence[Path], events: int = IN_OPEN) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        for directory in directories:
            if directory.is_dir() and libc.inotify_add_watch(
                    self.fd, os.fsencode(directory), events) < 0:
                os.close(self.fd)
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")

    def __enter__(self) -> FileEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def signal_at(self, parent: int, prefix: str, signo: int, timeout: float = 10.0) -> None:
        """Send `signo` to the first child of `parent` (`unshare --fork`'s: the namespace's
        PID 1) the instant a file named `prefix`* in the watched directories is opened
        (IN_OPEN) or created (IN_CREATE).

        Why not "right after exec": a signal sent while execve(2) itself is still under way
        reaches a process that cannot have blocked anything yet, whatever it does first. These
        are the first things drainctl does that a test can see: the launcher creates its
        directory in the runtime directory; the source's entry point imports its first module
        after the interpreter's own start-up.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not select.select([self.fd], [], [], 0.1)[0]:
                continue
            buf = os.read(self.fd, 65536)
            offset = 0
            while offset < len(buf):
                _wd, _mask, _cookie, size = _EVENT.unpack_from(buf, offset)
                name = buf[offset + _EVENT.size : offset + _EVENT.size + size].rstrip(b"\0")
                offset += _EVENT.size + size
                if name.decode(errors="replace").startswith(prefix):
                    child = _first_child(parent)
                    assert child is not None, f"{parent} has no child"
                    os.kill(child, signo)
                    return
        raise AssertionError(f"no {prefix}* opened or created within {timeout}s")
