"""What PID 1 still does when the drain itself has failed: the budget's deadlines and the exit.

Every rule of the shutdown is the drain's (drain/machine.py). This is only the safety net for a
bug in it (README, "Reliability"): once the drain raised, the supervisor hands its facts here
instead. Signals are forwarded as they come (a first SIGTERM only marks time zero, if the drain
had not); the stop signal goes to the app's group at the budget's deadline, SIGKILL
`stop-timeout` later (never past the grace period); when the app exits, what is left of its
group gets SIGTERM, then SIGKILL; drainctl exits with the app's code. No down call, no count:
it cannot drain, only keep the promises that do not need the drain.
"""

from __future__ import annotations

import signal

from drainctl import exitcodes
from drainctl.drain.budget import Budget
from drainctl.drain.machine import AFTER_KILL, GROUP_POLL, exit_fields, send_signal
from drainctl.signames import signal_name

TYPE_CHECKING = False  # no typing at run time: PID 1's start-up (drain/machine.py)
if TYPE_CHECKING:
    from collections.abc import Callable

    from drainctl.events import Events
    from drainctl.options import Config
    from drainctl.pid1.spawn import Child

__all__ = ["Backstop"]


class Backstop:
    def __init__(
        self,
        config: Config,
        events: Events,
        clock: Callable[[], float],
        child: Child,
        *,
        t0: float | None,
        stop_sent: bool,
        app_status: int | None,
    ) -> None:
        self.config = config
        self.events = events
        self.clock = clock
        self.child = child
        self.exit_code: int | None = None
        self.app_status = app_status
        self._t0 = t0
        self._stop_sent = stop_sent
        self._kill_at: float | None = None
        self._killed_at: float | None = None
        now = clock()
        if stop_sent:
            self._kill_at = self._capped(now + config.stop_timeout)
        if app_status is not None:
            self._app_gone(now)

    @property
    def done(self) -> bool:
        return self.exit_code is not None

    def signal(self, signo: int, sender: int) -> None:
        self.events.emit("signal.received", signal=signal_name(signo), sender=sender)
        if self.done:
            return
        if signo == signal.SIGTERM and self._t0 is None and self.app_status is None:
            self._t0 = self.clock()  # time zero: the stop signal follows at the budget's deadline
            return
        if signo == signal.SIGTERM and self.app_status is None and not self._stop_sent:
            self._stop()  # a second SIGTERM: now
            return
        self._send(signo, group=not self.config.single_child or self.app_status is not None)

    def app_exited(self, pid: int, status: int) -> None:
        self.app_status = status
        self.events.emit("child.exited", **exit_fields(pid, status))
        self._app_gone(self.clock())

    def tick(self) -> None:
        now = self.clock()
        if self.done:
            return
        if self.app_status is None and not self._stop_sent and self._t0 is not None and (
            now >= self._t0 + Budget.of(self.config).stop_deadline
        ):
            self._stop()
        if self._kill_at is not None and now >= self._kill_at and self._killed_at is None:
            self._kill(now)
        if self.app_status is not None and (
            not self.child.group_alive()
            or (self._killed_at is not None and now >= self._killed_at + AFTER_KILL)
        ):
            self._exit()
        elif self.app_status is None and self._killed_at is not None and (
            now >= self._killed_at + AFTER_KILL
        ):
            self._exit()

    def next_wakeup(self) -> float | None:
        now = self.clock()
        times = []
        if self._t0 is not None and not self._stop_sent and self.app_status is None:
            times.append(self._t0 + Budget.of(self.config).stop_deadline)
        if self._kill_at is not None and self._killed_at is None:
            times.append(self._kill_at)
        if self._killed_at is not None:
            times.append(self._killed_at + AFTER_KILL)
        if self.app_status is not None:
            times.append(now + GROUP_POLL)
        return min(times) if times else None

    def _stop(self) -> None:
        self._stop_sent = True
        self._kill_at = self._capped(self.clock() + self.config.stop_timeout)
        self._send(self.config.stop_signal, group=not self.config.single_child)

    def _app_gone(self, now: float) -> None:
        if self._killed_at is None and self.child.group_alive():
            self._send(signal.SIGTERM, group=True)
            self._kill_at = self._capped(now + self.config.stop_timeout)

    def _kill(self, now: float) -> None:
        self._killed_at = now
        pid = self._send(signal.SIGKILL, group=True, event=None)
        self.events.emit("kill.escalated", pid=pid)

    def _exit(self) -> None:
        code = exitcodes.from_wait_status(self.app_status) if self.app_status is not None else (
            128 + signal.SIGKILL)
        self.exit_code = self.config.exit_code_map.get(code, code)
        self.events.emit("exit", code=self.exit_code)

    def _capped(self, at: float) -> float:
        if self._t0 is None:
            return at
        return min(at, self._t0 + self.config.grace_period)

    def _send(self, signo: int, group: bool, event: str | None = "signal.forwarded") -> int:
        return send_signal(self.child.send, self.events, signo, group, event)
