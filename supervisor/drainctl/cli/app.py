"""The typer app: `--help`, usage errors, and every command but `run`'s fast path.

Options are generated from options.OPTIONS, so the help, the fast parser and the environment
variables cannot drift apart. Values arrive as strings and are validated by options.resolve,
which gives one-line errors naming the flag or the variable.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Optional

import typer

from drainctl import __version__
from drainctl import exitcodes as ex
from drainctl.cli import commands
from drainctl.options import OPTIONS, ConfigError, Option, parse_count

if TYPE_CHECKING:
    from drainctl.options import RawValue

__all__ = ["app", "app_main"]

HELP = """\
drainctl: a shell-free PID 1 that drains a pod's TCP connections before it stops the app.

  ENTRYPOINT ["/drainctl", "run", "--", "java", "-jar", "/app.jar"]
  lifecycle.preStop.exec.command: ["/drainctl", "prestop"]

On SIGTERM (or prestop) it waits --delay for endpoint removal to propagate, calls --down-url,
waits for the established connections on the app's ports to reach zero (within the grace
budget), and only then sends the app its stop signal. Every option also reads DRAINCTL_<NAME>;
a flag beats the variable. Durations: 250ms, 15s, 2m, 1h30m, or seconds; each has a maximum
(24h unless its help says otherwise). Exit codes: see the README.
"""

app = typer.Typer(
    help=HELP,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"drainctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """drainctl"""


def _parameter(option: Option) -> inspect.Parameter:
    help_text = f"{option.full_help()} [env: {option.env}]"
    if option.kind == "flag":
        default: Any = typer.Option(False, option.flag, help=help_text)
        annotation: Any = bool
    elif option.kind == "multi":
        default = typer.Option(None, option.flag, help=help_text, show_default=False)
        annotation = Optional[list[str]]  # noqa: UP045 (typer reads the runtime annotation)
    else:
        default = typer.Option(
            None, option.flag, help=help_text, metavar="VALUE",
            show_default=option.default or False,
        )
        annotation = Optional[str]  # noqa: UP045
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=annotation)


def command(
    name: str,
    help_text: str,
    body: Callable[..., int],
    extra: Sequence[inspect.Parameter] = (),
    **settings: Any,
) -> None:
    """Register `name` with the table's options for it; `body(raw, **extra)` returns the code."""
    options = [o for o in OPTIONS if name in o.commands]
    names = [o.name for o in options]

    def handler(**kwargs: Any) -> None:
        raw: dict[str, RawValue] = {n: kwargs.pop(n) for n in names}
        code = body(raw, **kwargs)
        raise typer.Exit(code)

    params = [*extra, *(_parameter(o) for o in options)]
    handler.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    handler.__annotations__ = {p.name: p.annotation for p in params}
    handler.__doc__ = help_text
    app.command(name, **settings)(handler)


command(
    "run",
    "Supervise COMMAND as PID 1: forward signals, reap zombies, drain on SIGTERM, pass on the "
    f"exit code ({ex.EXIT_SIGNAL_BASE}+N for death by signal N; {ex.EXIT_NOT_FOUND} not found; "
    f"{ex.EXIT_CANNOT_EXECUTE} not executable; {ex.EXIT_USAGE} bad usage).",
    lambda raw, command: commands.run(raw, command),
    extra=[inspect.Parameter(
        "command", inspect.Parameter.KEYWORD_ONLY,
        default=typer.Argument(..., metavar="-- COMMAND [ARG...]", show_default=False),
        annotation=list[str],
    )],
    context_settings={"allow_interspersed_args": False},
)


@app.command("demo", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def _demo(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
    clients: str = typer.Option("4", "--clients", metavar="1-20", help="Keep-alive clients."),
    slow_clients: str = typer.Option(
        "2", "--slow-clients", metavar="0-10", help="Slow clients (1.5 s requests)."
    ),
    delay: str = typer.Option(
        "1s", "--delay", metavar="VALUE", help="The old preStop's sleep and drainctl's --delay."
    ),
    app_mode: bool = typer.Option(False, "--app", hidden=True),
) -> None:
    """The incident and the fix, side by side, on loopback: a pod with keep-alive and slow
    clients terminated the naive way, then under drainctl; a timeline and the failure counts.
    No root, no HAProxy; about 15 seconds."""
    if app_mode:  # the demo's app, run through the frozen binary (there is no python there)
        from drainctl.demo import app as _demoapp

        raise typer.Exit(_demoapp.main(ctx.args))
    if ctx.args:
        ctx.fail(f"unexpected argument {ctx.args[0]!r}")
    try:
        counts = (parse_count(clients, "--clients", 1, 20),
                  parse_count(slow_clients, "--slow-clients", 0, 10))
    except ConfigError as exc:
        raise typer.Exit(commands.fail(str(exc))) from None
    raise typer.Exit(commands.demo(as_json=as_json, clients=counts[0],
                                   slow_clients=counts[1], delay=delay))


def _flag(name: str, flag: str, help_text: str) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                             default=typer.Option(False, flag, help=help_text), annotation=bool)


command(
    "prestop",
    "The preStop hook: start or join the supervisor's drain and return when it has finished; "
    f"without a supervisor, run the same drain here (never signalling the app). Exit {ex.EXIT_OK} "
    f"drained (or nothing left to wait for), {ex.EXIT_LEFT} deadline reached with connections "
    f"left, {ex.EXIT_USAGE} bad usage.",
    lambda raw: commands.prestop(raw),
)

command(
    "status",
    "What the running supervisor is doing: state, app pid, uptime, connections, time left. "
    f"Exit {ex.EXIT_NO_SUPERVISOR} when no supervisor answers.",
    lambda raw, as_json: commands.status(raw, as_json),
    extra=[_flag("as_json", "--json", "Print one JSON object.")],
)

command(
    "connections",
    "Established TCP connections per local port, counted as the drain counts them (the same "
    "numbers as `ss`). Without --port: every port something listens on in this network "
    "namespace.",
    lambda raw, port, as_json, watch, interval: commands.connections(
        raw, port, as_json, watch, interval),
    extra=[
        inspect.Parameter(
            "port", inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, "--port", help="A local port to count (repeatable, or a "
                                 "comma list).", show_default=False),
            annotation=Optional[list[str]],  # noqa: UP045 (typer reads the runtime annotation)
        ),
        _flag("as_json", "--json", "Print JSON: {\"ports\": {\"8080\": {\"established\": 3, "
              "\"close_wait\": 0, \"other\": 1}}, ...}; with --watch, one object per line."),
        _flag("watch", "--watch", "Count again every --interval until interrupted."),
        inspect.Parameter(
            "interval", inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option("1s", "--interval", metavar="DURATION",
                                 help="With --watch: time between counts "
                                 f"({commands.INTERVAL.limits()})."),
            annotation=str,
        ),
    ],
)

command(
    "check",
    "Dry run for a manifest: checks the options against the grace budget, shows the ports a "
    "drain would watch, checks that the down URL's host:port accepts a TCP connection (without "
    "calling it), prints the preStop hook and terminationGracePeriodSeconds to use. Exit "
    f"{ex.EXIT_OK} workable, {ex.EXIT_BROKEN} it cannot work as given, {ex.EXIT_USAGE} bad usage.",
    lambda raw: commands.check(raw),
)


def app_main(args: Sequence[str]) -> int:
    """Run the app; a usage error is one line (`drainctl: ...`) and exit 2, never a traceback."""
    try:
        # What the commands print may hold a name from argv or environ with bytes that are not
        # UTF-8 (a socket path, say): shown escaped rather than failing the whole report.
        sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        pass  # not a TextIOWrapper (a test's StringIO), or closed
    if not args:
        app(["--help"], prog_name="drainctl", standalone_mode=False)
        return ex.EXIT_USAGE
    try:
        result = app(list(args), prog_name="drainctl", standalone_mode=False)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except Exception as exc:
        # click's UsageError / BadParameter / Abort (typer bundles its own click, so match by
        # shape rather than importing a private module).
        message = getattr(exc, "format_message", None)
        if message is None:
            raise
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "drainctl"
        return commands.fail(f"{message()} (see '{where} --help')",
                             int(getattr(exc, "exit_code", 2)))
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(app_main(sys.argv[1:]))
