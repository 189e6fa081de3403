"""The drain state machine replayed against a fake clock and scripted seams (pure logic).

Each scenario is a row: a configuration, what the connection count is over time, what happens
from outside (a second SIGTERM, the app exiting...), and what must come out: the reason, when the
stop signal went out, whether SIGKILL was needed, and the order of the contract's events.
"""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from drainctl.drain.budget import Budget
from drainctl.drain.connections import Counts, PortCounts
from drainctl.drain.downcall import DownResult, ProbeResult
from drainctl.drain.machine import Drain, Phase, Seams
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

    def seams(self) -> Seams:
        return Seams(
            clock=self.clock, runner=ScriptRunner(), count=self.count,
            lookup_ports=lambda: list(self.ports), call_down=self.call_down,
            probe=lambda: ProbeResult(self.probe_closes, 200, None),
            stop=lambda: self.stops.append(self.t()),
            kill=lambda: (self.kills.append(self.t()), -42)[1],
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
    stream = io.StringIO()
    events = Events("json", stream=stream, clock=world.clock)
    drain = Drain(config, events, world.seams())
    todo = sorted(actions)
    drain.start(trigger)
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
        if exit_at is not None and world.t() >= exit_at:
            drain.child_exited()
            continue
        while todo and todo[0][0] <= world.t():
            _, action = todo.pop(0)
            if action == "sigterm":
                drain.sigterm()
            elif action == "sigint":
                drain.interrupt()
            elif action == "exit":
                drain.child_exited()
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
    ("down-hangs-past-the-budget", cfg(), {"counts": lambda t: 0, "down_hangs": True},
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
    assert names(events) == ["drain.started", "delay.finished", "down.called", "drain.finished"]
    counts = [e["count"] for e in events if e["event"] == "connections"]
    assert counts[0] == 2 and counts[-1] == 0
    assert events[0]["trigger"] == "SIGTERM" and events[0]["deadline_s"] == 20.0
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
    assert drain.phase is Phase.KILLED


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
    seams = world.seams()
    seams.stop = None
    seams.kill = None
    drain = Drain(cfg(), Events("json", stream=stream, clock=world.clock), seams)
    drain.start("prestop")
    while drain.phase is not Phase.DONE:
        wake = drain.next_wakeup()
        assert wake is not None
        world.clock.now = wake
        drain.tick()
    assert drain.outcome is not None and drain.outcome.reason == "drained"
    assert world.stops == []


def test_a_second_start_joins() -> None:
    world = World(clock=FakeClock(), counts=lambda t: 1)
    drain = Drain(cfg(), Events("json", stream=io.StringIO(), clock=world.clock), world.seams())
    assert drain.start("prestop") is True
    assert drain.start("prestop") is False
    assert drain.phase is Phase.DELAY
