"""The contract's log events: one per line on stderr, JSON or readable text.

JSON when stderr is not a terminal (container logs are collected by line and parsed), text on a
terminal. Events never go to stdout: that belongs to the app.
"""

from __future__ import annotations

import json
import os
import sys
import time

TYPE_CHECKING = False  # no typing at run time: PID 1's start-up (see drain.py)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import IO, Any

__all__ = ["LOG_FORMATS", "Events", "format_json", "format_text", "resolve_log_format"]

# The values of --log-format (options.py validates against this).
LOG_FORMATS = ("auto", "json", "text")

# Listeners get every event as the dict that is logged (used by the control channel to stream a
# drain's events to `drainctl prestop`).
if TYPE_CHECKING:
    Listener = Callable[[dict[str, Any]], None]


def format_json(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(", ", ": "), default=str)


def format_text(record: dict[str, Any]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(record["ts"]))
    millis = int((record["ts"] % 1) * 1000)
    fields = " ".join(
        f"{key}={_text_value(value)}"
        for key, value in record.items()
        if key not in ("ts", "event")
    )
    return f"{stamp}.{millis:03d} drainctl {record['event']}" + (f" {fields}" if fields else "")


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text


class Events:
    """Writes events to one stream; never raises (a closed stderr must not kill PID 1)."""

    def __init__(
        self,
        log_format: str = "auto",
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        text = resolve_log_format(log_format, self._stream) == "text"
        self._format = format_text if text else format_json
        self._clock = clock
        self._listeners: list[Listener] = []

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record: dict[str, Any] = {"ts": round(self._clock(), 6), "event": event, **fields}
        self.write_line(self._format(record))
        for listener in list(self._listeners):
            listener(record)
        return record

    def write_line(self, line: str) -> None:
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)


def resolve_log_format(log_format: str, stream: IO[str] | None = None) -> str:
    """"text" or "json" for a --log-format value; "auto" is text on a terminal (`stream`,
    default stderr), JSON otherwise (also when stderr is closed)."""
    if log_format != "auto":
        return "text" if log_format == "text" else "json"
    return "text" if _isatty(stream if stream is not None else sys.stderr) else "json"


def _isatty(stream: IO[str] | None) -> bool:
    if stream is None:  # sys.stderr is None when fd 2 was closed at start-up
        return False
    try:
        return os.isatty(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
