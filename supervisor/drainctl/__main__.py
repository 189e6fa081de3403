"""`python -m drainctl` and the console script; also the frozen binary's entry point."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from drainctl import _startmask

__all__ = ["entry", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] != ["run"]:
        _startmask.restore()  # only `run` is PID 1: see entry()
    if args[:1] in (["run"], ["prestop"]):
        # PID 1, and the hook whose start-up comes out of the grace period: parse with the
        # option table alone (cli/fastparse.py), no typer. Anything unusual goes to typer.
        from drainctl.cli import commands
        from drainctl.cli import fastparse as fast

        try:
            raw, rest = fast.parse(args[0], args[1:])
        except fast.NotFast:
            pass
        else:
            if args[0] == "run" and rest:
                return commands.run(raw, rest)
            if args[0] == "prestop" and not rest:
                return commands.prestop(raw)
    from drainctl.cli.app import app_main

    return app_main(args)


def entry() -> None:
    """Run, then leave at once with the code: no interpreter shutdown.

    Tearing down the modules a drain loaded (httpx, httpcore, psutil) took 0.13-0.43 s after the
    `exit` event (measured in tests/e2e); for `prestop` that time delays the kubelet's SIGTERM,
    for `run` the pod's exit. Nothing of ours needs it: files are closed where they are written,
    and no atexit handler is registered. Only the standard streams need flushing.

    First of all, before any import of drainctl's, every signal is blocked (see _startmask): as
    PID 1 a SIGTERM that came during the imports was dropped by the kernel. `main` unblocks them
    again for every command but `run`.
    """
    _startmask.block()
    code = main()
    events = sys.modules.get("drainctl.events")
    if events is not None:
        events.flush_all(timeout=1.0)  # the log lines still queued, within a bound
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # AttributeError: it was closed (None)
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
