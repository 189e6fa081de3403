"""The drain state machine replayed against a fake clock and scripted seams (pure logic).

Each scenario is a row: a configuration, what the connection count is over time, what happens
from outside (a second SIGTERM, the app exiting...), and what must come out: the reason, when the
stop signal went out, whether SIGKILL was needed, and the order of the contract's events.
"""

from __future__ import annotations

import io
import itertools
import json
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from drainctl.drain.budget import Budget
from drainctl.drain.connections import Counts, PortCounts
from drainctl.drain.downcall import DownResult, ProbeResult
from drainctl.drain.machine import NOTHING_LISTENS, Drain, Phase, Seams
from drainctl.events import Events
from drainctl.options import Config


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Hang(Exception):
    """Raised by scripted work that never comes back (a down call that never answers)."""


class ScriptRunner:
    """Runs work inline, like InlineRunner, except work that raises Hang never reports."""

    def submit(self, work: Callable[[], Any], done: Callable[[Any], None]) -> None:
        try:
            result = work()
        except Hang:
            return
        except Exception as exc:
            result = exc
        done(result)


@dataclass
class World:
    """What the drain sees and does, recorded."""

    clock: FakeClock
    counts: Callable[[float], int]  # established connections at t (seconds after trigger)
    idle: Callable[[float], int] = lambda t: 0
    ports: list[int] = field(default_factory=lambda: [8080])
    down: DownResult | None = None
    down_hangs: bool = False
    count_errors_until: float = -1.0
    probe_closes: bool | None = True
    stops: list[float] = field(default_factory=list)
    kills: list[float] = field(default_factory=list)
    down_calls: list[float] = field(default_factory=list)
    cleanups: list[float] = field(default_factory=list)  # SIGTERM to the group after the exit
    app_exited: bool = False
    group_left: bool = False  # something of the app's group outlives it
    group_exits_on_sigterm: bool = True
    # the inline check at the trigger: a verdict, or an exception to raise; None: no such seam
    nothing_listens: bool | Exception | None = None
    quick_looks: int = 0
    lookups: list[float] = field(default_factory=list)
    lines_at_stop: list[int] = field(default_factory=list)  # log lines written at each stop
    log: io.StringIO | None = None
    t0: float = 1000.0

    def t(self) -> float:
        return round(self.clock.now - self.t0, 6)

    def count(self, ports: Sequence[int], idle_grace: float | None) -> Counts:
        if self.t() < self.count_errors_until:
            raise OSError("netlink: resource temporarily unavailable")
        n, idle = self.counts(self.t()), self.idle(self.t()) if idle_grace else 0
        return Counts(ports={p: PortCounts(established=n if p == ports[0] else 0,
                                           idle=idle if p == ports[0] else 0)
                             for p in ports}, method="fake")

    def call_down(self, deadline: float) -> DownResult:
        if self.down_hangs:
            raise Hang
        self.down_calls.append(self.t())
        return self.down or DownResult("http://x/down", 200, None, 5.0, 1)

    def send(self, signo: int, group: bool) -> int:
        if signo == signal.SIGKILL:
            self.kills.append(self.t())
            self.group_left = False
        elif signo == signal.SIGTERM and self.app_exited:
            self.cleanups.append(self.t())
            if self.group_exits_on_sigterm:
                self.group_left = False
        else:
            self.stops.append(self.t())
            if self.log is not None:
                self.lines_at_stop.append(len(self.log.getvalue().splitlines()))
        return -42 if group else 42

    def lookup(self) -> list[int]:
        self.lookups.append(self.t())
        return list(self.ports)

    def quick_look(self) -> bool:
        self.quick_looks += 1
        if isinstance(self.nothing_listens, Exception):
            raise self.nothing_listens
        return bool(self.nothing_listens)

    def group_alive(self) -> bool:
        return not self.app_exited or self.group_left

    def seams(self, supervising: bool = True) -> Seams:
        return Seams(
            clock=self.clock, runner=ScriptRunner(), count=self.count,
            lookup_ports=self.lookup, call_down=self.call_down,
            probe=lambda: ProbeResult(self.probe_closes, 200, None),
            send=self.send if supervising else None, group_alive=self.group_alive,
            nothing_listens=None if self.nothing_listens is None else self.quick_look,
        )


def simulate(
    config: Config,
    world: World,
    trigger: str = "SIGTERM",
    actions: Sequence[tuple[float, str]] = (),
    child_exits_after_stop: float | None = 0.5,
    until: float = 120.0,
) -> tuple[Drain, list[dict[str, Any]]]:
    """Drive the drain the way the supervisor's loop does: sleep to the next wake-up, tick."""
    stream = world.log = io.StringIO()
    events = Events("json", stream=stream, clock=world.clock)
    drain = Drain(config, events, world.seams())

    def exit_app(status: int = 0) -> None:
        world.app_exited = True
        drain.app_exited(42, status)

    todo = sorted(actions)
    if trigger == "prestop":
        drain.prestop(None)
    else:
        drain.signal(signal.SIGTERM, 1)
    while world.t() < until and drain.phase is not Phase.DONE:
        wake = drain.next_wakeup()
        exit_at = (world.stops[0] + child_exits_after_stop
                   if world.stops and child_exits_after_stop is not None else None)
        candidates = [w - world.t0 for w in [wake] if w is not None]
        if todo:
            candidates.append(todo[0][0])
        if exit_at is not None:
            candidates.append(exit_at)
        if not candidates:
            break
        world.clock.now = world.t0 + max(world.t(), min(candidates))
        if exit_at is not None and world.t() >= exit_at and not world.app_exited:
            exit_app(signal.SIGTERM)
            drain.tick()
            continue
        while todo and todo[0][0] <= world.t():
            _, action = todo.pop(0)
            if action == "sigterm":
                drain.signal(signal.SIGTERM, 1)
            elif action == "sigint":
                drain.signal(signal.SIGINT, 1)
            elif action == "exit":
                exit_app()
        drain.tick()
    return drain, [json.loads(line) for line in stream.getvalue().splitlines()]


def names(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in events if e["event"] != "connections"]


def finished(events: list[dict[str, Any]]) -> dict[str, Any]:
    found = [e for e in events if e["event"] == "drain.finished"]
    assert len(found) == 1, events
    return found[0]


def cfg(**kwargs: Any) -> Config:
    base: dict[str, Any] = dict(delay=5.0, grace_period=30.0, stop_timeout=10.0, settle=1.0,
                                poll_interval=0.1, down_url="http://127.0.0.1:8080/down")
    base.update(kwargs)
    return Config(**base)


# (id, config, world kwargs, trigger, actions, expected reason, expected stop time or None,
#  expected kills)
SCENARIOS: list[tuple[str, Config, dict[str, Any], str, list[tuple[float, str]], str,
                      float | None, int]] = [
    ("drains-after-clients-leave", cfg(), {"counts": lambda t: 3 if t < 7.0 else 0},
     "SIGTERM", [], "drained", 8.0, 0),
    ("never-drains-timeout-at-budget", cfg(), {"counts": lambda t: 2},
     "SIGTERM", [], "timeout", 20.0, 0),
    ("delay-cut-to-the-budget", cfg(delay=25.0), {"counts": lambda t: 2},
     "SIGTERM", [], "timeout", 20.0, 0),
    ("zero-at-deadline-is-drained", cfg(settle=5.0), {"counts": lambda t: 1 if t < 18 else 0},
     "SIGTERM", [], "drained", 20.0, 0),
    ("drain-timeout-caps-the-wait", cfg(drain_timeout=3.0), {"counts": lambda t: 1},
     "SIGTERM", [], "timeout", 8.0, 0),
    ("no-ports", cfg(), {"counts": lambda t: 0, "ports": []},
     "SIGTERM", [], "no-ports", 5.0, 0),
    ("second-sigterm-forces", cfg(), {"counts": lambda t: 1},
     "SIGTERM", [(2.0, "sigterm")], "forced", 2.0, 0),
    ("sigint-forces", cfg(), {"counts": lambda t: 1},
     "SIGTERM", [(6.0, "sigint")], "forced", 6.0, 0),
    ("app-exits-during-delay", cfg(), {"counts": lambda t: 1},
     "SIGTERM", [(3.0, "exit")], "child-exited", None, 0),
    ("app-exits-during-wait", cfg(), {"counts": lambda t: 1},
     "SIGTERM", [(9.0, "exit")], "child-exited", None, 0),
    # The down call gets at most half of what is left after the delay (7.5 s): then the wait.
    ("down-hangs-the-wait-still-runs", cfg(), {"counts": lambda t: 0, "down_hangs": True},
     "SIGTERM", [], "drained", 13.5, 0),
    ("down-hangs-connections-left", cfg(), {"counts": lambda t: 1, "down_hangs": True},
     "SIGTERM", [], "timeout", 20.0, 0),
    ("down-fails-drain-goes-on", cfg(),
     {"counts": lambda t: 0, "down": DownResult("u", None, "refused", 3.0, 3)},
     "SIGTERM", [], "drained", 6.0, 0),
    ("transient-count-errors", cfg(), {"counts": lambda t: 0, "count_errors_until": 5.5},
     "SIGTERM", [], "drained", 6.5, 0),
    ("idle-connections-do-not-hold", cfg(idle_grace=2.0),
     {"counts": lambda t: 2, "idle": lambda t: 2 if t > 9 else 1},
     "SIGTERM", [], "drained", 10.0, 0),
    ("prestop-then-kubelet-sigterm", cfg(), {"counts": lambda t: 0},
     "prestop", [(9.0, "sigterm")], "drained", 9.0, 0),
    ("prestop-no-sigterm-stop-at-budget", cfg(), {"counts": lambda t: 0},
     "prestop", [], "drained", 20.0, 0),
    ("sigterm-joins-a-prestop-drain", cfg(), {"counts": lambda t: 1 if t < 8 else 0},
     "prestop", [(2.0, "sigterm")], "drained", 9.0, 0),
    ("stop-timeout-budget-exceeds-grace", cfg(grace_period=8.0, stop_timeout=10.0),
     {"counts": lambda t: 1}, "SIGTERM", [], "timeout", 0.0, 0),
]


@pytest.mark.parametrize(
    "config, world_kwargs, trigger, actions, reason, stop_at, kills",
    [pytest.param(*row[1:], id=row[0]) for row in SCENARIOS],
)
def test_scenario(
    config: Config,
    world_kwargs: dict[str, Any],
    trigger: str,
    actions: list[tuple[float, str]],
    reason: str,
    stop_at: float | None,
    kills: int,
) -> None:
    world = World(clock=FakeClock(), **world_kwargs)
    drain, events = simulate(config, world, trigger=trigger, actions=actions)
    assert finished(events)["reason"] == reason
    if stop_at is None:
        assert world.stops == []
    else:
        assert len(world.stops) == 1
        assert world.stops[0] == pytest.approx(stop_at, abs=0.11)
        # never later than grace - stop-timeout
        assert world.stops[0] <= max(0.0, config.grace_period - config.stop_timeout) + 1e-6
    assert len(world.kills) == kills
    # the down call happens once, at the end of the (possibly cut) delay
    if not world_kwargs.get("down_hangs") and reason not in ("child-exited",) and not (
        reason == "forced" and (stop_at or 0) < config.delay
    ):
        assert world.down_calls == [pytest.approx(Budget.of(config).delay_end, abs=1e-6)]
    assert drain.phase is Phase.DONE


def test_event_order_of_a_full_drain() -> None:
    world = World(clock=FakeClock(), counts=lambda t: 2 if t < 6.5 else 0)
    _, events = simulate(cfg(), world)
    assert names(events) == ["signal.received", "drain.started", "delay.finished", "down.called",
                             "drain.finished", "signal.forwarded", "child.exited", "exit"]
    counts = [e["count"] for e in events if e["event"] == "connections"]
    assert counts[0] == 2 and counts[-1] == 0
    started = events[1]
    assert started["trigger"] == "SIGTERM" and started["deadline_s"] == 20.0
    down = next(e for e in events if e["event"] == "down.called")
    assert down["status"] == 200 and down["url"] == "http://127.0.0.1:8080/down"


def test_connections_event_at_least_once_a_second_while_unchanged() -> None:
    world = World(clock=FakeClock(), counts=lambda t: 1)
    _, events = simulate(cfg(drain_timeout=5.0), world)
    times = [e["ts"] - 1000.0 for e in events if e["event"] == "connections"]
    assert len(times) >= 5
    assert max(b - a for a, b in itertools.pairwise(times)) <= 1.0 + 0.11


def test_app_ignoring_the_stop_signal_is_killed_at_stop_timeout() -> None:
    world = World(clock=FakeClock(), counts=lambda t: 0)
    drain, _ = simulate(cfg(), world, child_exits_after_stop=None, until=40)
    assert world.stops == [pytest.approx(6.0, abs=0.11)]
    assert world.kills == [pytest.approx(16.0, abs=0.11)]
    assert drain.phase is Phase.DONE


def test_kill_never_later_than_the_grace_period() -> None:
    # forced late: stop at 25 s; the app's stop-timeout would end at 35 s, past grace (30 s)
    world = World(clock=FakeClock(), counts=lambda t: 1)
    _, _ = simulate(cfg(stop_timeout=10.0), world, actions=[(19.0, "sigterm")],
                    child_exits_after_stop=None, until=40)
    assert world.stops == [pytest.approx(19.0, abs=0.11)]
    assert world.kills == [pytest.approx(29.0, abs=0.11)]


def test_contract_warning_when_the_app_keeps_connections_alive() -> None:
    world = World(clock=FakeClock(), counts=lambda t: 0, probe_closes=False)
    _, events = simulate(cfg(), world)
    warnings = [e for e in events if e["event"] == "contract.warning"]
    assert len(warnings) == 1 and "Connection: close" in warnings[0]["message"]


def test_no_contract_warning_when_the_app_closes() -> None:
    world = World(clock=FakeClock(), counts=lambda t: 0, probe_closes=True)
    _, events = simulate(cfg(), world)
    assert "contract.warning" not in names(events)


def test_transient_count_errors_are_logged() -> None:
    world = World(clock=FakeClock(), counts=lambda t: 0, count_errors_until=5.5)
    _, events = simulate(cfg(), world)
    assert "connections.error" in names(events)


def test_standalone_drain_never_stops_the_app() -> None:
    world = World(clock=FakeClock(), counts=lambda t: 0)
    stream = io.StringIO()
    drain = Drain(cfg(), Events("json", stream=stream, clock=world.clock), world.seams(False))
    drain.prestop(None)
    while drain.phase is not Phase.DONE:
        wake = drain.next_wakeup()
        assert wake is not None
        world.clock.now = wake
        drain.tick()
    assert drain.outcome is not None and drain.outcome.reason == "drained"
    assert drain.exit_code == 0 and drain.state() == "done"
    assert world.stops == [] and world.kills == []


def test_a_second_prestop_joins() -> None:
    world = World(clock=FakeClock(), counts=lambda t: 1)
    drain = Drain(cfg(), Events("json", stream=io.StringIO(), clock=world.clock), world.seams())
    assert drain.prestop(None) is False
    assert drain.prestop(None) is True


# ---- the app's exit and what is left of its group --------------------------------------------


def run_exit(config: Config, world: World, actions: Sequence[tuple[float, str]],
             until: float = 60.0) -> tuple[Drain, list[dict[str, Any]]]:
    return simulate(config, world, actions=actions, child_exits_after_stop=None, until=until)


def test_app_exit_without_a_group_exits_at_once_with_its_code() -> None:
    world = World(clock=FakeClock(), counts=lambda t: 1)
    drain, events = run_exit(cfg(), world, [(3.0, "exit")])
    assert drain.phase is Phase.DONE and drain.exit_code == 0
    assert names(events)[-3:] == ["child.exited", "drain.finished", "exit"]
    assert world.cleanups == [] and world.kills == []


def test_group_left_after_the_exit_gets_sigterm_then_sigkill_at_stop_timeout() -> None:
    world = World(clock=FakeClock(), counts=lambda t: 1, group_left=True,
                  group_exits_on_sigterm=False)
    drain, events = run_exit(cfg(stop_timeout=4.0), world, [(3.0, "exit")])
    assert world.cleanups == [pytest.approx(3.0)]
    assert world.kills == [pytest.approx(7.0, abs=0.06)]
    assert drain.phase is Phase.DONE and drain.exit_code == 0
    assert names(events)[-5:] == ["child.exited", "drain.finished", "signal.forwarded",
                                  "kill.escalated", "exit"]


def test_group_cleanup_after_a_forwarded_stop_signal_still_gets_its_stop_timeout() -> None:
    # The stop signal went to the group at 6 s; the app exits at 9 s and leaves a helper: that
    # helper gets SIGTERM at 9 s and SIGKILL only at 9 + stop-timeout, not at once.
    world = World(clock=FakeClock(), counts=lambda t: 0, group_left=True,
                  group_exits_on_sigterm=False)
    drain, _ = run_exit(cfg(stop_timeout=5.0, grace_period=60.0), world, [(9.0, "exit")])
    assert world.stops == [pytest.approx(6.0, abs=0.11)]
    assert world.cleanups == [pytest.approx(9.0)]
    assert world.kills == [pytest.approx(14.0, abs=0.06)]
    assert drain.phase is Phase.DONE


def test_group_that_leaves_on_sigterm_is_not_killed() -> None:
    world = World(clock=FakeClock(), counts=lambda t: 1, group_left=True)
    drain, events = run_exit(cfg(), world, [(3.0, "exit")])
    assert world.cleanups == [pytest.approx(3.0)] and world.kills == []
    assert drain.phase is Phase.DONE and "kill.escalated" not in names(events)


def test_group_cleanup_never_past_the_grace_period() -> None:
    world = World(clock=FakeClock(), counts=lambda t: 1, group_left=True,
                  group_exits_on_sigterm=False)
    _, _ = run_exit(cfg(grace_period=30.0, stop_timeout=10.0), world, [(25.0, "exit")])
    assert world.kills == [pytest.approx(30.0, abs=0.06)]


def test_app_exit_before_any_trigger_then_prestop_reports_child_exited() -> None:
    world = World(clock=FakeClock(), counts=lambda t: 0)
    drain = Drain(cfg(), Events("json", stream=io.StringIO(), clock=world.clock), world.seams())
    world.app_exited = True
    drain.app_exited(42, 3 << 8)
    assert drain.phase is Phase.DONE and drain.exit_code == 3
    assert drain.prestop(None) is True
    assert drain.outcome is not None and drain.outcome.reason == "child-exited"
    assert drain.prestop_code() == 0


def test_exit_code_map_and_death_by_signal() -> None:
    world = World(clock=FakeClock(), counts=lambda t: 0)
    drain = Drain(cfg(exit_code_map={143: 0}), Events("json", stream=io.StringIO(),
                  clock=world.clock), world.seams())
    world.app_exited = True
    drain.app_exited(42, signal.SIGTERM)  # a wait status of death by SIGTERM
    assert drain.exit_code == 0


def test_killed_app_that_never_exits_is_given_up_on() -> None:
    world = World(clock=FakeClock(), counts=lambda t: 0)
    drain, events = simulate(cfg(), world, child_exits_after_stop=None, until=40)
    assert drain.phase is Phase.DONE and drain.exit_code == 137
    assert world.kills == [pytest.approx(16.0, abs=0.11)]
    assert any(e["event"] == "warning" for e in events)


def test_signals_outside_a_drain_are_forwarded_and_sigint_never_starts_one() -> None:
    world = World(clock=FakeClock(), counts=lambda t: 1)
    stream = io.StringIO()
    drain = Drain(cfg(), Events("json", stream=stream, clock=world.clock), world.seams())
    drain.signal(signal.SIGINT, 7)
    drain.signal(signal.SIGUSR1, 7)
    assert drain.phase is Phase.IDLE
    got = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["signal"] for e in got if e["event"] == "signal.forwarded"] == ["SIGINT", "SIGUSR1"]
    assert all(e["pid"] == -42 for e in got if e["event"] == "signal.forwarded")


def test_a_failed_forward_is_a_warning_not_a_crash() -> None:
    world = World(clock=FakeClock(), counts=lambda t: 1)
    stream = io.StringIO()

    def refuse(signo: int, group: bool) -> int:
        raise PermissionError(1, "Operation not permitted")

    seams = world.seams()
    seams.send = refuse
    drain = Drain(cfg(), Events("json", stream=stream, clock=world.clock), seams)
    drain.signal(signal.SIGUSR1, 7)
    got = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["event"] for e in got] == ["signal.received", "warning"]
    assert "not permitted" in got[-1]["message"]


def test_close_idle_reports_what_the_count_job_closed_and_counts_every_40ms() -> None:
    """--close-idle: each count job closes first; the drain logs `connections.closed` (this
    round, the total, the ports) only when it closed some, logs the job's one warning, and
    counts at least every 40 ms (drain/closer.py: POLL)."""
    clock = FakeClock()
    world = World(clock=clock, counts=lambda t: 3 if t < 5.1 else (1 if t < 5.2 else 0))
    sampled: list[float] = []
    base = world.count

    def count(ports: Sequence[int], idle_grace: float | None) -> Counts:
        sampled.append(world.t())
        counts = base(ports, idle_grace)
        t = world.t()
        closed = {ports[0]: 2} if 5.05 < t < 5.1 else ({ports[0]: 1} if 5.15 < t < 5.2 else {})
        warning = "cannot" if len(sampled) == 1 else None
        return Counts(ports=counts.ports, method="fake", closed=closed, warning=warning)

    world.count = count  # type: ignore[method-assign]
    _drain, events = simulate(cfg(close_idle=True, down_url=None, settle=0.5), world)
    closed = [e for e in events if e["event"] == "connections.closed"]
    assert [(e["count"], e["total"], e["ports"]) for e in closed] == [
        (2, 2, [8080]), (1, 3, [8080])]
    assert [e["message"] for e in events if e["event"] == "warning"] == ["cannot"]
    gaps = [b - a for a, b in itertools.pairwise(sampled)]
    assert gaps and max(gaps) <= 0.04 + 1e-6
    assert finished(events)["reason"] == "drained"


def test_close_idle_looks_again_soon_when_an_answer_waits_and_says_how_it_closed() -> None:
    """A count job whose closer saw an answer appear asks for another look HOLD_MIN later
    (`again_in`), sooner than the 40 ms cadence; `connections.closed` says how many of the
    closed connections went with an answer."""
    clock = FakeClock()
    world = World(clock=clock, counts=lambda t: 2 if t < 5.3 else 0)
    sampled: list[float] = []
    base = world.count

    def count(ports: Sequence[int], idle_grace: float | None) -> Counts:
        sampled.append(world.t())
        counts = base(ports, idle_grace)
        if len(sampled) == 3:
            counts.again_in = 0.02
        if len(sampled) == 4:
            counts.closed, counts.closed_with_answer = {ports[0]: 2}, 1
        return counts

    world.count = count  # type: ignore[method-assign]
    _drain, events = simulate(cfg(close_idle=True, down_url=None, settle=0.5), world)
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(sampled)]
    assert gaps[2] <= 0.02 + 0.001 < gaps[1], gaps
    closed = [e for e in events if e["event"] == "connections.closed"]
    assert [(e["count"], e["with_answer"]) for e in closed] == [(2, 1)]
    assert finished(events)["reason"] == "drained"


def test_without_close_idle_the_count_follows_poll_interval() -> None:
    world = World(clock=FakeClock(), counts=lambda t: 1 if t < 5.5 else 0)
    sampled: list[float] = []
    base = world.count

    def count(ports: Sequence[int], idle_grace: float | None) -> Counts:
        sampled.append(world.t())
        return base(ports, idle_grace)

    world.count = count  # type: ignore[method-assign]
    simulate(cfg(down_url=None), world)
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(sampled)]
    assert gaps and min(gaps) >= 0.1 - 1e-6


# ---- nothing listens at all: the inline check at the trigger --------------------------------


def fast(**kwargs: Any) -> Config:
    """A trigger with nothing to do before the port lookup: no delay, no down call, auto ports."""
    return cfg(**{"delay": 0.0, "down_url": None, **kwargs})


def test_nothing_listening_ends_no_ports_at_the_trigger_without_a_lookup() -> None:
    world = World(clock=FakeClock(), counts=lambda t: 0, ports=[8080], nothing_listens=True)
    drain, events = simulate(fast(), world)
    assert world.quick_looks == 1 and world.lookups == []
    done = finished(events)
    assert done["reason"] == "no-ports" and done["count"] == 0
    assert done["detail"] == NOTHING_LISTENS == "nothing listens on TCP in this network namespace"
    assert world.stops == [0.0]
    assert names(events) == ["signal.received", "drain.started", "delay.finished",
                             "drain.finished", "signal.forwarded", "child.exited", "exit"]
    assert "warning" not in names(events) and drain.phase is Phase.DONE


def test_the_stop_signal_goes_out_before_the_lines_that_lead_to_it() -> None:
    world = World(clock=FakeClock(), counts=lambda t: 0, nothing_listens=True)
    _, events = simulate(fast(), world)
    assert world.lines_at_stop == [0], "nothing formatted or written before the stop signal"
    assert [e["event"] for e in events][:5] == ["signal.received", "drain.started",
                                                "delay.finished", "drain.finished",
                                                "signal.forwarded"]


def test_the_stop_signal_after_a_drain_also_goes_out_before_its_lines() -> None:
    world = World(clock=FakeClock(), counts=lambda t: 1 if t < 2 else 0)
    _, events = simulate(fast(), world)
    before = [e["event"] for e in events][:world.lines_at_stop[0]]
    assert "connections" in before and "drain.finished" not in before
    assert finished(events)["reason"] == "drained"


# (id, what the check says, config) -> the drain looks the ports up, as without the check
LOOKUP_ANYWAY = [
    ("a-listener-somewhere", False, fast()),
    ("query-refused", OSError(93, "Protocol not supported"), fast()),
    ("query-timed-out", TimeoutError("timed out"), fast()),
    ("a-bug-in-the-check", RuntimeError("boom"), fast()),
]


@pytest.mark.parametrize("verdict, config", [pytest.param(*row[1:], id=row[0])
                                             for row in LOOKUP_ANYWAY])
def test_anything_but_nothing_listens_leaves_it_to_the_lookup(
    verdict: bool | Exception, config: Config,
) -> None:
    world = World(clock=FakeClock(), counts=lambda t: 2 if t < 3 else 0, nothing_listens=verdict)
    _, events = simulate(config, world)
    assert world.quick_looks == 1 and world.lookups == [0.0]
    assert finished(events)["reason"] == "drained"
    assert world.stops == [pytest.approx(4.0, abs=0.11)]  # zero at 3 s + settle 1 s
    said = [e for e in events if e["event"] in ("warning", "error")]
    if isinstance(verdict, TimeoutError):
        assert len(said) == 1 and said[0]["event"] == "warning"
        assert "50 ms" in said[0]["message"] and "looking up" in said[0]["message"]
    elif isinstance(verdict, OSError) or verdict is False:
        assert said == [], "a listener or a refused query is the ordinary case: no line"
    else:
        assert [(e["event"], e["where"]) for e in said] == [("error", "job:nothing-listens")]


def test_a_listener_that_is_not_the_apps_ends_as_the_lookup_says() -> None:
    world = World(clock=FakeClock(), counts=lambda t: 0, ports=[], nothing_listens=False)
    _, events = simulate(fast(), world)
    assert world.lookups == [0.0]
    assert finished(events)["reason"] == "no-ports" and "detail" not in finished(events)


# (id, config, world kwargs): the drain has something to do first, or was told its ports
NOT_ASKED = [
    ("a-delay", fast(delay=2.0), {}),
    ("a-down-call", fast(down_url="http://127.0.0.1:8080/down"), {}),
    ("explicit-ports", fast(ports=(8080,)), {}),
]


@pytest.mark.parametrize("config, world_kwargs", [pytest.param(*row[1:], id=row[0])
                                                  for row in NOT_ASKED])
def test_the_check_is_made_only_when_the_drain_would_only_wait_for_the_lookup(
    config: Config, world_kwargs: dict[str, Any],
) -> None:
    world = World(clock=FakeClock(), counts=lambda t: 0, ports=[], nothing_listens=True,
                  **world_kwargs)
    _, events = simulate(config, world)
    assert world.quick_looks == 0
    if config.ports:
        assert world.lookups == [] and finished(events)["reason"] == "drained"
    else:
        assert world.lookups and finished(events)["reason"] == "no-ports"


def test_a_prestop_with_nothing_listening_awaits_the_kubelets_sigterm() -> None:
    world = World(clock=FakeClock(), counts=lambda t: 0, nothing_listens=True)
    drain, events = simulate(fast(), world, trigger="prestop", actions=[(3.0, "sigterm")])
    assert world.lookups == []
    assert finished(events)["reason"] == "no-ports" and finished(events)["elapsed_s"] == 0.0
    assert world.stops == [3.0] and drain.phase is Phase.DONE


def test_held_events_are_written_in_order_at_the_last_release_with_their_own_times() -> None:
    clock = FakeClock()
    stream = io.StringIO()
    events = Events("json", stream=stream, clock=clock)
    heard: list[str] = []
    events.subscribe(lambda record: heard.append(record["event"]))
    events.hold()
    events.emit("a")
    events.hold()
    clock.now += 1.0
    events.emit("b")
    events.release()
    assert stream.getvalue() == "" and heard == []
    events.release()
    events.emit("c")
    written = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["event"], e["ts"]) for e in written] == [("a", 1000.0), ("b", 1001.0),
                                                         ("c", 1001.0)]
    assert heard == ["a", "b", "c"]
    events.release()  # one too many is harmless
    events.emit("d")
    assert stream.getvalue().splitlines()[-1].startswith('{"ts": 1001.0, "event": "d"')
