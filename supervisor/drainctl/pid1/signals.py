"""Which signals the supervisor waits for, and their names.

The supervisor blocks every catchable signal in every thread and takes them one at a time with
sigwaitinfo(2) in a single thread that only records them (see `SignalWaiter`); the run loop acts.
Blocking instead of handling has three benefits, learnt from tini:
- the app is spawned with the mask drainctl inherited (posix_spawn's setsigmask), not ours;
- a SIGPIPE or SIGTTOU the kernel raises for drainctl's own writes is thread-directed and stays
  pending on the writing thread, so it is never mistaken for one to forward;
- as PID 1 a signal with no handler is dropped by the kernel; a blocked one is queued for us.
Synchronous faults (SIGSEGV, SIGBUS...) still kill the process when blocked (the kernel forces
them), so blocking them too is safe and lets `kill -SEGV 1` be forwarded like any other.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

__all__ = ["WAITED", "SignalWaiter", "block_all"]

UNCATCHABLE = frozenset({signal.SIGKILL, signal.SIGSTOP})
# Every catchable signal, realtime ones included (by number: they have no enum member).
WAITED: frozenset[int] = frozenset(
    int(n) for n in signal.valid_signals() if int(n) not in UNCATCHABLE
    # 32 and 33 are reserved by glibc for its threads (NPTL): never block or take those.
    and not (32 <= int(n) < signal.SIGRTMIN)
)


def block_all() -> set[int]:
    """Block every catchable signal in this thread; returns the mask that was inherited."""
    return {int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, WAITED)}


class SignalWaiter:
    """A daemon thread that takes blocked signals with sigwaitinfo and hands them over.

    It only records: `deliver(signo, sender_pid)` must be cheap and thread-safe (the supervisor
    puts it in its loop's inbox, which wakes the loop).
    """

    def __init__(self, deliver: Callable[[int, int], None]) -> None:
        self._deliver = deliver
        self._thread = threading.Thread(target=self._loop, name="drainctl-signals", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while True:
            info = signal.sigwaitinfo(WAITED)
            self._deliver(info.si_signo, info.si_pid)
