"""The grace-period budget: when each step of the drain must be over, from the trigger.

Time zero is the trigger (the first SIGTERM, or prestop). The stop signal goes out no later than
`grace-period - stop-timeout`, whatever the other settings say, so the app always keeps its
stop-timeout before the kubelet's SIGKILL (README, "The budget").
"""

from __future__ import annotations

from drainctl.durations import format_duration

TYPE_CHECKING = False
if TYPE_CHECKING:
    from drainctl.options import Config

__all__ = ["Budget"]


class Budget:
    """The grace-period arithmetic. Offsets are seconds after the trigger (time zero).

    The stop signal goes out no later than `grace_period - stop_timeout`, whatever the other
    settings say, so the app always keeps its stop-timeout before the kubelet's SIGKILL.
    """

    __slots__ = ("delay", "drain_timeout", "grace_period", "stop_timeout")

    def __init__(
        self, grace_period: float, stop_timeout: float, delay: float, drain_timeout: float | None
    ) -> None:
        self.grace_period = grace_period
        self.stop_timeout = stop_timeout
        self.delay = delay
        self.drain_timeout = drain_timeout

    @property
    def stop_deadline(self) -> float:
        return max(0.0, self.grace_period - self.stop_timeout)

    @property
    def delay_end(self) -> float:
        # When the budget is shorter than the delay, the delay is cut to fit (the contract).
        return min(self.delay, self.stop_deadline)

    def wait_deadline(self, wait_started: float) -> float:
        """When the connection wait gives up, given the offset at which it started."""
        if self.drain_timeout is None:
            return self.stop_deadline
        return min(wait_started + self.drain_timeout, self.stop_deadline)

    def down_deadline(self, started: float, down_timeout: float) -> float:
        """When the down phase gives up (an offset), given the offset at which it started.

        Its own share of the budget, so the connection wait always gets time: at most what the
        down call's attempts take (downcall.down_call_max_s), and at most half of what is left
        until the stop signal.
        """
        from drainctl.drain.downcall import down_call_max_s

        left = max(0.0, self.stop_deadline - started)
        return started + min(down_call_max_s(down_timeout), left / 2)

    def problems(self) -> list[str]:
        """What cannot fit, with the numbers (warned about at start-up; `check` fails on them)."""
        d = format_duration
        found = []
        if self.stop_timeout >= self.grace_period:
            found.append(
                f"stop-timeout {d(self.stop_timeout)} >= grace-period {d(self.grace_period)}: "
                "no time is left to drain; the stop signal goes out at once"
            )
        elif self.delay >= self.stop_deadline:
            found.append(
                f"delay {d(self.delay)} >= grace-period {d(self.grace_period)} - stop-timeout "
                f"{d(self.stop_timeout)} = {d(self.stop_deadline)}: the delay is cut to "
                f"{d(self.stop_deadline)} and no time is left for connections to drain"
            )
        elif (
            self.drain_timeout is not None
            and self.delay + self.drain_timeout > self.stop_deadline
        ):
            found.append(
                f"delay {d(self.delay)} + drain-timeout {d(self.drain_timeout)} > grace-period "
                f"{d(self.grace_period)} - stop-timeout {d(self.stop_timeout)}: the connection "
                f"wait is cut to {d(self.stop_deadline - self.delay)}"
            )
        return found

    @classmethod
    def of(cls, config: Config) -> Budget:
        return cls(config.grace_period, config.stop_timeout, config.delay, config.drain_timeout)
