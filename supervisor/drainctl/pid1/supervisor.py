"""`drainctl run`: the PID-1 host. Set-up, then one loop, like tini's main():

  1. block every catchable signal (signals.block_all) and remember the inherited mask;
  2. register as child subreaper unless PID 1;
  3. spawn the app in its own process group with the inherited mask;
  4. loop (loop.py): wait for a signal, a finished job or a control client -> reap -> advance the
     drain -> serve -> until the drain says it is done; exit with the code it decided.

Every rule of the shutdown (what a signal means, when the app gets its stop signal, SIGKILL,
the clean-up of its group, the exit code) is the drain's (drain/machine.py); this host only feeds
it facts (signals, the app's exit) and carries out its requests (send a signal, run a job).
The only other threads are the signal waiter (it records), the log writer (events.py) and
short-lived jobs. Reaping never waits on HTTP. If the drain itself fails (a bug: an `error`
event), the backstop (backstop.py) takes over its facts and keeps the budget's deadlines and
the exit code.
"""

from __future__ import annotations

import os
import signal
import time

from drainctl import _bundle, _startmask
from drainctl.drain import termination
from drainctl.drain.jobs import real_seams
from drainctl.drain.machine import Drain, Phase
from drainctl.pid1 import reaper
from drainctl.pid1.backstop import Backstop
from drainctl.pid1.loop import Loop, Signal
from drainctl.pid1.signals import SignalWaiter, block_all
from drainctl.pid1.spawn import spawn

TYPE_CHECKING = False  # no typing at run time: PID 1's start-up (drain/machine.py)
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Protocol

    from drainctl.drain.closer import Closer
    from drainctl.drain.discovery import Discovery
    from drainctl.events import Events
    from drainctl.options import Config
    from drainctl.pid1.spawn import Child

    class Service(Protocol):
        """A part of the loop the caller adds (the control server): ticked, then closed."""

        def tick(self) -> None: ...

        def next_wakeup(self) -> float | None: ...

        def close(self) -> None: ...

__all__ = ["Supervisor"]


class Supervisor:
    def __init__(
        self,
        argv: Sequence[str],
        config: Config,
        events: Events,
        clock: Callable[[], float] = time.monotonic,
        services: Sequence[Callable[[Supervisor], Service | None]] = (),
    ) -> None:
        self.argv = list(argv)
        self.config = config
        self.events = events
        self.clock = clock
        self.started_at = clock()
        self.loop = Loop(events, clock)
        self.child: Child | None = None
        self.closer: Closer | None = None  # --close-idle, made once the app runs
        self.drain = Drain(config, events, real_seams(
            config, clock, self.loop.runner_for("drain"), self._lookup_ports, send=self._send,
            group_alive=self._group_alive, closer=lambda: self.closer, quick_look=True))
        self.backstop: Backstop | None = None
        self._first_sigterm: float | None = None
        self._open_services = list(services)
        self._services: list[Service] = []

    def run(self) -> int:
        """Raises spawn.SpawnError when the app cannot be started."""
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
        self.drain.check_budget()
        self.child = child = spawn(self.argv, inherited_mask)
        self.events.start_writer()  # after the fork: from now on a thread writes the log
        self.drain.app_started(child.pid, self.argv)
        self.loop.add(_Reaper(child.pid, self._on_app_exit))
        self.loop.add(self.drain)
        if self.config.close_idle:
            self._open_closer(child.pid)
        # After the spawn: a service that fails to open only warns, and never delays the app.
        for open_service in self._open_services:
            service = open_service(self)
            if service is not None:
                self._services.append(service)
                self.loop.add(service)
        self.loop.on_signal = self._on_signal
        self.loop.on_error = self._on_error
        SignalWaiter(lambda signo, sender: self.loop.inbox.put(Signal(signo, sender))).start()
        try:
            while not self._done():
                self.loop.turn()
            if self.backstop is not None:
                assert self.backstop.exit_code is not None
                return self.backstop.exit_code
            code = self.drain.exit_code
            assert code is not None
            termination.report(self.config.termination_log, self.drain, self.clock(), code,
                               self.events)
            return code
        finally:
            for service in self._services:
                service.close()

    def _done(self) -> bool:
        return self.backstop.done if self.backstop is not None else self.drain.done

    def _on_signal(self, received: Signal) -> None:
        signo, sender = received.signo, received.sender
        if signo == signal.SIGCHLD:
            return  # the reap after every wake-up handles that one
        if signo == signal.SIGTERM and self._first_sigterm is None:
            self._first_sigterm = self.clock()
        if self.backstop is not None:
            self.backstop.signal(signo, sender)
            return
        try:
            self.drain.signal(signo, sender)
        except Exception as exc:
            self.loop.error("drain", exc)
            if self.backstop is not None and signo != signal.SIGTERM:
                self.backstop.signal(signo, sender)  # SIGTERM's time zero is recorded above

    def _on_app_exit(self, pid: int, status: int) -> None:
        if self.backstop is not None:
            self.backstop.app_exited(pid, status)
            return
        try:
            self.drain.app_exited(pid, status)
        except Exception as exc:
            self.loop.error("drain", exc)
            if self.backstop is not None:
                self.backstop.app_status = status
                self.backstop.tick()

    def _on_error(self, where: str, exc: BaseException) -> None:
        """The drain failed: the backstop carries on from what the drain had done."""
        if where != "drain" or self.backstop is not None or self.child is None:
            return
        drain = self.drain
        stop_sent = drain.phase in (Phase.STOPPING, Phase.KILLED, Phase.CLEANUP)
        self.backstop = Backstop(
            self.config, self.events, self.clock, self.child,
            t0=drain.t0 if drain.t0 is not None else self._first_sigterm,
            stop_sent=stop_sent, app_status=drain.app_status)
        self.loop.replace(drain, self.backstop)
        self.events.emit("warning", message="the drain failed: from now on drainctl only "
                         "forwards signals, sends the stop signal at the budget's deadline, "
                         "SIGKILL after stop-timeout, and exits with the app's code")

    # ---- what the drain asks of the world ----------------------------------------------------

    def _send(self, signo: int, group: bool) -> int:
        assert self.child is not None
        return self.child.send(signo, group)

    def _group_alive(self) -> bool:
        return self.child is not None and self.child.group_alive()

    def _open_closer(self, app_pid: int) -> None:
        """--close-idle: the closer, and a first look (off the loop) whether it can work here."""
        try:
            from drainctl.drain.closer import Closer
            from drainctl.drain.discovery import responsible_pids

            # The sockets of every process drainctl is responsible for, as the auto ports are
            # found (a daemonized server's too): the app first, where they usually are.
            self.closer = closer = Closer(
                lambda: [app_pid, *(p for p in responsible_pids() if p != app_pid)])
        except Exception as exc:  # e.g. no ctypes in a stripped build: the drain waits instead
            self.events.emit("warning", message=f"--close-idle is off: {exc}")
            return

        def probed(result: str | Exception | None) -> None:
            if isinstance(result, Exception):
                self.events.emit("error", where="job:close-probe", type=type(result).__name__,
                                 message=str(result)[:500])
            elif result:
                self.events.emit("warning", message=result)

        self.loop.runner_for("drain").submit(closer.probe, probed)

    def _lookup_ports(self) -> Discovery | list[int]:
        # Every process drainctl is responsible for, not only the app's tree (a daemonized
        # server is re-parented to drainctl), with its fallbacks; no psutil (discovery.py).
        try:
            from drainctl.drain.discovery import app_ports
        except (ImportError, SystemExit):  # the frozen bundle is gone: see _bundle
            if not _bundle.FROZEN:
                raise
            return _bundle.fallback_listening_ports()
        return app_ports()


class _Reaper:
    """Reaps after every wake-up: the app's exit is a fact for the drain, orphans just go."""

    def __init__(self, app_pid: int, app_exited: Callable[[int, int], None]) -> None:
        self._app_pid = app_pid
        self._app_exited = app_exited

    def tick(self) -> None:
        for pid, status in reaper.reap():
            if pid == self._app_pid:
                self._app_exited(pid, status)

    def next_wakeup(self) -> float | None:
        return None

