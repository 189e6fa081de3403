"""`drainctl run`: the PID-1 loop.

Set-up, then one loop, like tini's main():
  1. block every catchable signal (signals.block_all) and remember the inherited mask;
  2. register as child subreaper unless PID 1;
  3. spawn the app in its own process group with the inherited mask;
  4. loop: wait (select) for a signal, a finished job or a control client -> act on it ->
     reap -> advance the drain -> exit when the app and its group are gone.
The only other threads are the signal waiter (it records) and short-lived jobs (down call, port
lookup, counts) whose results come back through the inbox. Reaping never waits on HTTP.
"""

from __future__ import annotations

import os
import selectors
import signal
import threading
import time

from drainctl import _bundle, _startmask, control, reaper, termination
from drainctl.child import Child, spawn
from drainctl.drain import Drain, Phase, Seams
from drainctl.signals import Inbox, SignalWaiter, block_all, signal_name

TYPE_CHECKING = False  # no typing at run time: PID 1's start-up (see drain.py)
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any, TypeVar

    from drainctl.config import Config
    from drainctl.connections import Counter, Counts
    from drainctl.downcall import DownResult, ProbeResult
    from drainctl.events import Events

    T = TypeVar("T")

__all__ = ["Supervisor", "ThreadRunner", "drain_seams"]

# After the app's exit, how often we look whether anything of its group is left (no event tells
# us when a grandchild whose parent is alive exits), and how long we wait after SIGKILL.
_GROUP_POLL = 0.05
_AFTER_KILL = 2.0


class ThreadRunner:
    """Runs each job in a daemon thread; its result comes back to the loop through the inbox.

    `warn(message)` runs in the loop when a job had to put the frozen binary's bundle back first
    (see _bundle: the jobs import what the drain needs from it).
    """

    def __init__(self, inbox: Inbox, warn: Callable[[str], object] | None = None) -> None:
        self._inbox = inbox
        self._warn = warn

    def submit(self, work: Callable[[], T], done: Callable[[T | Exception], None]) -> None:
        def job() -> None:
            try:
                restored = _bundle.ensure()
                if restored is not None and self._warn is not None:
                    self._inbox.put("job", (self._warn, restored))
                result: T | Exception = work()
            except Exception as exc:
                result = exc
            except SystemExit as exc:  # PyInstaller's importer, when its bundle is gone: _bundle
                result = ImportError(f"SystemExit: {exc}")
            self._inbox.put("job", (done, result))

        threading.Thread(target=job, name="drainctl-job", daemon=True).start()


def drain_seams(
    config: Config,
    clock: Callable[[], float],
    runner: Any,
    lookup_ports: Callable[[], list[int]],
) -> Seams:
    """The drain's real seams. psutil and httpx are imported only when a drain needs them."""
    counter: list[Counter] = []

    def count(ports: Sequence[int], idle_grace: float | None) -> Counts:
        if not counter:
            try:
                from drainctl.connections import make_counter
            except (ImportError, SystemExit):
                if not _bundle.FROZEN:
                    raise
                return _bundle.fallback_count(list(ports))  # type: ignore[return-value]
            counter.append(make_counter())
        return counter[0].count(ports, idle_grace)

    call_down: Callable[[float], DownResult] | None = None
    probe: Callable[[], ProbeResult] | None = None
    url = config.down_url
    if url is not None:

        def call_down(deadline: float) -> DownResult:
            from drainctl import downcall

            return downcall.call_down(
                url, config.down_method, config.down_timeout, deadline=deadline, clock=clock
            )

        if config.probe_path is not None:
            path = config.probe_path

            def probe() -> ProbeResult:
                from drainctl import downcall

                return downcall.probe_connection_close(
                    downcall.probe_url(url, path), timeout=min(2.0, config.down_timeout)
                )

    def prepare() -> None:
        # httpx and httpcore (imported by httpx's transport on first use) cost ~200 ms or more
        # to import: pay that during the delay, not in the down call's time.
        if url is not None:
            import httpcore  # noqa: F401
            import httpx  # noqa: F401
        count([], None)

    return Seams(clock=clock, runner=runner, count=count, lookup_ports=lookup_ports,
                 call_down=call_down, probe=probe, prepare=prepare)


class Supervisor:
    def __init__(
        self,
        argv: Sequence[str],
        config: Config,
        events: Events,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.argv = list(argv)
        self.config = config
        self.events = events
        self.clock = clock
        self.started_at = clock()
        self.inbox = Inbox()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.inbox.read_fd, selectors.EVENT_READ, None)
        self.child: Child | None = None
        self.main_status: int | None = None
        self.drain: Drain | None = None
        self._group_signalled_at: float | None = None
        self._group_killed_at: float | None = None
        self.control: control.Server | None = None

    # ---- set-up -------------------------------------------------------------------------------

    def start(self) -> None:
        """Steps 1-3. Raises child.SpawnError when the app cannot be started."""
        # The entry point blocked them already, first thing (_startmask); block_all() is for
        # any other caller, and its result the inherited mask only when nothing was recorded.
        blocked_before = block_all()
        inherited_mask = _startmask.inherited()
        if inherited_mask is None:
            inherited_mask = frozenset(blocked_before)
        if os.getpid() != 1:
            failed = reaper.become_subreaper()
            if failed:
                self.events.emit("warning", message=f"cannot become child subreaper ({failed}): "
                                 "orphans of the app will not be reaped by drainctl")
        for problem in self.config.budget.problems():
            self.events.emit("config.warning", message=problem)
        self.child = child = spawn(self.argv, inherited_mask)
        self.events.emit("child.started", pid=child.pid, argv=self.argv)
        runner = ThreadRunner(self.inbox, lambda message: self.events.emit("warning",
                                                                         message=message))
        seams = drain_seams(self.config, self.clock, runner,
                            lambda: _lookup_ports(child.pid))
        seams.stop = self._send_stop
        seams.kill = self._kill_group
        self.drain = Drain(self.config, self.events, seams)
        # After the spawn: a bind failure is only a warning, and never delays the app.
        self.control = control.serve_supervisor(self)
        SignalWaiter(lambda signo, sender: self.inbox.put("signal", (signo, sender))).start()

    def register(self, fd: int, callback: Callable[[], None]) -> None:
        """A control-channel socket to watch in the loop; `callback` runs when it is readable."""
        self.selector.register(fd, selectors.EVENT_READ, callback)

    def unregister(self, fd: int) -> None:
        self.selector.unregister(fd)

    # ---- the loop -----------------------------------------------------------------------------

    def run(self) -> int:
        self.start()
        try:
            code = self.loop()
            assert self.drain is not None
            termination.report(self.config.termination_log, self.drain, self.clock(), code,
                               self.events)
            return code
        finally:
            if self.control is not None:
                self.control.close()

    def loop(self) -> int:
        assert self.drain is not None
        while True:
            for key, _ in self.selector.select(self._timeout()):
                if key.data is not None:
                    key.data()
            for kind, payload in self.inbox.take():
                if kind == "signal":
                    signal_pair: tuple[int, int] = payload  # type: ignore[assignment]
                    self._on_signal(*signal_pair)
                elif kind == "job":
                    job: tuple[Callable[[object], None], object] = payload  # type: ignore[assignment]
                    job[0](job[1])
            self._reap()
            self.drain.tick()
            if self.control is not None:
                self.control.tick()  # after the drain: a finished drain's result goes out now
            code = self._check_exit()
            if code is not None:
                return code

    def _timeout(self) -> float | None:
        assert self.drain is not None
        wakeups = []
        wake = self.drain.next_wakeup()
        if wake is not None:
            wakeups.append(wake - self.clock())
        if self.main_status is not None:
            wakeups.append(_GROUP_POLL)
        if self.control is not None and (served := self.control.next_wakeup()) is not None:
            wakeups.append(served - self.clock())
        return max(0.0, min(wakeups)) if wakeups else None

    # ---- signals ------------------------------------------------------------------------------

    def _on_signal(self, signo: int, sender: int) -> None:
        assert self.drain is not None
        if signo == signal.SIGCHLD:
            return  # the reap after every wake-up handles it
        self.events.emit("signal.received", signal=signal_name(signo), sender=sender)
        if self.main_status is None:
            if signo == signal.SIGTERM and self.drain.sigterm():
                return
            if signo == signal.SIGINT and self.drain.interrupt():
                return
        self.forward(signo)

    def forward(self, signo: int) -> None:
        child = self.child
        assert child is not None
        group = not self.config.single_child
        if self.main_status is not None:
            group = True  # the app is gone: only its group is left to hear it
        if child.signal(signo, group=group):
            self.events.emit("signal.forwarded", signal=signal_name(signo),
                             pid=-child.pgid if group else child.pid)
            if group and signo in (signal.SIGTERM, signal.SIGINT, self.config.stop_signal):
                self._group_signalled_at = self.clock()

    def _send_stop(self) -> None:
        self.forward(self.config.stop_signal)

    def _kill_group(self) -> int:
        child = self.child
        assert child is not None
        child.signal(signal.SIGKILL, group=True)
        self._group_killed_at = self.clock()
        return -child.pgid

    # ---- children -----------------------------------------------------------------------------

    def _reap(self) -> None:
        child = self.child
        assert child is not None and self.drain is not None
        for pid, status in reaper.reap():
            if pid != child.pid:
                continue  # an orphan re-parented to us: reaped, nothing more to do
            self.main_status = status
            fields: dict[str, Any] = {"pid": pid}
            if os.WIFSIGNALED(status):
                fields["signal"] = signal_name(os.WTERMSIG(status))
            else:
                fields["code"] = os.waitstatus_to_exitcode(status)
            self.events.emit("child.exited", **fields)
            self.drain.child_exited()
            self._clean_group()

    def _clean_group(self) -> None:
        """The app exited: what is left of its group gets SIGTERM, then SIGKILL at the limit."""
        child = self.child
        assert child is not None
        if not child.group_alive():
            return
        if self._group_signalled_at is None:
            self.forward(signal.SIGTERM)
        if self._group_signalled_at is None:  # the group vanished in between
            self._group_signalled_at = self.clock()

    def _check_exit(self) -> int | None:
        child = self.child
        assert child is not None
        if self.main_status is None:
            return None
        if child.group_alive():
            now = self.clock()
            if self._group_killed_at is None:
                if now >= self._group_deadline():
                    self.events.emit("kill.escalated", pid=self._kill_group())
                return None
            if now - self._group_killed_at < _AFTER_KILL:
                return None
        code = reaper.exit_code(self.main_status)
        code = self.config.exit_code_map.get(code, code)
        self.events.emit("exit", code=code)
        return code

    def _group_deadline(self) -> float:
        assert self._group_signalled_at is not None
        deadline = self._group_signalled_at + self.config.stop_timeout
        drain = self.drain
        if drain is not None and drain.t0 is not None:
            deadline = min(deadline, drain.t0 + self.config.grace_period)
        return deadline

    # ---- for status / prestop -----------------------------------------------------------------

    def state(self) -> str:
        drain = self.drain
        if self.main_status is not None:
            return "exiting"
        if drain is None or drain.phase is Phase.IDLE:
            return "running"
        if drain.draining or drain.phase is Phase.AWAIT_SIGTERM:
            return "draining"
        return "stopping"


def _lookup_ports(pid: int) -> list[int]:
    try:
        from drainctl.connections import listening_ports

        return listening_ports(pid)
    except (ImportError, SystemExit):  # the frozen bundle is gone: see _bundle
        if not _bundle.FROZEN:
            raise
        return _bundle.fallback_listening_ports()
