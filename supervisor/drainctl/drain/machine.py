"""The drain: every rule of the shutdown, from the trigger to drainctl's exit, in one machine.

    IDLE --trigger--> DELAY -> DOWN -> WAITING --drain.finished--> STOPPING -> KILLED
                        \\_______________/    \\--> AWAIT_SIGTERM (prestop) --> STOPPING
                                              \\--> DONE (standalone prestop: never signals)
    the app exits, from any phase:  --> CLEANUP (what is left of its group) --> DONE (exit)

The hosts (`drainctl run` in pid1/supervisor.py, the standalone `prestop` in control/prestop.py)
only feed it facts: a signal received, the app started or exited, a prestop joined, and the
results of the jobs it asked for (port lookup, down call, probe, counts); and they carry out what
it asks through the seams: run a job, send a signal, is the group alive. Nothing here blocks:
jobs run in the host's runner (worker threads) and come back to `tick()`; the one exception is
`nothing_listens`, a kernel query bounded to QUICK_LOOK, made inline at a trigger with nothing to
do before the port lookup (`_quiet_namespace`). Every deadline is on
the injected monotonic clock, measured from the trigger (time zero), and follows the budget
(budget.py): the stop signal never later than `grace-period - stop-timeout`, SIGKILL never past
the grace period. Every phase change goes through `_enter`, which checks the source phase and
logs the event for it; signals go out through `_send`, which logs them. The events and their
fields are listed in docs/interface.md.
"""

from __future__ import annotations

import enum
import os
import signal

from drainctl import exitcodes, faults
from drainctl.drain.budget import Budget
from drainctl.redact import redact_url
from drainctl.signames import signal_name

# `run` imports this module: no typing or dataclasses at run time (PID 1's start-up,
# benchmarks/bench_startup.py). mypy treats TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any, Protocol, TypeVar

    from drainctl.drain.connections import Counts
    from drainctl.drain.discovery import Discovery
    from drainctl.drain.downcall import DownResult, ProbeResult
    from drainctl.events import Events
    from drainctl.options import Config

    T = TypeVar("T")

    class Runner(Protocol):
        def submit(self, work: Callable[[], T], done: Callable[[T | Exception], None]) -> None:
            ...

__all__ = ["Drain", "Outcome", "Phase", "Seams", "exit_fields", "send_signal"]


class Phase(enum.Enum):
    IDLE = "idle"  # the app runs; no trigger yet
    DELAY = "delay"  # endpoint removal propagates
    DOWN = "down"  # the down call is under way
    WAITING = "waiting"  # for the connections to reach zero
    AWAIT_SIGTERM = "await-sigterm"  # drained after prestop; the kubelet's SIGTERM comes next
    STOPPING = "stopping"  # stop signal sent; the app has its stop-timeout
    KILLED = "killed"  # SIGKILL sent to the app's group
    CLEANUP = "cleanup"  # the app exited; what is left of its group gets SIGTERM, then SIGKILL
    DONE = "done"  # over: the host exits (or returns) with `exit_code`


DRAINING = frozenset({Phase.DELAY, Phase.DOWN, Phase.WAITING})
_APP_ALIVE = DRAINING | {Phase.IDLE, Phase.AWAIT_SIGTERM, Phase.STOPPING}

_ALLOWED: dict[Phase, frozenset[Phase]] = {
    Phase.DELAY: frozenset({Phase.IDLE}),
    Phase.DOWN: frozenset({Phase.DELAY}),
    Phase.WAITING: frozenset({Phase.DELAY, Phase.DOWN}),
    Phase.AWAIT_SIGTERM: DRAINING,
    Phase.STOPPING: DRAINING | {Phase.AWAIT_SIGTERM},
    Phase.KILLED: frozenset({Phase.STOPPING, Phase.CLEANUP}),
    Phase.CLEANUP: _APP_ALIVE,
    Phase.DONE: frozenset(Phase) - {Phase.DONE},
}

# After the app's exit, how often to look whether anything of its group is left (no event tells
# when a grandchild whose parent is alive exits), and how long to wait for a process to vanish
# after SIGKILL (one in uninterruptible sleep may take a while; exiting ends it anyway).
GROUP_POLL = 0.05
AFTER_KILL = 2.0

CLOSE_IDLE_POLL = 0.04  # drain/closer.py: POLL

# The `nothing_listens` seam: the most it may hold the loop (seconds), and what the drain then
# says (the port lookup's own words for it, drain/discovery.py).
QUICK_LOOK = 0.05
NOTHING_LISTENS = "nothing listens on TCP in this network namespace"


def exit_fields(pid: int, status: int) -> dict[str, Any]:
    """The `child.exited` event's fields for a wait status: `code`, or the `signal` it died of."""
    if os.WIFSIGNALED(status):
        return {"pid": pid, "signal": signal_name(os.WTERMSIG(status))}
    return {"pid": pid, "code": os.waitstatus_to_exitcode(status)}


def send_signal(
    send: Callable[[int, bool], int], events: Events, signo: int, group: bool,
    event: str | None = "signal.forwarded",
) -> int:
    """Send through `send` and log it; nothing left to hear it is not an error, a refusal
    (EPERM) is a `warning`, never fatal. Returns the pid it went to (0: it did not go)."""
    try:
        target = send(signo, group)
    except ProcessLookupError:
        return 0
    except OSError as exc:
        events.emit("warning", message=f"cannot send {signal_name(signo)} to the app: "
                    f"{exc.strerror or exc}")
        return 0
    if event is not None:
        events.emit(event, signal=signal_name(signo), pid=target)
    return target


class Seams:
    """What the drain does to the world, passed in (seams, not monkeypatching).

    `send(signo, group)` signals the app (`group`: its process group) and returns the pid it went
    to (negative: the group, as in kill(2)); it raises ProcessLookupError when nothing is left
    and another OSError when it failed. `send` None: a standalone prestop, which never signals.
    """

    __slots__ = ("call_down", "clock", "count", "group_alive", "lookup_ports", "nothing_listens",
                 "prepare", "probe", "runner", "send")

    def __init__(
        self,
        clock: Callable[[], float],
        runner: Runner,
        count: Callable[[Sequence[int], float | None], Counts],
        # the app's listening ports (auto mode); a Discovery also says how they were found
        lookup_ports: Callable[[], list[int] | Discovery],
        call_down: Callable[[float], DownResult] | None = None,  # arg: deadline on clock
        probe: Callable[[], ProbeResult] | None = None,
        send: Callable[[int, bool], int] | None = None,
        group_alive: Callable[[], bool] = lambda: False,
        prepare: Callable[[], object] | None = None,  # warm-up at the trigger, off the loop
        # inline at the trigger (QUICK_LOOK at most): True when no TCP socket listens in the
        # network namespace at all; False when one does; raises when it cannot tell
        nothing_listens: Callable[[], bool] | None = None,
    ) -> None:
        self.clock = clock
        self.runner = runner
        self.count = count
        self.lookup_ports = lookup_ports
        self.call_down = call_down
        self.probe = probe
        self.send = send
        self.group_alive = group_alive
        self.prepare = prepare
        self.nothing_listens = nothing_listens


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
        self.lookup_pending = False
        self.looked_up_at: float | None = None
        self.next_lookup_at = 0.0  # after a failed lookup
        self.count_pending = False
        self.next_count_at = 0.0
        self.last: Counts | None = None
        self.zero_since: float | None = None
        self.last_event_at: float | None = None
        self.last_event_key: tuple[int, ...] | None = None
        self.lookup_started_at = 0.0
        self.warned = False  # a lookup's guess is logged once per drain
        self.detail: str | None = None  # why the lookup found no ports
        self.closed = 0  # --close-idle: connections closed so far


class Record:
    """What happened, for the termination message and `status`."""

    def __init__(self) -> None:
        self.trigger: str | None = None
        self.phases: list[tuple[str, float]] = []  # (phase, offset from t0), from the trigger
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
        self.record = Record()
        self.exit_code: int | None = None  # set on DONE
        self.app_status: int | None = None  # the app's wait status once it exited
        self._budget = Budget.of(config)
        self._wait = _Wait(ports=list(config.ports) if config.ports else None)
        self._stop_at: float | None = None  # the stop signal's deadline (time zero + budget)
        self._down_until: float | None = None  # the down phase's own share of the budget
        self._wait_until: float | None = None  # the connection wait's deadline
        self._kill_at: float | None = None  # SIGKILL (STOPPING, CLEANUP)
        self._give_up_at: float | None = None  # after SIGKILL: stop waiting for the group
        self._down_result: DownResult | Exception | None = None
        self._down_token = 0
        self._sigterm_seen = False
        self._failures: set[tuple[str, str]] = set()

    @property
    def supervising(self) -> bool:
        """Whether this drain may signal the app (`drainctl run`), not a standalone prestop."""
        return self.seams.send is not None

    # ---- facts from the host -------------------------------------------------------------------

    def check_budget(self) -> None:
        """At start-up: warn about a configuration that cannot fit, with the numbers."""
        for problem in self._budget.problems():
            self.events.emit("config.warning", message=problem)

    def app_started(self, pid: int, argv: Sequence[str]) -> None:
        self.events.emit("child.started", pid=pid, argv=list(argv))

    def signal(self, signo: int, sender: int) -> None:
        """A signal reached the supervisor (never SIGCHLD: that is the host's reaping).

        SIGTERM starts the drain, or joins a drain `prestop` started (they share one drain); a
        second one during the drain forces it (`forced`); after a prestop drain it is the
        kubelet's, and the stop signal goes out at once. SIGINT forces a running drain and is
        forwarded otherwise (Ctrl-C). Every other signal is forwarded at once. The events of
        what it did are written after the signals it sent (Events.hold).
        """
        self.events.hold()
        try:
            self._signal(signo, sender)
        finally:
            self.events.release()

    def _signal(self, signo: int, sender: int) -> None:
        self.events.emit("signal.received", signal=signal_name(signo), sender=sender)
        if self.phase is Phase.DONE:
            return
        if signo == signal.SIGTERM:
            if self.phase is Phase.IDLE:
                self._start("SIGTERM")
                return
            if self.phase in DRAINING:
                if self.record.trigger == "prestop" and not self._sigterm_seen:
                    self._sigterm_seen = True
                else:
                    self._finish("forced")
                return
            if self.phase is Phase.AWAIT_SIGTERM:
                self._stop()
                return
        elif signo == signal.SIGINT and self.phase in DRAINING:
            self._finish("forced")
            return
        self._forward(signo)

    def prestop(self, pid: int | None) -> bool:
        """A prestop asked to drain (`pid`: the hook's; None: this process is that prestop).

        False if it started the drain; True if it joined one that had started (or is over).
        """
        joined = self.t0 is not None
        if not joined and self.phase is not Phase.IDLE:
            # The app is gone and no drain ever ran: nothing is left to drain.
            self.outcome = Outcome("child-exited", 0, 0.0)
            return True
        if pid is not None:
            self.events.emit("prestop.received", pid=pid, joined=joined)
        if not joined:
            self._start("prestop")
        return joined

    def app_exited(self, pid: int, status: int) -> None:
        """The app (our direct child) exited: the drain ends; its group is cleaned up."""
        self.app_status = status
        self.events.emit("child.exited", **exit_fields(pid, status))
        if self.phase in DRAINING:
            self._finish("child-exited")
        elif self.phase in _APP_ALIVE:
            self._cleanup()
        elif self.phase is Phase.KILLED and not self.seams.group_alive():
            self._done()

    # ---- the clock -----------------------------------------------------------------------------

    def tick(self) -> None:
        """Advance on time and on results that came back; call after every wake-up."""
        faults.check("drain")
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
        if self.phase in (Phase.STOPPING, Phase.CLEANUP):
            if self.phase is Phase.CLEANUP and not self.seams.group_alive():
                self._done()
            elif self._kill_at is not None and now >= self._kill_at:
                self._kill()
        if self.phase is Phase.KILLED:
            if self.app_status is not None and not self.seams.group_alive():
                self._done()
            elif self._give_up_at is not None and now >= self._give_up_at:
                self.events.emit("warning", message=f"the app's process group is still there "
                                 f"{AFTER_KILL:g}s after SIGKILL: exiting anyway")
                self._done()

    def next_wakeup(self) -> float | None:
        """The next moment `tick()` has something to do (absolute, on the clock); None: never."""
        times: list[float] = []
        phase = self.phase
        if phase is Phase.DELAY:
            times.append(self._offset(self._budget.delay_end))
        if phase is Phase.DOWN and self._down_until is not None:
            times.append(self._down_until)
        if phase in DRAINING | {Phase.AWAIT_SIGTERM} and self._stop_at is not None:
            times.append(self._stop_at)
        if phase is Phase.WAITING:
            if self._wait_until is not None:
                times.append(self._wait_until)
            if not self._wait.count_pending and self._wait.ports:
                times.append(self._wait.next_count_at)
            if self._wait.ports is None and not self._wait.lookup_pending:
                times.append(self._wait.next_lookup_at)
        if phase in (Phase.STOPPING, Phase.CLEANUP) and self._kill_at is not None:
            times.append(self._kill_at)
        if phase is Phase.KILLED and self._give_up_at is not None:
            times.append(self._give_up_at)
        if phase is Phase.CLEANUP or (phase is Phase.KILLED and self.app_status is not None):
            times.append(self.seams.clock() + GROUP_POLL)
        return min(times) if times else None

    # ---- what the outside may read -------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self.phase in DRAINING

    @property
    def finished(self) -> bool:
        """The drain itself is over (the app may still be stopping)."""
        return self.outcome is not None

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    @property
    def ports(self) -> list[int] | None:
        return self._wait.ports

    def time_left(self) -> float | None:
        """Seconds until the stop signal must go out (while it has not)."""
        if self._stop_at is None or not (self.draining or self.phase is Phase.AWAIT_SIGTERM):
            return None
        return max(0.0, self._stop_at - self.seams.clock())

    def state(self) -> str:
        """The state `status` reports: running, draining, stopping, exiting (or done)."""
        phase = self.phase
        if phase is Phase.IDLE:
            return "running"
        if phase in DRAINING or phase is Phase.AWAIT_SIGTERM:
            return "draining"
        if not self.supervising:
            return "done"
        if phase in (Phase.CLEANUP, Phase.DONE) or self.app_status is not None:
            return "exiting"
        return "stopping"

    def status(self) -> dict[str, Any]:
        """The drain's part of `drainctl status --json`."""
        now = self.seams.clock()
        left = self.time_left()
        outcome = self.outcome
        return {
            "state": self.state(),
            "phase": self.phase.value,
            "trigger": self.record.trigger,
            "drain_elapsed_s": None if self.t0 is None else round(now - self.t0, 3),
            "time_left_s": None if left is None else round(left, 3),
            "outcome": None if outcome is None else {
                "reason": outcome.reason, "count": outcome.count, "elapsed_s": outcome.elapsed_s},
        }

    def prestop_code(self) -> int | None:
        """What `prestop` exits with, once the drain has finished."""
        return None if self.outcome is None else exitcodes.prestop_code(self.outcome.reason)

    # ---- the drain -----------------------------------------------------------------------------

    def _start(self, trigger: str) -> None:
        self.t0 = self.seams.clock()
        self.record.trigger = trigger
        self._stop_at = self.t0 + self._budget.stop_deadline
        self._enter(Phase.DELAY, "drain.started", trigger=trigger,
                    deadline_s=round(self._budget.stop_deadline, 3))
        if self._wait.ports is None:
            if self._quiet_namespace():
                wait = self._wait
                wait.ports, wait.detail = [], NOTHING_LISTENS
                wait.lookup_started_at = wait.looked_up_at = self.t0
            else:
                self._lookup_ports()
        # The warm-up hides imports in the delay; with no delay it would only compete with the
        # lookup on the signal's path (and the first count pays for itself).
        if self.seams.prepare is not None and self._budget.delay_end > 0:
            self.seams.runner.submit(self.seams.prepare, self._prepared)
        self.tick()

    def _quiet_namespace(self) -> bool:
        """Whether nothing listens on TCP in the network namespace, so that no port can be the
        app's: asked inline, once, at a trigger after which the drain would only wait for the
        port lookup (no delay, no down call, no --port). It spares the lookup's two thread
        hops; any listener (the app's or not), an error or a timeout leaves it to the lookup.
        """
        quick = self.seams.nothing_listens
        if (quick is None or self._budget.delay_end > 0
                or self._after_delay() is not Phase.WAITING):
            return False
        try:
            return quick()
        except TimeoutError:
            # A kernel that does not answer a LISTEN dump in QUICK_LOOK is worth one line; a
            # refused one (a sandbox without sock_diag) is not: the lookup has its fallbacks.
            self.events.emit("warning", message=f"no answer to the listening sockets query in "
                             f"{QUICK_LOOK * 1000:g} ms: looking up the app's ports instead")
        except OSError:
            pass
        except Exception as exc:
            self._job_failed("nothing-listens", exc)
        return False

    def _prepared(self, result: object) -> None:
        if isinstance(result, Exception):
            self._job_failed("prepare", result)

    def _job_failed(self, job: str, exc: Exception) -> None:
        """A job failed unexpectedly: one `error` event per job and kind (the drain goes on)."""
        key = (job, type(exc).__name__)
        if key in self._failures:
            return
        self._failures.add(key)
        self.events.emit("error", where=f"job:{job}", type=type(exc).__name__,
                         message=str(exc)[:500])

    def _after_delay(self) -> Phase:
        return Phase.DOWN if self.seams.call_down is not None and self.config.down_url else (
            Phase.WAITING
        )

    def _start_phase(self) -> None:
        if self.phase is Phase.DOWN:
            assert self.seams.call_down is not None and self.t0 is not None
            call = self.seams.call_down
            self._down_until = self.t0 + self._budget.down_deadline(
                self.seams.clock() - self.t0, self.config.down_timeout)
            deadline, token = self._down_until, self._down_token
            self.seams.runner.submit(lambda: call(deadline),
                                     lambda result: self._down_done(result, token))
        elif self.phase is Phase.WAITING:
            self._start_wait()

    def _down_done(self, result: DownResult | Exception, token: int) -> None:
        if token == self._down_token:
            self._down_result = result

    def _tick_down(self, now: float) -> None:
        result = self._down_result
        fields: dict[str, Any] = {"url": redact_url(self.config.down_url or "")}
        if result is None:
            if self._down_until is None or now < self._down_until:
                return
            # The call did not come back within its share of the budget: the connection wait
            # gets the rest; a late answer is ignored.
            self._down_token += 1
            fields.update(error="timeout", elapsed_ms=round(
                (now - self._offset(self._budget.delay_end)) * 1000.0, 1))
        elif isinstance(result, Exception):  # call_down never raises; this is a bug guard
            fields.update(error=f"{type(result).__name__}: {result}", elapsed_ms=0.0)
            self._job_failed("down", result)
        else:
            if result.status is not None:
                fields["status"] = result.status
            else:
                fields["error"] = result.error
            fields["elapsed_ms"] = round(result.elapsed_ms, 1)
            if result.attempts > 1:
                fields["attempts"] = result.attempts
        self._down_result = None
        self.record.down = dict(fields)
        self._enter(Phase.WAITING, "down.called", **fields)
        if (
            result is not None
            and not isinstance(result, Exception)
            and result.ok
            and self.seams.probe is not None
            and self.config.probe_path is not None
        ):
            self.seams.runner.submit(self.seams.probe, self._probe_done)
        self._start_wait()

    def _probe_done(self, result: ProbeResult | Exception) -> None:
        if isinstance(result, Exception):
            self._job_failed("probe", result)
            return
        message = result.warning()
        if message:
            self.record.probe_warning = message
            self.events.emit("contract.warning", message=message)

    def _start_wait(self) -> None:
        assert self.t0 is not None
        now = self.seams.clock()
        self._wait_until = self.t0 + self._budget.wait_deadline(now - self.t0)
        wait = self._wait
        wait.next_count_at = now
        if wait.ports == [] and not wait.lookup_pending and self._stale_lookup():
            self._lookup_ports()  # none at the trigger: the app may have opened one since
        self._tick_wait(now)

    def _tick_wait(self, now: float) -> None:
        wait = self._wait
        # Results can arrive inline (an inline runner) and finish the wait under our feet.
        if self.phase is not Phase.WAITING:
            return
        if self._wait_until is not None and now >= self._wait_until:
            self._finish("drained" if self._holding() == 0 else "timeout")
            return
        if wait.lookup_pending:
            return
        if wait.ports is None:  # the last lookup failed: never guess "no ports" from an error
            if now >= wait.next_lookup_at:
                self._lookup_ports()
            return
        if not wait.ports:
            self._finish("no-ports")
            return
        if not wait.count_pending and now >= wait.next_count_at:
            wait.count_pending = True
            # --close-idle closes a connection with an answer, which waits for it: look often
            wait.next_count_at = now + (min(self.config.poll_interval, CLOSE_IDLE_POLL)
                                        if self.config.close_idle else self.config.poll_interval)
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
            if not isinstance(result, OSError):
                self._job_failed("count", result)
            return
        wait.last = result
        if result.again_in is not None:  # --close-idle: an answer waits to be closed with
            wait.next_count_at = min(wait.next_count_at, self.seams.clock() + result.again_in)
        if result.warning:
            self.events.emit("warning", message=result.warning)
        if result.closed:
            closed = sum(result.closed.values())
            wait.closed += closed
            self.events.emit("connections.closed", count=closed, total=wait.closed,
                             ports=sorted(result.closed),
                             with_answer=result.closed_with_answer)
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
        self._wait.lookup_pending = True
        self._wait.lookup_started_at = self.seams.clock()
        self.seams.runner.submit(self.seams.lookup_ports, self._ports_found)

    def _ports_found(self, result: list[int] | Discovery | Exception) -> None:
        wait = self._wait
        wait.lookup_pending = False
        wait.looked_up_at = self.seams.clock()
        if isinstance(result, Exception):
            self.events.emit("connections.error", error=f"port lookup: {result}")
            if not isinstance(result, OSError):
                self._job_failed("lookup", result)
            wait.next_lookup_at = wait.looked_up_at + self.config.poll_interval
            return
        if not isinstance(result, list):  # a Discovery: the ports and how they were found
            if result.warning and not wait.warned:
                wait.warned = True
                self.events.emit("warning", message=result.warning)
            wait.detail = result.detail
            result = list(result.ports)
        wait.ports = sorted(result)
        if self.phase is Phase.WAITING:
            if not wait.ports and self._stale_lookup():
                self._lookup_ports()  # none at the trigger: the app may have opened one since
            else:
                self._tick_wait(self.seams.clock())

    def _stale_lookup(self) -> bool:
        """Whether the last lookup started before the delay ended (so the app had time since)."""
        assert self.t0 is not None
        return self._wait.lookup_started_at < self._offset(self._budget.delay_end)

    def _holding(self) -> int | None:
        last = self._wait.last
        return None if last is None else last.holding

    # ---- the end -------------------------------------------------------------------------------

    def _finish(self, reason: str) -> None:
        """The drain is over; what comes next depends on who triggered it and who we are."""
        assert self.t0 is not None
        if self.outcome is not None:
            return
        last = self._wait.last
        count = 0 if reason == "no-ports" else (None if last is None else last.established)
        self.outcome = Outcome(reason, count, self._elapsed(self.seams.clock()))
        fields: dict[str, Any] = {"reason": reason, "count": count,
                                  "elapsed_s": self.outcome.elapsed_s}
        if reason == "no-ports" and self._wait.detail:
            fields["detail"] = self._wait.detail  # what the lookup saw: why no ports
        if reason == "child-exited":
            self._cleanup("drain.finished", fields)
        elif not self.supervising:
            self._enter(Phase.DONE, "drain.finished", **fields)
            self.exit_code = exitcodes.prestop_code(reason)
        elif self.record.trigger == "prestop" and not self._sigterm_seen and reason != "forced":
            self._enter(Phase.AWAIT_SIGTERM, "drain.finished", **fields)
        else:
            self._stop("drain.finished", fields)

    def _stop(self, event: str | None = None, fields: dict[str, Any] | None = None) -> None:
        assert self.t0 is not None
        now = self.seams.clock()
        # The app keeps its stop-timeout, but never past the grace period: the kubelet's SIGKILL
        # comes then anyway, and ours lets us report it.
        self._kill_at = min(now + self.config.stop_timeout, self.t0 + self.config.grace_period)
        self.events.hold()  # the stop signal first, the lines that say so after
        try:
            self._enter(Phase.STOPPING, event, **(fields or {}))
            self._forward(self.config.stop_signal)
        finally:
            self.events.release()

    def _kill(self) -> None:
        target = self._send(signal.SIGKILL, group=True, event=None)
        self._give_up_at = self.seams.clock() + AFTER_KILL
        self._enter(Phase.KILLED, "kill.escalated", pid=target)

    def _cleanup(self, event: str | None = None, fields: dict[str, Any] | None = None) -> None:
        """The app exited: what is left of its group gets SIGTERM, and SIGKILL at stop-timeout
        (never past the grace period); a signal forwarded earlier does not shorten that."""
        if self.phase is Phase.KILLED:
            return
        now = self.seams.clock()
        self._kill_at = now + self.config.stop_timeout
        if self.t0 is not None:
            self._kill_at = min(self._kill_at, self.t0 + self.config.grace_period)
        self._enter(Phase.CLEANUP, event, **(fields or {}))
        if self.supervising and self.seams.group_alive():
            self._send(signal.SIGTERM, group=True)
        if not (self.supervising and self.seams.group_alive()):
            self._done()

    def _done(self) -> None:
        if self.supervising:
            code = exitcodes.from_wait_status(self.app_status) if self.app_status is not None else (
                128 + signal.SIGKILL)
            self.exit_code = self.config.exit_code_map.get(code, code)
            self._enter(Phase.DONE, "exit", code=self.exit_code)
        else:
            self._enter(Phase.DONE)

    # ---- signals out ---------------------------------------------------------------------------

    def _forward(self, signo: int) -> None:
        """To the app's process group (or the app alone with --single-child, while it lives)."""
        if not self.supervising:
            return
        group = not self.config.single_child or self.app_status is not None
        self._send(signo, group=group)

    def _send(self, signo: int, group: bool, event: str | None = "signal.forwarded") -> int:
        assert self.seams.send is not None
        return send_signal(self.seams.send, self.events, signo, group, event)

    # ---- the one place a phase changes ---------------------------------------------------------

    def _enter(self, phase: Phase, event: str | None = None, **fields: Any) -> None:
        if self.phase not in _ALLOWED[phase]:
            raise RuntimeError(f"drain: {self.phase.value} -> {phase.value} is not a transition")
        self.phase = phase
        if self.t0 is not None:
            self.record.phases.append((phase.value, self._elapsed(self.seams.clock())))
        if event is not None:
            self.events.emit(event, **fields)

    def _offset(self, seconds: float) -> float:
        assert self.t0 is not None
        return self.t0 + seconds

    def _elapsed(self, now: float) -> float:
        return round(now - self.t0, 3) if self.t0 is not None else 0.0
