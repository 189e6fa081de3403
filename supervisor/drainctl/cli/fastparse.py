"""A small parser for the option table, so `drainctl run` never imports typer.

typer (and the click it bundles) costs ~100 ms and ~6 MiB at start-up, paid by every container
start and kept for the app's whole life by PID 1. `run`'s and `prestop`'s options are all in
options.OPTIONS, so a table-driven parse is exact (tests/test_options.py checks it against the
typer app); anything it does not understand (--help, an unknown flag, a missing value) goes to
the typer app, which gives the full help and the usage errors.
"""

from __future__ import annotations

from drainctl.options import OPTIONS

TYPE_CHECKING = False  # no typing at run time: PID 1's start-up (see options.py)
if TYPE_CHECKING:
    from collections.abc import Sequence

    from drainctl.options import RawValue

__all__ = ["NotFast", "parse"]


class NotFast(Exception):
    """Let the typer app handle this command line."""


def parse(command: str, args: Sequence[str]) -> tuple[dict[str, RawValue], list[str]]:
    """`args` after the command name -> (raw option values by name, positional arguments).

    Positional arguments end option parsing (like `--`), so `run python -c x` works.
    """
    by_flag = {o.flag: o for o in OPTIONS if command in o.commands}
    raw: dict[str, RawValue] = {o.name: None for o in by_flag.values()}
    multi: dict[str, list[str]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return _done(raw, multi), list(args[i + 1 :])
        if not arg.startswith("-") or arg == "-":
            return _done(raw, multi), list(args[i:])
        flag, has_value, value = arg.partition("=")
        option = by_flag.get(flag)
        if option is None:
            raise NotFast(arg)
        if option.kind == "flag":
            if has_value:
                raise NotFast(arg)
            raw[option.name] = True
        else:
            if not has_value:
                i += 1
                if i >= len(args):
                    raise NotFast(arg)
                value = args[i]
            if option.kind == "multi":
                multi.setdefault(option.name, []).append(value)
            else:
                raw[option.name] = value
        i += 1
    return _done(raw, multi), []


def _done(raw: dict[str, RawValue], multi: dict[str, list[str]]) -> dict[str, RawValue]:
    raw.update(multi)
    return raw
