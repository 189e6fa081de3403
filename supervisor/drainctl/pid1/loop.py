"""The one loop both hosts run (`drainctl run` and the standalone `prestop`).

    wait (select) until the next deadline, a signal, a finished job or a readable socket
    -> hand each to its owner -> let the host advance (reap, drain, serve) -> again

Everything that can take time runs elsewhere and comes back through the inbox: signals (taken
by one sigwaitinfo thread, pid1/signals.py) and jobs (the runner's threads: port lookups,
counts, the down call). So the loop itself never blocks but in select, and select never waits
past the earliest deadline any part asked for.

Nothing that goes wrong in a part stops the loop (README, "Reliability"): an exception in a
callback, a job's result handler or a part's tick is caught, logged once as an `error` event
(where, type, message), and handed to the host's `on_error`, which decides what still runs. A job
that dies with a BaseException (SystemExit from a frozen binary whose files were removed) comes
back as an error result, and is logged; a job that cannot get a thread (a pids limit) runs
inline, bounded by its own timeouts, and that is said once in a `warning` event.
"""

from __future__ import annotations

import functools
import os
import queue
import selectors
import threading
import time

from drainctl import _bundle, faults

TYPE_CHECKING = False  # no typing at run time: PID 1's start-up (drain/machine.py)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Protocol, TypeVar

    from drainctl.events import Events

    T = TypeVar("T")

    class Part(Protocol):
        """Something the loop advances: the drain, the control server."""

        def tick(self) -> None: ...

        def next_wakeup(self) -> float | None: ...

__all__ = ["Inbox", "JobDied", "JobDone", "Loop", "Signal", "ThreadRunner"]


class Signal:
    """A signal the waiter took: its number and the pid that sent it (0: the kernel)."""

    __slots__ = ("sender", "signo")

    def __init__(self, signo: int, sender: int) -> None:
        self.signo = signo
        self.sender = sender


class JobDone:
    """A job's result (or the exception it raised), for its `done` callback in the loop."""

    __slots__ = ("done", "owner", "result")

    def __init__(self, done: Callable[[object], None], result: object, owner: str = "job") -> None:
        self.done = done
        self.result = result
        self.owner = owner  # who submitted it: where an error in `done` is reported


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


class JobDied(Exception):
    """A job ended with a BaseException that is not an Exception (SystemExit...)."""


class ThreadRunner:
    """Runs each job in a daemon thread; its result comes back to the loop through the inbox.

    When no thread can be had, the job runs at once in the caller (`warn` is told once).
    """

    def __init__(self, inbox: Inbox, on_died: Callable[[BaseException], None],
                 warn: Callable[[str], None], owner: str) -> None:
        self._inbox = inbox
        self._on_died = on_died
        self._warn = warn
        self._inline_said = False
        self.owner = owner

    def submit(self, work: Callable[[], T], done: Callable[[T | Exception], None]) -> None:
        def job() -> object:
            try:
                restored = _bundle.ensure()  # the frozen binary's files, put back if removed
                if restored is not None:
                    self._inbox.put(JobDone(lambda _: self._warn(restored), None, self.owner))
                return work()
            except Exception as exc:
                return exc
            except BaseException as exc:  # SystemExit, KeyboardInterrupt in a worker...
                self._on_died(exc)
                return JobDied(f"{type(exc).__name__}: {exc}")

        def threaded() -> None:
            self._inbox.put(JobDone(done, job(), self.owner))  # type: ignore[arg-type]

        try:
            threading.Thread(target=threaded, name="drainctl-job", daemon=True).start()
        except RuntimeError as exc:  # can't start new thread
            if not self._inline_said:
                self._inline_said = True
                self._warn(f"cannot start a thread ({exc}): jobs run in the loop, one at a "
                           "time, bounded by their own timeouts")
            self._inbox.put(JobDone(done, job(), self.owner))  # type: ignore[arg-type]


class Loop:
    """select -> inbox -> parts, with a typed inbox, a job runner and one wait for all."""

    def __init__(self, events: Events, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.events = events
        self.inbox = Inbox()
        self._runners: dict[str, ThreadRunner] = {}
        self.on_signal: Callable[[Signal], None] = lambda _signal: None
        # What the host does about an error at `where`, after it was logged.
        self.on_error: Callable[[str, BaseException], None] = lambda _where, _exc: None
        self._parts: list[Part] = []
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.inbox.read_fd, selectors.EVENT_READ, None)
        self._logged: set[tuple[str, str]] = set()

    def runner_for(self, owner: str) -> ThreadRunner:
        """The runner whose results' handlers report their errors as `owner`'s."""
        runner = self._runners.get(owner)
        if runner is None:
            runner = self._runners[owner] = ThreadRunner(self.inbox, self._job_died, self._warn,
                                                         owner)
        return runner

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
        try:
            faults.check("loop")
            ready = self._selector.select(self._timeout(max_wait))
        except Exception as exc:
            self.error("loop", exc)
            time.sleep(0.01)  # whatever broke select, never spin on it
            ready = []
        for key, _ in ready:
            if key.data is not None:
                self._guarded("socket", key.data)
        for item in self.inbox.take():
            if isinstance(item, Signal):
                self._guarded("signal", functools.partial(self.on_signal, item))
            else:
                self._guarded(item.owner, functools.partial(item.done, item.result))
        for part in list(self._parts):
            self._guarded(_name(part), part.tick)

    def replace(self, old: Part, new: Part) -> None:
        """Advance `new` where `old` was (the host's backstop taking over from a failed part)."""
        self._parts[self._parts.index(old)] = new

    def error(self, where: str, exc: BaseException) -> None:
        """Log an unexpected error once per place and kind, then tell the host."""
        key = (where, type(exc).__name__)
        if key not in self._logged:
            self._logged.add(key)
            self.events.emit("error", where=where, type=type(exc).__name__,
                             message=str(exc)[:500])
        self.on_error(where, exc)

    def close(self) -> None:
        self._selector.close()
        self.inbox.close()

    def _guarded(self, where: str, call: Callable[[], object]) -> None:
        try:
            call()
        except Exception as exc:
            self.error(where, exc)

    def _job_died(self, exc: BaseException) -> None:
        # In the job's thread: only record; the loop logs it when it takes this.
        self.inbox.put(JobDone(lambda _result: self.error("job", exc), None))

    def _warn(self, message: str) -> None:
        self.events.emit("warning", message=message)

    def _timeout(self, max_wait: float | None) -> float | None:
        now = self.clock()
        times = []
        for part in self._parts:
            try:
                wake = part.next_wakeup()
            except Exception as exc:
                self.error(_name(part), exc)
                wake = now + 0.1  # come back soon rather than sleep forever
            if wake is not None:
                times.append(wake)
        if max_wait is not None:
            times.append(now + max_wait)
        return max(0.0, min(times) - now) if times else None


def _name(part: Part) -> str:
    return type(part).__name__.lower().lstrip("_")
