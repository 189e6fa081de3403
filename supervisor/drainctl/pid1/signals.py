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

import os
import queue
import signal
import threading
from collections.abc import Callable

__all__ = ["WAITED", "Inbox", "SignalWaiter", "block_all", "signal_name"]

UNCATCHABLE = frozenset({signal.SIGKILL, signal.SIGSTOP})
# Every catchable signal, realtime ones included (by number: they have no enum member).
WAITED: frozenset[int] = frozenset(
    int(n) for n in signal.valid_signals() if int(n) not in UNCATCHABLE
    # 32 and 33 are reserved by glibc for its threads (NPTL): never block or take those.
    and not (32 <= int(n) < signal.SIGRTMIN)
)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        if signal.SIGRTMIN <= number <= signal.SIGRTMAX:
            return f"SIGRTMIN+{number - signal.SIGRTMIN}"
        return f"SIG{number}"


def block_all() -> set[int]:
    """Block every catchable signal in this thread; returns the mask that was inherited."""
    return {int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, WAITED)}


class SignalWaiter:
    """A daemon thread that takes blocked signals with sigwaitinfo and hands them over.

    It only records: `deliver(signo, sender_pid)` must be cheap and thread-safe (the supervisor
    puts the pair in its inbox and wakes its loop).
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


class Inbox:
    """Thread-safe queue plus a pipe that wakes the run loop's select()."""

    def __init__(self) -> None:
        self.items: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)

    def put(self, kind: str, payload: object) -> None:
        self.items.put((kind, payload))
        try:
            os.write(self._write_fd, b"\0")
        except BlockingIOError:
            pass  # the pipe is full, so the loop is already due to wake

    def take(self) -> list[tuple[str, object]]:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass
        taken = []
        while True:
            try:
                taken.append(self.items.get_nowait())
            except queue.Empty:
                return taken
