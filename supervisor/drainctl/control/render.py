"""What `drainctl status` and `drainctl connections` print for people (their --json is data)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

from drainctl.durations import format_duration

TYPE_CHECKING = False  # status and connections only; the server imports connections_json
if TYPE_CHECKING:
    from typing import Any

    from drainctl.drain.connections import Counts

__all__ = ["connections_json", "connections_line", "connections_table", "status_text"]

_DURATION_MAX = 10 * 365 * 86400.0  # past this a duration is nonsense: shown as "-"


def status_text(fields: Mapping[str, Any]) -> str:
    """The status reply (control.status_fields) as a few aligned lines."""
    state = str(fields.get("state"))
    phase = fields.get("phase")
    if state in ("draining", "stopping") and phase:
        state = f"{state} ({phase})"
    rows: list[tuple[str, str]] = [("state", state)]
    if fields.get("mode") == "standalone":
        rows.append(("mode", "standalone prestop (no supervisor: the app is not ours to stop)"))
    pid = fields.get("pid")
    if pid is not None:
        rows.append(("app pid", str(pid)))
    rows.append(("uptime", _duration(fields.get("uptime_s"))))
    if fields.get("trigger"):
        rows.append(("drain", f"trigger {fields['trigger']}, "
                              f"{_duration(fields.get('drain_elapsed_s'))} ago"))
    outcome = fields.get("outcome")
    if isinstance(outcome, Mapping):
        count = outcome.get("count")
        after = _duration(outcome.get("elapsed_s"))
        rows.append(("result", f"{outcome.get('reason')} after {after}"
                               + ("" if count is None else f", {count} connections left")))
    connections = fields.get("connections")
    if isinstance(connections, Mapping):
        if connections:
            per_port = ", ".join(
                f"{port}: {each.get('established') if isinstance(each, Mapping) else '?'}"
                for port, each in connections.items()
            )
            rows.append(("connections", f"{fields.get('established')} established ({per_port})"))
        else:
            rows.append(("connections", "no ports to count (the app listens on nothing)"))
    elif fields.get("error"):
        rows.append(("connections", str(fields["error"])))
    left = fields.get("time_left_s")
    if left is not None:
        rows.append(("time left", f"{_duration(left)} until the stop signal"))
    width = max(len(name) for name, _ in rows) + 2
    return "\n".join(f"{name + ':':<{width}}{value}" for name, value in rows)


def connections_table(ports: Mapping[str, Mapping[str, int]]) -> str:
    if not ports:
        return "no listening TCP ports in this network namespace"
    header = ("PORT", "ESTABLISHED", "CLOSE_WAIT", "OTHER")
    rows = [header] + [
        (port, str(each["established"]), str(each["close_wait"]), str(each["other"]))
        for port, each in ports.items()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                  for i, cell in enumerate(row))
        for row in rows
    )


def connections_line(ports: Mapping[str, Mapping[str, int]], now: float | None = None) -> str:
    """One line per round of `connections --watch`."""
    stamp = time.strftime("%H:%M:%S", time.localtime(time.time() if now is None else now))
    if not ports:
        return f"{stamp} no listening TCP ports"
    total = sum(each["established"] for each in ports.values())
    parts = [
        f"{port}={each['established']}"
        + (f" (close_wait {each['close_wait']})" if each["close_wait"] else "")
        for port, each in ports.items()
    ]
    return f"{stamp} established {total}: " + " ".join(parts)


def _duration(value: object) -> str:
    """A duration from a status reply, which may be anything: "-" when it is not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    try:
        seconds = float(value)
    except OverflowError:  # an int past float's range
        return "-"
    if not math.isfinite(seconds) or abs(seconds) > _DURATION_MAX:
        return "-"
    return format_duration(seconds)


def connections_json(counts: Counts, with_idle: bool = False) -> dict[str, dict[str, int]]:
    """Per port, port numbers as strings (docs/interface.md, `connections --json`)."""
    out: dict[str, dict[str, int]] = {}
    for port in sorted(counts.ports):
        each = counts.ports[port]
        entry = {"established": each.established, "close_wait": each.close_wait,
                 "other": each.other}
        if with_idle:
            entry["idle"] = each.idle
        out[str(port)] = entry
    return out
