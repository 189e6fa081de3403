"""The signal mask drainctl was started with, recorded before anything else runs.

As PID 1, a signal whose action is the default is dropped by the kernel (signal(7), "the init
process"): a SIGTERM that came while Python started and imported drainctl was lost, and the
container ran on until the runtime's SIGKILL. So the entry point (`__main__.entry`) blocks every
catchable signal first of all, before any other import; a blocked signal stays pending until the
supervisor's signal thread takes it. The frozen binary's launcher (build/launcher.c) blocks them
even earlier, before it unpacks, and passes the mask it was started with in _DRAINCTL_SIGMASK.

The app must still get "exactly the signal mask ... drainctl inherited" (README, `drainctl run`
as PID 1), so that mask is recorded here: `inherited()`. Only `os`, `signal` and `sys` are
imported (already loaded by the interpreter's start-up), and nothing of drainctl's.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["ENV", "block", "inherited", "parse", "restore"]

ENV = "_DRAINCTL_SIGMASK"  # written by build/launcher.c: hex, bit n-1 for signal n (as SigBlk)

# Every catchable signal, as signals.WAITED (kept apart: this module imports nothing of ours).
_BLOCKED = frozenset(
    int(n) for n in signal.valid_signals()
    if n not in (signal.SIGKILL, signal.SIGSTOP) and not (32 <= int(n) < signal.SIGRTMIN)
)

_inherited: frozenset[int] | None = None


def parse(text: str) -> frozenset[int] | None:
    """The launcher's hex mask as signal numbers; None when it is not one (never ours, then)."""
    if not 0 < len(text) <= 16 or text.strip("0123456789abcdefABCDEF"):
        return None
    bits = int(text, 16)
    return frozenset(n for n in range(1, 65) if bits >> (n - 1) & 1)


def block() -> None:
    """Block every catchable signal and record the mask drainctl was started with.

    The launcher's record wins in the frozen binary (it blocked everything before we ran); it is
    taken out of the environment either way, so the app never sees it.
    """
    global _inherited
    before = frozenset(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED))
    recorded = os.environ.pop(ENV, None)
    if recorded is not None and getattr(sys, "frozen", False):
        from_launcher = parse(recorded)
        if from_launcher is not None:
            before = from_launcher
    if _inherited is None:
        _inherited = before


def inherited() -> frozenset[int] | None:
    """The mask drainctl was started with, or None when `block()` never ran (a library use)."""
    return _inherited


def restore() -> None:
    """Back to the inherited mask: for every command but `run` (`prestop`, `demo`... are no PID 1,
    and Ctrl-C must interrupt them). A signal that came meanwhile is delivered now."""
    if _inherited is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, _inherited)
