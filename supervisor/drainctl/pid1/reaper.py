"""Reap every child: the app, and every orphan re-parented to us as PID 1 or subreaper."""

from __future__ import annotations

import os

__all__ = ["become_subreaper", "reap"]

_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def reap() -> list[tuple[int, int]]:
    """waitpid(-1, WNOHANG) until nothing is left to reap; returns (pid, status) pairs.

    One SIGCHLD can stand for several exits (signals of one kind merge: catatonit#4), so this
    always loops; ECHILD (no children at all) is the normal end, as in gunicorn's reap_workers.
    """
    reaped: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.append((pid, status))


def become_subreaper() -> str | None:
    """PR_SET_CHILD_SUBREAPER (prctl(2)) so orphans come to us when we are not PID 1.

    Returns None on success, else the reason it failed (the caller warns once).
    """
    import ctypes  # only when not PID 1 (~6 ms and 0.6 MiB of start-up otherwise)

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            return os.strerror(ctypes.get_errno())
    except (OSError, AttributeError) as exc:
        return str(exc)
    return None
