"""`drainctl check`: a dry run for a manifest. Is this configuration workable?

It validates the options against the grace budget (drain/budget.py), shows the ports a
drain would watch, checks that the down URL's host:port accepts a TCP connection (it connects and
closes: the URL itself is never called, so the app does not go down), says whether a supervisor
answers on the control socket and whether the termination log is writable, and prints the
`lifecycle.preStop` and `terminationGracePeriodSeconds` to put in the pod spec.

Exit codes: 0 workable (notes may still be printed); 1 it cannot work as given (a budget problem,
or the down URL's host:port does not accept connections); 2 bad usage (an invalid option).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, TextIO
from urllib.parse import urlsplit

from drainctl.control import client as control
from drainctl.drain.budget import Budget
from drainctl.durations import format_duration
from drainctl.exitcodes import EXIT_BROKEN, EXIT_OK
from drainctl.options import OPTIONS, Config
from drainctl.redact import redact_url

if TYPE_CHECKING:
    from drainctl.options import RawValue

__all__ = ["check"]

# A TCP connect to the down URL's host:port never waits longer than this in a dry run.
_CONNECT_TIMEOUT_MAX = 3.0


def check(config: Config, given: Mapping[str, RawValue], out: TextIO | None = None) -> int:
    """Print the report; `given` holds the flags from the command line (for the preStop)."""
    out = out if out is not None else sys.stdout
    problems: list[str] = []

    def line(label: str, text: str) -> None:
        out.write(f"{label + ':':<17}{text}\n")

    budget = Budget.of(config)
    wait = budget.stop_deadline - budget.delay_end
    if config.drain_timeout is not None:
        wait = min(wait, config.drain_timeout)
    s = format_duration
    line("budget", f"grace-period {s(config.grace_period)}: delay {s(budget.delay_end)}, "
                   f"connections up to {s(max(0.0, wait))}, stop signal at "
                   f"{s(budget.stop_deadline)}, then stop-timeout {s(config.stop_timeout)}")
    for problem in budget.problems():
        problems.append(problem)
        line("  PROBLEM", problem)

    address = control.resolve_address(config.control_socket)
    status: dict[str, object] | None = None
    try:
        status = control.request_status(address, timeout=3.0)
    except control.Untrusted as exc:
        # Someone else holds the supervisor's name: prestop would refuse it and drain nothing.
        problems.append(str(exc))
        line("supervisor", f"none we trust at {address}")
        line("  PROBLEM", str(exc))
    except (control.ControlError, TimeoutError) as exc:
        why = "nothing listens" if isinstance(exc, control.NoServer) else str(exc)
        line("supervisor", f"none at {address} ({why}): prestop would run the drain itself")
    else:
        line("supervisor", f"{status.get('state')} at {address} (app pid {status.get('pid')}); "
                           "prestop joins its drain and uses its options")

    if config.ports:
        line("ports", ", ".join(map(str, config.ports)) + " (--port/DRAINCTL_PORTS)")
    else:
        ports, source = _auto_ports(status)
        if ports:
            line("ports", ", ".join(map(str, ports)) + f" ({source})")
        else:
            line("ports", f"none found ({source}): a drain now would end at once (no-ports)")

    if config.down_url is None:
        line("down URL", "none: no down call (the app is never told it is going down)")
    else:
        unreachable = _reachable(config.down_url,
                                 min(config.down_timeout, _CONNECT_TIMEOUT_MAX))
        if unreachable:
            problems.append(unreachable)
            line("down URL", redact_url(config.down_url))
            line("  PROBLEM", unreachable)
        else:
            line("down URL", f"{redact_url(config.down_url)}: its host:port accepts TCP "
                             "connections (not called)")

    line("termination log", _termination_log(config.termination_log))
    line("close-idle", _close_idle(config, status))

    out.write("\n" + _manifest(config, given, bool(problems)))
    if problems:
        out.write(f"\nresult: {len(problems)} problem{'s' if len(problems) > 1 else ''}: this "
                  "configuration cannot work as given\n")
        return EXIT_BROKEN
    out.write("\nresult: workable\n")
    return EXIT_OK


def _auto_ports(status: Mapping[str, object] | None) -> tuple[list[int], str]:
    ports = status.get("ports") if status is not None else None
    if isinstance(ports, list):
        valid = [p for p in ports if type(p) is int and 0 < p < 65536]
        return valid, "what the supervisor's app listens on"
    from drainctl.control.prestop import auto_ports

    try:
        found = auto_ports()
        source = found.warning or found.detail or "auto: PID 1's process tree"
        return found.ports, source
    except OSError as exc:
        return [], f"auto: cannot read the listening ports: {exc}"


def _reachable(url: str, timeout: float) -> str | None:
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return f"{redact_url(url)}: not a valid port"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass  # connected: that is all we wanted to know; nothing is sent
    except UnicodeError:  # the name's IDNA encoding: a label over 63 characters, say
        return f"{host}:{port}: not a valid host name: the down call would fail"
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        return f"{host}:{port} does not accept TCP connections ({why}): the down call would fail"
    return None


def _close_idle(config: Config, status: Mapping[str, object] | None) -> str:
    """Whether --close-idle can take the app's sockets here (README.md, "--close-idle")."""
    from drainctl.drain.closer import FIX, can_close, has_sys_ptrace, process_tree

    pid = status.get("pid") if status is not None else None
    # The supervisor's app, else what runs here: PID 1's tree (a standalone prestop's view).
    pids = process_tree(pid) if isinstance(pid, int) else process_tree(1)
    pids = [p for p in pids if p != os.getpid()]
    state = "on" if config.close_idle else "off"
    try:
        why = can_close(pids)
    except Exception as exc:  # a dry run reports; it never fails on this
        why = f"{type(exc).__name__}: {exc}"
    if why is None:
        whom = f"the app (pid {pids[0]})" if pids else "drainctl itself (no app found to try)"
        caps = "with CAP_SYS_PTRACE" if has_sys_ptrace() else "without CAP_SYS_PTRACE"
        return f"{state}; can work here: pidfd_getfd works on {whom}, {caps}"
    return (f"{state}; cannot work here ({why}): a drain would wait for the connections "
            f"instead. To fix, {FIX}")


def _termination_log(path: str | None) -> str:
    if not path:
        return "off"
    if not os.path.lexists(path):
        return f"{path} does not exist: no summary (Kubernetes creates it in every container)"
    from drainctl.drain.termination import refusal

    why = refusal(path)
    if why is not None:
        return f"{path} {why} (the drain writes only to a regular file)"
    if not os.access(path, os.W_OK):
        return f"{path} is not writable: no summary"
    return f"{path}: the drain's summary goes there"


def _manifest(config: Config, given: Mapping[str, RawValue], broken: bool) -> str:
    command = [_binary(), "prestop", *_flags(given)]
    grace = math.ceil(config.grace_period)
    lines = ["Pod spec:"]
    if _secret_url(given) is not None:
        lines.append("  # --down-url carries credentials or query values, which a pod spec "
                     "shows to anyone who can read it: left out of the command; give it as "
                     "DRAINCTL_DOWN_URL in the container's env (from a Secret), the hook "
                     "inherits it")
    if broken:
        # Enough for the delay, one settle of the wait (or the drain-timeout), and stop-timeout.
        wait = config.drain_timeout if config.drain_timeout is not None else config.settle
        needed = math.ceil(config.delay + wait + config.stop_timeout + 1)
        lines.append(f"  # these options need terminationGracePeriodSeconds >= {needed} "
                     f"(and --grace-period {needed}s)")
        grace = max(grace, needed)
    elif grace != config.grace_period:
        lines.append("  # Kubernetes takes whole seconds: rounded up")
    lines += [
        f"  terminationGracePeriodSeconds: {grace}",
        "  containers:",
        "  - lifecycle:",
        "      preStop:",
        "        exec:",
        f"          command: {json.dumps(command)}",
    ]
    return "\n".join(lines) + "\n"


def _binary() -> str:
    if getattr(sys, "frozen", False) and sys.argv and sys.argv[0]:
        # The frozen binary's launcher puts the path it was started as (e.g. /drainctl, its
        # path in the image) in argv[0] (build/rthook_launcher.py).
        return sys.argv[0]
    return "drainctl"


def _flags(given: Mapping[str, RawValue]) -> list[str]:
    """The flags given to `check` itself, for a standalone prestop (a joined one ignores them)."""
    flags: list[str] = []
    for option in OPTIONS:
        if "prestop" not in option.commands or option.name in ("log_format",):
            continue
        value = given.get(option.name)
        if value is None or value is False or value == [] or value == ():
            continue
        if option.name == "down_url" and _secret_url(given) is not None:
            continue
        if value is True:
            flags.append(option.flag)
        elif isinstance(value, str):
            flags += [option.flag, value]
        else:
            for item in value:
                flags += [option.flag, item]
    return flags


def _secret_url(given: Mapping[str, RawValue]) -> str | None:
    """The down URL given on the command line, if it holds something redact_url hides."""
    url = given.get("down_url")
    return url if isinstance(url, str) and redact_url(url) != url else None
