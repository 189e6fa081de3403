"""`python -m drainctl` and the console script; also the frozen binary's entry point."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["run"]:
        # The PID-1 path: parse with the option table alone (see argv.py), no typer.
        from drainctl import argv as fast
        from drainctl import commands

        try:
            raw, command = fast.parse("run", args[1:])
        except fast.NotFast:
            pass
        else:
            if command:
                return commands.run(raw, command)
    elif args[:1] == ["prestop"]:
        # The hook: its start-up time comes out of the grace period, so no typer either.
        from drainctl import argv as fast
        from drainctl import commands

        try:
            raw, extra = fast.parse("prestop", args[1:])
        except fast.NotFast:
            pass
        else:
            if not extra:
                return commands.prestop(raw)
    from drainctl.cli import app_main

    return app_main(args)


if __name__ == "__main__":
    sys.exit(main())
