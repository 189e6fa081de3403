"""The commands' bodies, shared by the typer app (cli/app.py) and `run`'s fast path (__main__).

Each takes raw option values (flags; the environment is read here), does the work, and turns
every expected error into one line on stderr and a documented exit code. No typer here.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence

from drainctl.exitcodes import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NO_SUPERVISOR,
    EXIT_OK,
    EXIT_USAGE,
)
from drainctl.options import ConfigError, Duration, parse_ports, resolve

TYPE_CHECKING = False  # no typing at run time: PID 1's start-up (see options.py)
if TYPE_CHECKING:
    from typing import Any

    from drainctl.control.server import Server
    from drainctl.options import RawValue
    from drainctl.pid1.supervisor import Supervisor

__all__ = [
    "INTERVAL",
    "check",
    "connections",
    "fail",
    "prestop",
    "run",
    "status",
]

# `connections --watch --interval`: the same bounds as the drain's poll, up to an hour.
INTERVAL = Duration(maximum=3600.0, minimum=0.01)


def fail(message: str, code: int = EXIT_USAGE) -> int:
    try:
        sys.stderr.write(f"drainctl: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    return code


def run(raw: Mapping[str, RawValue], command: Sequence[str]) -> int:
    from drainctl.events import Events
    from drainctl.pid1.spawn import SpawnError
    from drainctl.pid1.supervisor import Supervisor

    if not command:
        return fail("run: no command given (usage: drainctl run [OPTIONS] -- COMMAND [ARG...])")
    try:
        config = resolve(raw)
    except ConfigError as exc:
        return fail(str(exc))
    events = Events(config.log_format)
    try:
        return Supervisor(command, config, events, services=[_control_server]).run()
    except SpawnError as exc:
        return fail(str(exc), exc.code)


def _control_server(supervisor: Supervisor) -> Server | None:
    """`run`'s control channel, handed the drain and the loop it serves (never the supervisor)."""
    from drainctl.control.server import Target, serve

    child = supervisor.child
    target = Target(drain=supervisor.drain, mode="supervisor", started_at=supervisor.started_at,
                    app_pid=lambda: None if child is None else child.pid)
    return serve(supervisor.config.control_socket, target, supervisor.events, supervisor.loop)


def prestop(raw: Mapping[str, RawValue]) -> int:
    from drainctl.control.prestop import PrestopError
    from drainctl.control.prestop import prestop as drain
    from drainctl.events import Events

    try:
        config = resolve(raw)
    except ConfigError as exc:
        return fail(str(exc))
    try:
        return drain(config, Events(config.log_format))
    except PrestopError as exc:
        return fail(f"prestop: {exc}", exc.code)
    except KeyboardInterrupt:
        return fail("prestop: interrupted", EXIT_INTERRUPTED)


def status(raw: Mapping[str, RawValue], as_json: bool = False) -> int:
    from drainctl.control import client as control
    from drainctl.control import render as report

    try:
        config = resolve(raw)
    except ConfigError as exc:
        return fail(str(exc))
    address = control.resolve_address(config.control_socket)
    try:
        answer = control.request_status(address)
    except TimeoutError:
        return fail(f"status: {address}: no answer in time", EXIT_NO_SUPERVISOR)
    except control.ControlError as exc:
        return fail(f"status: {exc}", EXIT_NO_SUPERVISOR)
    fields = {k: v for k, v in answer.items() if k not in ("v", "type")}
    try:
        text = json.dumps(fields) if as_json else report.status_text(fields)
    except (ValueError, TypeError, RecursionError, OverflowError) as exc:
        return fail(f"status: {address}: a reply that cannot be shown ({exc})",
                    EXIT_NO_SUPERVISOR)
    _print(text)
    return EXIT_OK


def connections(
    raw: Mapping[str, RawValue],
    port: Sequence[str] | None = None,
    as_json: bool = False,
    watch: bool = False,
    interval: str = "1s",
) -> int:
    """Count like the drain does; without ports, every listening port of this namespace."""
    import time

    from drainctl.control import render as report
    from drainctl.drain.connections import all_listening_ports, make_counter

    try:
        resolve(raw)
        ports = list(parse_ports(port or (), "--port"))
        pause = INTERVAL(interval, "--interval")
    except ConfigError as exc:
        return fail(str(exc))
    assert pause is not None
    counter = make_counter()
    try:
        while True:
            try:
                counts = counter.count(ports or all_listening_ports())
            except OSError as exc:
                return fail(f"connections: cannot count: {exc}", EXIT_FAILED)
            per_port = report.connections_json(counts)
            if as_json:
                doc: dict[str, Any] = {"ports": per_port, "established": counts.established,
                                       "method": counts.method}
                if watch:
                    doc["ts"] = round(time.time(), 3)
                _print(json.dumps(doc))
            else:
                _print(report.connections_line(per_port) if watch
                       else report.connections_table(per_port))
            if not watch:
                return EXIT_OK
            time.sleep(pause)  # a client command, not the supervisor: a plain sleep is fine
    except KeyboardInterrupt:
        return EXIT_OK  # ^C is how --watch ends
    except BrokenPipeError:
        # `| head`: the reader has seen enough. Point stdout at /dev/null so the interpreter's
        # final flush does not complain about the same pipe.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_OK


def check(raw: Mapping[str, RawValue]) -> int:
    from drainctl.cli.check import check as dry_run

    try:
        config = resolve(raw)
    except ConfigError as exc:
        return fail(str(exc))
    return dry_run(config, raw)


def _print(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def demo(*, as_json: bool, clients: int, slow_clients: int, delay: str) -> int:
    """The demo: flags in, exit code out (0 expected figures, 1 not, 2 usage, 130 ^C)."""
    # clients, threads, subprocesses: only when the demo runs
    from drainctl.demo.scenario import MAX_DELAY, DemoError, DemoOptions, main
    from drainctl.durations import DurationError, parse_duration

    try:
        # At most MAX_DELAY: the demo's grace period is GRACE_PERIOD.
        seconds = parse_duration(delay, "--delay", maximum=MAX_DELAY)
    except DurationError as exc:
        return fail(str(exc))
    try:
        return main(DemoOptions(clients, slow_clients, seconds), as_json)
    except DemoError as exc:
        return fail(f"demo: {exc}", EXIT_FAILED)
    except KeyboardInterrupt:
        return fail("demo: interrupted (every process it started is gone)", EXIT_INTERRUPTED)
