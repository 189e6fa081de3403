"""The one loop both hosts run (`drainctl run` and the standalone `prestop`).

    wait (select) until the next deadline, a signal, a finished job or a readable socket
    -> hand each to its owner -> let the host advance (reap, drain, serve) -> again

Everything that can take time runs elsewhere and comes back through the inbox: signals (taken
by one sigwaitinfo thread, pid1/signals.py) and jobs (the runner's threads: port lookups,
counts, the down call). So the loop itself never blocks but in select, and select never waits
past the earliest deadline any part asked for.
"""

from __future__ import annotations

import os
import queue
import selectors
import threading
import time

TYPE_CHECKING = False  # no typing at run time: PID 1's start-up (drain/machine.py)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Protocol, TypeVar

    T = TypeVar("T")

    class Part(Protocol):
        """Something the loop advances: the drain, the control server."""

        def tick(self) -> None: ...

        def next_wakeup(self) -> float | None: ...

__all__ = ["Inbox", "JobDone", "Loop", "Signal", "ThreadRunner"]


class Signal:
    """A signal the waiter took: its number and the pid that sent it (0: the kernel)."""

    __slots__ = ("sender", "signo")

    def __init__(self, signo: int, sender: int) -> None:
        self.signo = signo
        self.sender = sender


class JobDone:
    """A job's result (or the exception it raised), for its `done` callback in the loop."""

    __slots__ = ("done", "result")

    def __init__(self, done: Callable[[object], None], result: object) -> None:
        self.done = done
        self.result = result


class Inbox:
    """Thread-safe queue plus a pipe that wakes the loop's select()."""

    def __init__(self) -> None:
        self._items: queue.SimpleQueue[Signal | JobDone] = queue.SimpleQueue()
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)

    def put(self, item: Signal | JobDone) -> None:
        self._items.put(item)
        try:
            os.write(self._write_fd, b"\0")
        except BlockingIOError:
            pass  # the pipe is full, so the loop is already due to wake

    def take(self) -> list[Signal | JobDone]:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass
        taken: list[Signal | JobDone] = []
        while True:
            try:
                taken.append(self._items.get_nowait())
            except queue.Empty:
                return taken

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self._write_fd)


class ThreadRunner:
    """Runs each job in a daemon thread; its result comes back to the loop through the inbox."""

    def __init__(self, inbox: Inbox) -> None:
        self._inbox = inbox

    def submit(self, work: Callable[[], T], done: Callable[[T | Exception], None]) -> None:
        def job() -> None:
            try:
                result: T | Exception = work()
            except Exception as exc:
                result = exc
            self._inbox.put(JobDone(done, result))  # type: ignore[arg-type]

        threading.Thread(target=job, name="drainctl-job", daemon=True).start()


class Loop:
    """select -> inbox -> parts, with a typed inbox, a job runner and one wait for all."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.inbox = Inbox()
        self.runner = ThreadRunner(self.inbox)
        self.on_signal: Callable[[Signal], None] = lambda _signal: None
        self._parts: list[Part] = []
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.inbox.read_fd, selectors.EVENT_READ, None)

    def add(self, part: Part) -> None:
        """Advance `part` after every wake-up, in the order parts were added."""
        self._parts.append(part)

    def register(self, fd: int, callback: Callable[[], None]) -> None:
        """Watch `fd`; `callback` runs in the loop when it is readable."""
        self._selector.register(fd, selectors.EVENT_READ, callback)

    def unregister(self, fd: int) -> None:
        self._selector.unregister(fd)

    def turn(self, max_wait: float | None = None) -> None:
        """One round: wait until something is due, hand out what came, advance every part."""
        for key, _ in self._selector.select(self._timeout(max_wait)):
            if key.data is not None:
                key.data()
        for item in self.inbox.take():
            if isinstance(item, Signal):
                self.on_signal(item)
            else:
                item.done(item.result)
        for part in self._parts:
            part.tick()

    def close(self) -> None:
        self._selector.close()
        self.inbox.close()

    def _timeout(self, max_wait: float | None) -> float | None:
        now = self.clock()
        times = [t for t in (part.next_wakeup() for part in self._parts) if t is not None]
        if max_wait is not None:
            times.append(now + max_wait)
        return max(0.0, min(times) - now) if times else None
