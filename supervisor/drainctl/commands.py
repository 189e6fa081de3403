"""The commands' bodies, shared by the typer app (cli.py) and `run`'s fast path (__main__).

Each takes raw option values (flags; the environment is read here), does the work, and turns
every expected error into one line on stderr and a documented exit code. No typer here.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

from drainctl.config import ConfigError, RawValue, resolve

__all__ = ["EXIT_USAGE", "fail", "run"]

EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_USAGE) -> int:
    try:
        sys.stderr.write(f"drainctl: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    return code


def run(raw: Mapping[str, RawValue], command: Sequence[str]) -> int:
    from drainctl.child import SpawnError
    from drainctl.events import Events
    from drainctl.supervise import Supervisor

    if not command:
        return fail("run: no command given (usage: drainctl run [OPTIONS] -- COMMAND [ARG...])")
    try:
        config = resolve(raw)
    except ConfigError as exc:
        return fail(str(exc))
    events = Events(config.log_format)
    try:
        return Supervisor(command, config, events).run()
    except SpawnError as exc:
        return fail(str(exc), exc.code)
