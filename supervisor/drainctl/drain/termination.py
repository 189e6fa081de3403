"""The termination message: a short story of the drain for `kubectl describe pod`.

Kubernetes reads the container's `terminationMessagePath` (default /dev/termination-log, a file it
bind-mounts into every container) after the container exits and shows it as the last state's
`Message`. It keeps at most 4096 bytes per container (and 12 KiB per pod), so the summary is cut
at 1024 bytes: the app's own message, if it writes one, keeps its room.

Rules (docs/interface.md, "The termination message"):
- written only if the file already exists and can be opened for writing; never created (outside
  Kubernetes there is no such file and nothing happens);
- written only to a regular file, as the kubelet provides it: a symbolic link is not followed
  (O_NOFOLLOW), and a FIFO, a directory or a device is refused before it is opened (lstat) and
  after (fstat, the same file), so the drain's summary never lands somewhere else, never blocks
  PID 1 on a FIFO, never writes to a device. A refusal is one `warning` event naming the path
  and why; a missing file is no refusal (it means "off");
- the down URL is shown redacted (redact.py): no password or query value in the pod status;
- appended, so a message the app wrote itself stays first;
- written only when a drain ran: when the app just crashed, an empty file lets
  `terminationMessagePolicy: FallbackToLogsOnError` show the log's tail instead.
"""

from __future__ import annotations

import errno
import os
import stat

from drainctl.durations import format_duration
from drainctl.redact import redact_url

TYPE_CHECKING = False  # no typing at run time: PID 1's start-up (drain/machine.py)
if TYPE_CHECKING:
    from drainctl.drain.machine import Drain
    from drainctl.events import Events

__all__ = ["MAX_BYTES", "refusal", "report", "summary", "write"]

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
        phases.append(f"{name} {format_duration(until - offset)}")
    lines.append(f"trigger {record.trigger}: " + ", ".join(phases)
                 + f" (total {format_duration(total)})")
    config = drain.config
    if config.down_url is None:
        lines.append("down: not configured")
    elif record.down is None:
        lines.append(f"down {config.down_method} {redact_url(config.down_url)}: not called")
    else:
        down = record.down
        result = f"{down['status']}" if "status" in down else f"error {down.get('error')}"
        lines.append(f"down {config.down_method} {redact_url(config.down_url)}: {result} "
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


# What is not a regular file, as a refusal says it.
_KINDS = ((stat.S_ISLNK, "a symbolic link (not followed)"), (stat.S_ISDIR, "a directory"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def refusal(path: str) -> str | None:
    """Why `path` is no place for the summary (not a regular file), or None (also if missing)."""
    try:
        mode = os.lstat(path).st_mode
    except (OSError, ValueError):
        return None  # missing or unreadable: write() decides, silently
    return _kind(mode)


def _kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    for test, name in _KINDS:
        if test(mode):
            return f"is {name}, not a regular file: not written"
    return "is not a regular file: not written"


def write(path: str | None, text: str) -> str | None:
    """Append `text` to `path` if it is an existing, writable regular file.

    Returns the reason for a `warning` when the path is something else (see the module
    docstring); a missing file, a read-only one or one we may not write means "off": None.
    """
    if not path:
        return None
    why = refusal(path)
    if why is not None:
        return f"termination log {path} {why}"
    try:
        # No O_CREAT: never create it. O_NOFOLLOW: a symlink put there since the lstat is not
        # followed (ELOOP). O_NONBLOCK: a FIFO swapped in must not hang PID 1 (ENXIO, or the
        # fstat below refuses it); O_NOCTTY: a terminal never becomes ours.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC
                     | os.O_NOFOLLOW | os.O_NOCTTY)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR):
            return None
        if exc.errno == errno.ELOOP:
            return f"termination log {path} {_kind(stat.S_IFLNK)}"
        if exc.errno in (errno.ENXIO, errno.EISDIR):
            return f"termination log {path} is not a regular file: not written"
        return f"termination log {path}: {exc.strerror or exc}"
    except ValueError:  # a NUL in the path
        return f"termination log {path!r}: not a valid path"
    try:
        why = _kind(os.fstat(fd).st_mode)
        if why is not None:  # swapped in between the lstat and the open
            return f"termination log {path} {why}"
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
