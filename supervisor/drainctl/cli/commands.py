"""The commands' bodies, shared by the typer app (cli.py) and `run`'s fast path (__main__).

Each takes raw option values (flags; the environment is read here), does the work, and turns
every expected error into one line on stderr and a documented exit code. No typer here.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence

from drainctl.options import ConfigError, RawValue, parse_duration, parse_port, resolve

TYPE_CHECKING = False  # no typing at run time: PID 1's start-up (see drain.py)
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "EXIT_NO_SUPERVISOR",
    "EXIT_USAGE",
    "check",
    "connections",
    "fail",
    "prestop",
    "run",
    "status",
]

EXIT_USAGE = 2
EXIT_NO_SUPERVISOR = 3  # status: no supervisor answers (CONTRACT)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports ^C


def fail(message: str, code: int = EXIT_USAGE) -> int:
    try:
        sys.stderr.write(f"drainctl: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    return code


def run(raw: Mapping[str, RawValue], command: Sequence[str]) -> int:
    from drainctl.control.server import serve_supervisor
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
        return Supervisor(command, config, events, services=[serve_supervisor]).run()
    except SpawnError as exc:
        return fail(str(exc), exc.code)


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
        return fail(f"status: {address}: a reply that cannot be shown ({exc})", EXIT_NO_SUPERVISOR)
    _print(text)
    return 0


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
        ports = sorted({parse_port(p, "--port") for item in port or () for p in item.split(",")
                        if p.strip()})
        pause = parse_duration(interval, "--interval")
    except ConfigError as exc:
        return fail(str(exc))
    if pause <= 0:
        return fail("--interval: must be greater than 0")
    counter = make_counter()
    try:
        while True:
            try:
                counts = counter.count(ports or all_listening_ports())
            except OSError as exc:
                return fail(f"connections: cannot count: {exc}", 1)
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
                return 0
            time.sleep(pause)  # a client command, not the supervisor: a plain sleep is fine
    except KeyboardInterrupt:
        return 0  # ^C is how --watch ends
    except BrokenPipeError:
        # `| head`: the reader has seen enough. Point stdout at /dev/null so the interpreter's
        # final flush does not complain about the same pipe.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0


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
