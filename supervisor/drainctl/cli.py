"""The typer app: `--help`, usage errors, and every command but `run`'s fast path.

Options are generated from config.OPTIONS, so the help, the fast parser and the environment
variables cannot drift apart. Values arrive as strings and are validated by config.resolve, which
gives one-line errors naming the flag or the variable.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional

import typer

from drainctl import __version__, commands
from drainctl.config import OPTIONS, Option, RawValue

__all__ = ["app", "app_main"]

HELP = """\
drainctl: a shell-free PID 1 that drains a pod's TCP connections before it stops the app.

  ENTRYPOINT ["/drainctl", "run", "--", "java", "-jar", "/app.jar"]
  lifecycle.preStop.exec.command: ["/drainctl", "prestop"]

On SIGTERM (or prestop) it waits --delay for endpoint removal to propagate, calls --down-url,
waits for the established connections on the app's ports to reach zero (within the grace
budget), and only then sends the app its stop signal. Every option also reads DRAINCTL_<NAME>;
a flag beats the variable. Durations: 250ms, 15s, 2m, or seconds.
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
    help_text = f"{option.help} [env: {option.envvar}]"
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
    "exit code (128+N for death by signal N; 127 not found; 126 not executable; 2 bad usage).",
    lambda raw, command: commands.run(raw, command),
    extra=[inspect.Parameter(
        "command", inspect.Parameter.KEYWORD_ONLY,
        default=typer.Argument(..., metavar="-- COMMAND [ARG...]", show_default=False),
        annotation=list[str],
    )],
    context_settings={"allow_interspersed_args": False},
)


def app_main(args: Sequence[str]) -> int:
    """Run the app; a usage error is one line (`drainctl: ...`) and exit 2, never a traceback."""
    if not args:
        app(["--help"], prog_name="drainctl", standalone_mode=False)
        return commands.EXIT_USAGE
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
