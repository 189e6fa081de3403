"""Every exit code drainctl gives, in one table.

The constants are what the code uses; `TABLE` says what each code means for which command, and
README.md's "Exit codes" table is this table (`python3 -m drainctl.exitcodes` prints it; a test
checks that the README holds it).
"""

from __future__ import annotations

import os

__all__ = [
    "EXIT_BROKEN",
    "EXIT_CANNOT_EXECUTE",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_LAUNCHER",
    "EXIT_LEFT",
    "EXIT_NOT_FOUND",
    "EXIT_NO_SUPERVISOR",
    "EXIT_OK",
    "EXIT_SIGNAL_BASE",
    "EXIT_USAGE",
    "TABLE",
    "from_wait_status",
    "markdown",
    "prestop_code",
    "signal_code",
]

EXIT_OK = 0
# prestop: the deadline was reached with connections left, or no drain could be confirmed.
EXIT_LEFT = 1
# check: the configuration cannot work as given.
EXIT_BROKEN = 1
# connections: cannot count; demo: the figures are not what the demo shows.
EXIT_FAILED = 1
# Bad usage: one line on stderr naming the flag or variable.
EXIT_USAGE = 2
# status: no supervisor answers.
EXIT_NO_SUPERVISOR = 3
# The frozen binary's launcher could not unpack (build/launcher.c has its own copy: it is C).
EXIT_LAUNCHER = 125
# run: the command exists but cannot be executed; and not found (the shell's and docker's codes).
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
# run: the app died by signal N -> 128 + N.
EXIT_SIGNAL_BASE = 128
# prestop, demo: interrupted by SIGINT (Ctrl-C), as a shell reports it.
EXIT_INTERRUPTED = EXIT_SIGNAL_BASE + 2


def signal_code(signo: int) -> int:
    """The code for a process killed by signal `signo` (143 for SIGTERM, 137 for SIGKILL)."""
    return EXIT_SIGNAL_BASE + signo


def from_wait_status(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128+N for death by signal N."""
    code = os.waitstatus_to_exitcode(status)
    return signal_code(-code) if code < 0 else code


def prestop_code(reason: str) -> int:
    """prestop's code for a drain's reason: EXIT_OK when nothing was left to wait for; any other
    reason (`timeout`, or one this version does not know) is EXIT_LEFT: never claim a drain."""
    return EXIT_OK if reason in _NOTHING_LEFT else EXIT_LEFT


_NOTHING_LEFT = frozenset({"drained", "no-ports", "child-exited", "forced"})


# (code, command, meaning): the README's table, row by row.
TABLE: tuple[tuple[str, str, str], ...] = (
    ("the app's", "run", "the app exited; `--exit-code-map` may remap it"),
    (f"`{EXIT_SIGNAL_BASE}+N`", "run",
     "the app died by signal N (143 for SIGTERM, 137 for SIGKILL)"),
    (f"`{EXIT_NOT_FOUND}`", "run", "command not found"),
    (f"`{EXIT_CANNOT_EXECUTE}`", "run",
     "command not executable (a directory, no exec permission, bad format)"),
    (f"`{EXIT_USAGE}`", "every command",
     "bad usage: unknown option, bad value or one past its maximum, in a flag or a `DRAINCTL_*` "
     "variable (one line on stderr naming it)"),
    (f"`{EXIT_OK}`", "prestop",
     "nothing left to wait for (`drained`, `no-ports`, `child-exited`, `forced`)"),
    (f"`{EXIT_LEFT}`", "prestop",
     "deadline reached with connections left, or no drain could be confirmed (the supervisor "
     "went away, or PID 1 is a supervisor that does not answer)"),
    (f"`{EXIT_USAGE}`", "prestop, status",
     "also: refused by the supervisor (another uid) or a protocol version it does not speak"),
    (f"`{EXIT_NO_SUPERVISOR}`", "status",
     "no supervisor answers (or it refused, stayed busy, answered nonsense, or the socket is held "
     "by a process `status` does not trust)"),
    (f"`{EXIT_OK}` / `{EXIT_BROKEN}`", "check",
     "`0` workable; `1` the budget cannot fit, the down URL's host:port refuses connections, or "
     "the control socket is held by a process `prestop` would not trust"),
    (f"`{EXIT_FAILED}`", "connections", "the connections cannot be counted here"),
    (f"`{EXIT_OK}` / `{EXIT_FAILED}`", "demo",
     "`0` the figures show the incident and the fix; `1` they do not, or the demo could not run"),
    (f"`{EXIT_LAUNCHER}`", "the frozen binary",
     "it could not unpack itself (no writable, exec-permitted directory: see below)"),
    (f"`{EXIT_INTERRUPTED}`", "prestop, demo", "interrupted (Ctrl-C)"),
)


def markdown() -> str:
    """TABLE as the README's markdown table."""
    rows = ["| code | command | when |", "|---|---|---|"]
    rows += [f"| {code} | {command} | {meaning} |" for code, command, meaning in TABLE]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
