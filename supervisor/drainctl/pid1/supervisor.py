"""`drainctl run`: the PID-1 host. Set-up, then one loop, like tini's main():

  1. block every catchable signal (signals.block_all) and remember the inherited mask;
  2. register as child subreaper unless PID 1;
  3. spawn the app in its own process group with the inherited mask;
  4. loop (loop.py): wait for a signal, a finished job or a control client -> reap -> advance the
     drain -> serve -> until the drain says it is done; exit with the code it decided.

Every rule of the shutdown (what a signal means, when the app gets its stop signal, SIGKILL,
the clean-up of its group, the exit code) is the drain's (drain/machine.py); this host only feeds
it facts (signals, the app's exit) and carries out its requests (send a signal, run a job).
The only other threads are the signal waiter (it records) and short-lived jobs. Reaping never
waits on HTTP.
"""

from __future__ import annotations

import os
import signal
import time

from drainctl.drain import termination
from drainctl.drain.jobs import real_seams
from drainctl.drain.machine import Drain
from drainctl.pid1 import reaper
from drainctl.pid1.loop import Loop, Signal
from drainctl.pid1.signals import SignalWaiter, block_all
from drainctl.pid1.spawn import spawn

TYPE_CHECKING = False  # no typing at run time: PID 1's start-up (drain/machine.py)
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Protocol

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
        self.loop = Loop(clock)
        self.child: Child | None = None
        self.drain = Drain(config, events, real_seams(
            config, clock, self.loop.runner, self._lookup_ports, send=self._send,
            group_alive=self._group_alive))
        self._open_services = list(services)
        self._services: list[Service] = []

    def run(self) -> int:
        """Raises spawn.SpawnError when the app cannot be started."""
        inherited_mask = block_all()
        if os.getpid() != 1:
            failed = reaper.become_subreaper()
            if failed:
                self.events.emit("warning", message=f"cannot become child subreaper ({failed}): "
                                 "orphans of the app will not be reaped by drainctl")
        self.drain.check_budget()
        self.child = child = spawn(self.argv, inherited_mask)
        self.drain.app_started(child.pid, self.argv)
        self.loop.add(_Reaper(child.pid, self.drain))
        self.loop.add(self.drain)
        # After the spawn: a service that fails to open only warns, and never delays the app.
        for open_service in self._open_services:
            service = open_service(self)
            if service is not None:
                self._services.append(service)
                self.loop.add(service)
        self.loop.on_signal = self._on_signal
        SignalWaiter(lambda signo, sender: self.loop.inbox.put(Signal(signo, sender))).start()
        try:
            while not self.drain.done:
                self.loop.turn()
            code = self.drain.exit_code
            assert code is not None
            termination.report(self.config.termination_log, self.drain, self.clock(), code,
                               self.events)
            return code
        finally:
            for service in self._services:
                service.close()

    def _on_signal(self, received: Signal) -> None:
        if received.signo != signal.SIGCHLD:  # the reap after every wake-up handles that one
            self.drain.signal(received.signo, received.sender)

    # ---- what the drain asks of the world ----------------------------------------------------

    def _send(self, signo: int, group: bool) -> int:
        assert self.child is not None
        return self.child.send(signo, group)

    def _group_alive(self) -> bool:
        return self.child is not None and self.child.group_alive()

    def _lookup_ports(self) -> list[int]:
        from drainctl.drain.connections import listening_ports

        assert self.child is not None
        return listening_ports(self.child.pid)


class _Reaper:
    """Reaps after every wake-up: the app's exit is a fact for the drain, orphans just go."""

    def __init__(self, app_pid: int, drain: Drain) -> None:
        self._app_pid = app_pid
        self._drain = drain

    def tick(self) -> None:
        for pid, status in reaper.reap():
            if pid == self._app_pid:
                self._drain.app_exited(pid, status)

    def next_wakeup(self) -> float | None:
        return None

