"""The termination message: a short story of the drain for `kubectl describe pod`.

Kubernetes reads the container's `terminationMessagePath` (default /dev/termination-log, a file it
bind-mounts into every container) after the container exits and shows it as the last state's
`Message`. It keeps at most 4096 bytes per container (and 12 KiB per pod), so the summary is cut
at 1024 bytes: the app's own message, if it writes one, keeps its room.

Rules (docs/interface.md, "The termination message"):
- written only if the file already exists and can be opened for writing; never created (outside
  Kubernetes there is no such file and nothing happens);
- appended, so a message the app wrote itself stays first;
- written only when a drain ran: when the app just crashed, an empty file lets
  `terminationMessagePolicy: FallbackToLogsOnError` show the log's tail instead.
"""

from __future__ import annotations

import errno
import os

TYPE_CHECKING = False  # no typing at run time: PID 1's start-up (drain/machine.py)
if TYPE_CHECKING:
    from drainctl.drain.machine import Drain
    from drainctl.events import Events

__all__ = ["MAX_BYTES", "report", "summary", "write"]

MAX_BYTES = 1024

# Phases that end the story rather than take time in it.
_TERMINAL = frozenset({"done"})


def summary(drain: Drain, end: float, code: int, code_label: str = "exit") -> str | None:
    """The message for a drain that ran (None if none did). `end` is on the drain's clock."""
    record, outcome, t0 = drain.record, drain.outcome, drain.t0
    if t0 is None:
        return None
    if outcome is None:
        head = "drainctl: the drain did not finish"
    else:
        left = "connections never counted" if outcome.count is None else (
            f"{outcome.count} connection{'' if outcome.count == 1 else 's'} left"
        )
        head = f"drainctl: {outcome.reason}, {left}"
    lines = [f"{head}, {code_label} {code}"]
    total = max(0.0, end - t0)
    phases = []
    for i, (name, offset) in enumerate(record.phases):
        if name in _TERMINAL:
            continue
        until = record.phases[i + 1][1] if i + 1 < len(record.phases) else total
        phases.append(f"{name} {_duration(until - offset)}")
    lines.append(f"trigger {record.trigger}: " + ", ".join(phases) + f" (total {_duration(total)})")
    config = drain.config
    if config.down_url is None:
        lines.append("down: not configured")
    elif record.down is None:
        lines.append(f"down {config.down_method} {_safe_url(config.down_url)}: not called")
    else:
        down = record.down
        result = f"{down['status']}" if "status" in down else f"error {down.get('error')}"
        lines.append(f"down {config.down_method} {_safe_url(config.down_url)}: {result} "
                     f"in {down.get('elapsed_ms', 0):g} ms")
    ports = drain.ports
    lines.append("ports " + (", ".join(str(p) for p in ports) if ports else "none"))
    if record.probe_warning:
        lines.append(f"warning: {record.probe_warning}")
    text = "\n".join(lines) + "\n"
    data = text.encode()
    if len(data) > MAX_BYTES:
        text = data[: MAX_BYTES - 4].decode(errors="ignore") + "...\n"
    return text


def write(path: str | None, text: str) -> str | None:
    """Append `text` to `path` if it exists and is writable. Returns an error worth a warning.

    A missing file, a read-only one or one we may not write is not an error: it means "off".
    """
    if not path:
        return None
    try:
        # No O_CREAT: never create it. O_NONBLOCK: a FIFO nobody reads must not hang PID 1
        # (ENXIO instead); regular files ignore it.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENXIO,
                         errno.EISDIR, errno.ENOTDIR):
            return None
        return f"termination log {path}: {exc.strerror or exc}"
    try:
        data = text.encode()
        while data:
            written = os.write(fd, data)
            data = data[written:]
    except OSError as exc:
        return f"termination log {path}: {exc.strerror or exc}"
    finally:
        os.close(fd)
    return None


def report(
    path: str | None, drain: Drain, end: float, code: int, events: Events,
    code_label: str = "exit",
) -> None:
    """Write the summary of a drain that ran; a failed write is one `warning` event."""
    if not path:
        return
    text = summary(drain, end, code, code_label)
    if text is None:
        return
    problem = write(path, text)
    if problem:
        events.emit("warning", message=problem)


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    return f"{seconds:.1f}s"


def _safe_url(url: str) -> str:
    """Scheme, host, port and path only: a query or userinfo may hold a token, and it is short."""
    from urllib.parse import urlsplit, urlunsplit  # only when a drain is summed up

    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
