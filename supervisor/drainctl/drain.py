"""The drain: one explicit state machine, driven by the supervisor's loop.

    IDLE -> DELAY -> DOWN -> WAITING -> (drain.finished) -> STOPPING -> KILLED -> DONE
                 \\__________/                          \\-> AWAIT_SIGTERM (prestop trigger)
                                                        \\-> DONE (standalone prestop)

Nothing here blocks: the down call, the port lookup and each count run through the injected
`Runner` (a worker thread in production, inline in the unit tests) and come back as results that
`tick()` acts on. Every deadline is on the injected monotonic clock, measured from the trigger
(time zero), and the stop signal is never later than `grace-period - stop-timeout` (config.Budget).
Every transition goes through `_enter`, which checks the source state and logs the contract's
event for it.
"""

from __future__ import annotations

import enum

# `run` imports this module: no typing or dataclasses at run time (~30 ms and ~3 MiB of PID 1's
# start-up and memory, benchmarks/bench_startup.py). mypy treats TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any, Protocol, TypeVar

    from drainctl.config import Config
    from drainctl.connections import Counts
    from drainctl.discovery import Discovery
    from drainctl.downcall import DownResult, ProbeResult
    from drainctl.events import Events

    T = TypeVar("T")

    class Runner(Protocol):
        def submit(self, work: Callable[[], T], done: Callable[[T | Exception], None]) -> None:
            ...

__all__ = ["Drain", "InlineRunner", "Outcome", "Phase", "Seams"]


class Phase(enum.Enum):
    IDLE = "idle"
    DELAY = "delay"
    DOWN = "down"
    WAITING = "waiting"
    AWAIT_SIGTERM = "await-sigterm"  # drained after prestop; the kubelet's SIGTERM comes next
    STOPPING = "stopping"  # stop signal sent, waiting for the app to exit
    KILLED = "killed"  # SIGKILL sent, waiting for the exit
    DONE = "done"


DRAINING = frozenset({Phase.DELAY, Phase.DOWN, Phase.WAITING})

_ALLOWED: dict[Phase, frozenset[Phase]] = {
    Phase.DELAY: frozenset({Phase.IDLE}),
    Phase.DOWN: frozenset({Phase.DELAY}),
    Phase.WAITING: frozenset({Phase.DELAY, Phase.DOWN}),
    Phase.AWAIT_SIGTERM: DRAINING,
    Phase.STOPPING: DRAINING | {Phase.AWAIT_SIGTERM},
    Phase.KILLED: frozenset({Phase.STOPPING}),
    Phase.DONE: frozenset(Phase) - {Phase.DONE},
}


class InlineRunner:
    """Runs work at once in the caller: for unit tests and for callers with nothing to overlap."""

    def submit(self, work: Callable[[], T], done: Callable[[T | Exception], None]) -> None:
        try:
            result: T | Exception = work()
        except Exception as exc:
            result = exc
        done(result)


class Seams:
    """What the drain does to the world, passed in (STYLE: seams, not monkeypatching)."""

    __slots__ = ("call_down", "clock", "count", "kill", "lookup_ports", "prepare", "probe",
                 "runner", "stop")

    def __init__(
        self,
        clock: Callable[[], float],
        runner: Runner,
        count: Callable[[Sequence[int], float | None], Counts],
        # the app's listening ports (auto mode); a Discovery also says how they were found
        lookup_ports: Callable[[], list[int] | Discovery],
        call_down: Callable[[float], DownResult] | None = None,  # arg: deadline on clock
        probe: Callable[[], ProbeResult] | None = None,
        stop: Callable[[], None] | None = None,  # sends the stop signal; None: standalone
        kill: Callable[[], int] | None = None,  # sends SIGKILL; returns the pid it went to
        prepare: Callable[[], object] | None = None,  # warm-up at the trigger, off the loop
    ) -> None:
        self.clock = clock
        self.runner = runner
        self.count = count
        self.lookup_ports = lookup_ports
        self.call_down = call_down
        self.probe = probe
        self.stop = stop
        self.kill = kill
        self.prepare = prepare


class Outcome:
    __slots__ = ("count", "elapsed_s", "reason")

    def __init__(self, reason: str, count: int | None, elapsed_s: float) -> None:
        self.reason = reason  # drained, timeout, child-exited, forced, no-ports
        self.count = count
        self.elapsed_s = elapsed_s

    def __repr__(self) -> str:
        return f"Outcome({self.reason!r}, {self.count!r}, {self.elapsed_s!r})"


class _Wait:
    """State of the connection wait."""

    def __init__(self, ports: list[int] | None) -> None:
        self.ports = ports  # None: not looked up yet
        self.lookups = 0
        self.lookup_pending = False
        self.count_pending = False
        self.next_count_at = 0.0
        self.last: Counts | None = None
        self.zero_since: float | None = None
        self.last_event_at: float | None = None
        self.last_event_key: tuple[int, ...] | None = None
        self.warned = False  # a lookup's guess is logged once per drain
        self.detail: str | None = None  # why the lookup found no ports


class _Record:
    """What happened, for the termination message and `status`."""

    def __init__(self) -> None:
        self.trigger: str | None = None
        self.phases: list[tuple[str, float]] = []  # (phase, offset from t0)
        self.down: dict[str, Any] | None = None
        self.probe_warning: str | None = None


class Drain:
    def __init__(self, config: Config, events: Events, seams: Seams) -> None:
        self.config = config
        self.events = events
        self.seams = seams
        self.phase = Phase.IDLE
        self.t0: float | None = None
        self.outcome: Outcome | None = None
        self.record = _Record()
        self._budget = config.budget
        self._wait = _Wait(ports=list(config.ports) if config.ports else None)
        self._stop_at: float | None = None
        self._kill_at: float | None = None
        self._wait_deadline: float | None = None
        self._down_result: DownResult | Exception | None = None
        self._sigterm_seen = False

    # ---- inputs -------------------------------------------------------------------------------

    def start(self, trigger: str) -> bool:
        """The trigger (SIGTERM or prestop). False if a drain already started: join it."""
        if self.phase is not Phase.IDLE:
            return False
        self.t0 = self.seams.clock()
        self.record.trigger = trigger
        self._stop_at = self.t0 + self._budget.stop_deadline
        self._enter(Phase.DELAY, "drain.started", trigger=trigger,
                    deadline_s=round(self._budget.stop_deadline, 3))
        if self.seams.prepare is not None:
            self.seams.runner.submit(self.seams.prepare, lambda _: None)
        if self._wait.ports is None:
            self._lookup_ports()
        self.tick()
        return True

    def sigterm(self) -> bool:
        """A SIGTERM reached the supervisor. False: not the drain's business, forward it as is.

        The first starts the drain, or joins one that `prestop` started (they share one drain);
        a second one during the drain forces it (`forced`); after a prestop drain it is the
        kubelet's, and the stop signal goes out at once.
        """
        if self.phase is Phase.IDLE:
            return self.start("SIGTERM")
        if self.phase in DRAINING:
            if self.record.trigger == "prestop" and not self._sigterm_seen:
                self._sigterm_seen = True
            else:
                self._finish("forced")
            return True
        if self.phase is Phase.AWAIT_SIGTERM:
            self._stop()
            return True
        return False

    def interrupt(self) -> bool:
        """A SIGINT: forces a running drain; outside one it is forwarded (interactive Ctrl-C)."""
        if self.phase in DRAINING:
            self._finish("forced")
            return True
        return False

    def child_exited(self) -> None:
        """The app is gone: everything ends at once."""
        if self.phase in DRAINING:
            self._finish("child-exited", then_stop=False)
        if self.phase is not Phase.DONE and self.phase is not Phase.IDLE:
            self._enter(Phase.DONE)

    # ---- the clock ----------------------------------------------------------------------------

    def tick(self) -> None:
        """Advance on time and on results that came back; call after every wake-up."""
        now = self.seams.clock()
        if self.phase is Phase.DELAY and now >= self._offset(self._budget.delay_end):
            self._enter(self._after_delay(), "delay.finished", elapsed_s=self._elapsed(now))
            self._start_phase()
        if self.phase is Phase.DOWN:
            self._tick_down(now)
        if self.phase is Phase.WAITING:
            self._tick_wait(now)
        if self.phase in DRAINING and self._stop_at is not None and now >= self._stop_at:
            self._finish("drained" if self._holding() == 0 else "timeout")
        if self.phase is Phase.AWAIT_SIGTERM and self._stop_at is not None and now >= self._stop_at:
            self._stop()
        if self.phase is Phase.STOPPING and self._kill_at is not None and now >= self._kill_at:
            assert self.seams.kill is not None
            self._enter(Phase.KILLED, "kill.escalated", pid=self.seams.kill())

    def next_wakeup(self) -> float | None:
        """The next moment `tick()` has something to do (absolute, on the clock); None: never."""
        times: list[float] = []
        if self.phase is Phase.DELAY:
            times.append(self._offset(self._budget.delay_end))
        if self.phase in DRAINING | {Phase.AWAIT_SIGTERM} and self._stop_at is not None:
            times.append(self._stop_at)
        if self.phase is Phase.WAITING:
            if self._wait_deadline is not None:
                times.append(self._wait_deadline)
            if not self._wait.count_pending and self._wait.ports:
                times.append(self._wait.next_count_at)
        if self.phase is Phase.STOPPING and self._kill_at is not None:
            times.append(self._kill_at)
        return min(times) if times else None

    # ---- what the outside may read ------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self.phase in DRAINING

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    @property
    def ports(self) -> list[int] | None:
        return self._wait.ports

    def time_left(self) -> float | None:
        """Seconds until the stop signal must go out."""
        if self._stop_at is None:
            return None
        return max(0.0, self._stop_at - self.seams.clock())

    # ---- phases -------------------------------------------------------------------------------

    def _after_delay(self) -> Phase:
        return Phase.DOWN if self.seams.call_down is not None and self.config.down_url else (
            Phase.WAITING
        )

    def _start_phase(self) -> None:
        if self.phase is Phase.DOWN:
            assert self.seams.call_down is not None and self._stop_at is not None
            call, deadline = self.seams.call_down, self._stop_at
            self.seams.runner.submit(lambda: call(deadline), self._down_done)
        elif self.phase is Phase.WAITING:
            self._start_wait()

    def _down_done(self, result: DownResult | Exception) -> None:
        self._down_result = result

    def _tick_down(self, now: float) -> None:
        result = self._down_result
        if result is None:
            return
        self._down_result = None
        fields: dict[str, Any] = {"url": self.config.down_url}
        if isinstance(result, Exception):  # call_down never raises; this is a bug guard
            fields.update(error=f"{type(result).__name__}: {result}", elapsed_ms=0.0)
        else:
            if result.status is not None:
                fields["status"] = result.status
            else:
                fields["error"] = result.error
            fields["elapsed_ms"] = round(result.elapsed_ms, 1)
            if result.attempts > 1:
                fields["attempts"] = result.attempts
        self.record.down = dict(fields)
        self._enter(Phase.WAITING, "down.called", **fields)
        if (
            not isinstance(result, Exception)
            and result.ok
            and self.seams.probe is not None
            and self.config.probe_path is not None
        ):
            self.seams.runner.submit(self.seams.probe, self._probe_done)
        self._start_wait()

    def _probe_done(self, result: ProbeResult | Exception) -> None:
        if isinstance(result, Exception):
            return
        message = result.warning()
        if message:
            self.record.probe_warning = message
            self.events.emit("contract.warning", message=message)

    def _start_wait(self) -> None:
        assert self.t0 is not None
        now = self.seams.clock()
        self._wait_deadline = self.t0 + self._budget.wait_deadline(now - self.t0)
        self._wait.next_count_at = now
        if self._wait.ports == [] and not self._wait.lookup_pending:
            self._lookup_ports()  # none at the trigger: the app may have opened one since
        self._tick_wait(now)

    def _tick_wait(self, now: float) -> None:
        wait = self._wait
        # Results can arrive inline (InlineRunner) and finish the wait under our feet.
        if self.phase is not Phase.WAITING or wait.ports is None or wait.lookup_pending:
            return
        if not wait.ports:
            if wait.lookups >= 2:
                self._finish("no-ports")
            return
        if self._wait_deadline is not None and now >= self._wait_deadline:
            self._finish("drained" if self._holding() == 0 else "timeout")
            return
        if not wait.count_pending and now >= wait.next_count_at:
            wait.count_pending = True
            wait.next_count_at = now + self.config.poll_interval
            ports, grace, sampled = list(wait.ports), self.config.idle_grace, now
            self.seams.runner.submit(
                lambda: self.seams.count(ports, grace),
                lambda result: self._count_done(result, sampled),
            )

    def _count_done(self, result: Counts | Exception, sampled: float) -> None:
        wait = self._wait
        wait.count_pending = False
        if self.phase is not Phase.WAITING:
            return
        if isinstance(result, Exception):
            # A transient read error never aborts the drain (istio#50596): log, count again.
            self.events.emit("connections.error", error=f"{type(result).__name__}: {result}")
            return
        wait.last = result
        key = tuple(result.ports[p].established for p in sorted(result.ports))
        if key != wait.last_event_key or (
            wait.last_event_at is not None and sampled - wait.last_event_at >= 1.0
        ):
            wait.last_event_key, wait.last_event_at = key, sampled
            fields: dict[str, Any] = {"count": result.established, "ports": sorted(result.ports)}
            if self.config.idle_grace is not None:
                fields["idle"] = result.established - result.holding
            close_wait = sum(c.close_wait for c in result.ports.values())
            if close_wait:
                fields["close_wait"] = close_wait
            if result.close_wait_busy:
                fields["close_wait_busy"] = result.close_wait_busy
            self.events.emit("connections", **fields)
        if result.holding == 0:
            if wait.zero_since is None:
                wait.zero_since = sampled
            if sampled - wait.zero_since >= self.config.settle:
                self._finish("drained")
        else:
            wait.zero_since = None

    def _lookup_ports(self) -> None:
        wait = self._wait
        wait.lookup_pending = True
        self.seams.runner.submit(self.seams.lookup_ports, self._ports_found)

    def _ports_found(self, result: list[int] | Discovery | Exception) -> None:
        wait = self._wait
        wait.lookup_pending = False
        wait.lookups += 1
        if isinstance(result, Exception):
            self.events.emit("connections.error", error=f"port lookup: {result}")
            result = []
        elif not isinstance(result, list):  # a Discovery: the ports and how they were found
            if result.warning and not wait.warned:
                wait.warned = True
                self.events.emit("warning", message=result.warning)
            wait.detail = result.detail
            result = result.ports
        wait.ports = sorted(result)
        if self.phase is Phase.WAITING:
            if not wait.ports and wait.lookups < 2:
                self._lookup_ports()
            else:
                self._tick_wait(self.seams.clock())

    def _holding(self) -> int | None:
        last = self._wait.last
        return None if last is None else last.holding

    # ---- the end ------------------------------------------------------------------------------

    def _finish(self, reason: str, then_stop: bool = True) -> None:
        assert self.t0 is not None
        if self.outcome is not None:
            return
        now = self.seams.clock()
        last = self._wait.last
        count = None if last is None else last.established
        if reason == "no-ports":
            count = 0
        self.outcome = Outcome(reason, count, self._elapsed(now))
        fields: dict[str, Any] = {"reason": reason, "count": count,
                                  "elapsed_s": self.outcome.elapsed_s}
        if reason == "no-ports" and self._wait.detail:
            fields["detail"] = self._wait.detail  # what the lookup saw: why no ports
        if not then_stop:
            self.events.emit("drain.finished", **fields)
            self.record.phases.append(("finished", self.outcome.elapsed_s))
            return
        if self.seams.stop is None:
            self._enter(Phase.DONE, "drain.finished", **fields)
        elif self.record.trigger == "prestop" and not self._sigterm_seen and reason != "forced":
            self._enter(Phase.AWAIT_SIGTERM, "drain.finished", **fields)
        else:
            self.events.emit("drain.finished", **fields)
            self._stop()

    def _stop(self) -> None:
        assert self.seams.stop is not None and self.t0 is not None
        now = self.seams.clock()
        # The app keeps its stop-timeout, but never past the grace period: the kubelet's SIGKILL
        # comes then anyway, and ours lets us report it.
        self._kill_at = min(now + self.config.stop_timeout, self.t0 + self.config.grace_period)
        self._enter(Phase.STOPPING)
        self.seams.stop()

    # ---- the one place a phase changes ----------------------------------------------------------

    def _enter(self, phase: Phase, event: str | None = None, **fields: Any) -> None:
        if self.phase not in _ALLOWED[phase]:
            raise RuntimeError(f"drain: {self.phase.value} -> {phase.value} is not a transition")
        self.phase = phase
        now = self.seams.clock()
        self.record.phases.append((phase.value, self._elapsed(now)))
        if event is not None:
            self.events.emit(event, **fields)

    def _offset(self, seconds: float) -> float:
        assert self.t0 is not None
        return self.t0 + seconds

    def _elapsed(self, now: float) -> float:
        return round(now - self.t0, 3) if self.t0 is not None else 0.0
