"""The log events: one per line on stderr, JSON or readable text (docs/interface.md).

JSON when stderr is not a terminal (container logs are collected by line and parsed), text on a
terminal. Events never go to stdout: that belongs to the app.

Writing never blocks the caller (README, "Reliability"): stderr may be a pipe nobody reads, a
terminal that went away, or closed. Lines go to fd 2 from a writer thread of their own through a
bounded queue; until that thread runs (before the app is spawned: fork copies only the calling
thread) or when it cannot start (a pids limit), a line is written only if fd 2 takes it at once.
A line that cannot be written is dropped and counted, and the count is written as an
`events.dropped` event as soon as writing works again.
"""

from __future__ import annotations

import collections
import json
import os
import select
import sys
import threading
import time

TYPE_CHECKING = False  # no typing at run time: PID 1's start-up (see drain.py)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import IO, Any

__all__ = ["LOG_FORMATS", "Events", "flush_all", "format_json", "format_text",
           "resolve_log_format"]

# The values of --log-format (options.py validates against this).
LOG_FORMATS = ("auto", "json", "text")

# Listeners get every event as the dict that is logged (used by the control channel to stream a
# drain's events to `drainctl prestop`).
if TYPE_CHECKING:
    Listener = Callable[[dict[str, Any]], None]


def format_json(record: dict[str, Any]) -> str:
    record = _redacted(record)
    return json.dumps(record, separators=(", ", ": "), default=str)


def format_text(record: dict[str, Any]) -> str:
    record = _redacted(record)
    stamp = time.strftime("%H:%M:%S", time.localtime(record["ts"]))
    millis = int((record["ts"] % 1) * 1000)
    fields = " ".join(
        f"{key}={_text_value(value)}"
        for key, value in record.items()
        if key not in ("ts", "event")
    )
    return f"{stamp}.{millis:03d} drainctl {record['event']}" + (f" {fields}" if fields else "")


def _redacted(record: dict[str, Any]) -> dict[str, Any]:
    """A `url` field is shown without password or query values (redact.py), whoever
    emitted it: this process, or a supervisor whose events `prestop` relays."""
    url = record.get("url")
    if not isinstance(url, str):
        return record
    from drainctl.redact import redact_url

    return {**record, "url": redact_url(url)}


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text


class Events:
    """Writes events to one stream; never raises and never blocks (see the module docstring).

    `stream` is for tests (an in-memory stream, written at once); by default, fd 2.
    """

    def __init__(
        self,
        log_format: str = "auto",
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._stream = stream
        self._out = None if stream is not None else _stderr_writer()
        text = resolve_log_format(log_format, stream) == "text"
        self._format = format_text if text else format_json
        self._clock = clock
        self._listeners: list[Listener] = []
        self._holds = 0
        self._held: list[dict[str, Any]] = []
        if self._out is not None:
            self._out.report = self._dropped_line

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record: dict[str, Any] = _redacted({"ts": round(self._clock(), 6), "event": event,
                                            **fields})
        if self._holds:
            self._held.append(record)  # stamped now, formatted and written at release()
            return record
        if self._held:
            self.release()  # a listener raised during the last release: the rest first
        self._publish(record)
        return record

    def hold(self) -> None:
        """Keep the events emitted from now on until the matching release(): the drain sends
        its signals first and writes what led to them after (formatting a line and waking the
        writer thread cost time on the app's path, benchmarks/bench_sigterm.py). Holds nest."""
        self._holds += 1

    def release(self) -> None:
        """End a hold(); the last one writes what was held, in order, with its own times."""
        if self._holds:
            self._holds -= 1
        while not self._holds and self._held:
            self._publish(self._held.pop(0))

    def _publish(self, record: dict[str, Any]) -> None:
        self.write_line(self._format(record))
        for listener in list(self._listeners):
            listener(record)

    def write_line(self, line: str) -> None:
        if self._out is not None:
            self._out.write(line + "\n")
            return
        if self._stream is None:
            return  # stderr was closed at start-up: nowhere to write, and nothing to count
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def relay(self, record: dict[str, Any]) -> None:
        """Write an event logged elsewhere (a supervisor's, for prestop) as this output would."""
        if "ts" not in record or "event" not in record:
            return
        for format_ in (self._format, format_json):
            try:
                line = format_(record)
            except Exception:  # a record of odd types (a string ts...): try JSON, else skip
                continue
            self.write_line(line)
            return

    def start_writer(self) -> bool:
        """Write from a thread from now on (call after the app is spawned). False: no thread."""
        return self._out.start() if self._out is not None else True

    @property
    def dropped(self) -> int:
        """Lines dropped so far and not yet reported."""
        return self._out.dropped if self._out is not None else 0

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _dropped_line(self, count: int) -> str:
        record = {"ts": round(self._clock(), 6), "event": "events.dropped", "count": count}
        return self._format(record) + "\n"


class _Writer:
    """Lines to one file descriptor without ever blocking the writer's caller."""

    LIMIT = 1000  # lines queued before new ones are dropped

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.dropped = 0
        self.report: Callable[[int], str] | None = None
        self._queue: collections.deque[str] = collections.deque()
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self._busy = False

    def isatty(self) -> bool:
        try:
            return os.isatty(self.fd)
        except OSError:
            return False

    def start(self) -> bool:
        if self._thread is not None:
            return True
        thread = threading.Thread(target=self._run, name="drainctl-log", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # can't start new thread: a pids limit, RLIMIT_NPROC
            return False
        self._thread = thread
        return True

    def write(self, line: str) -> None:
        if self._thread is None:
            self._write_now(line)
            return
        with self._ready:
            if len(self._queue) >= self.LIMIT:
                self.dropped += 1
                return
            self._queue.append(line)
            self._ready.notify()

    def flush(self, timeout: float) -> None:
        """Wait until the queue is written, or `timeout` passed (never longer)."""
        deadline = time.monotonic() + timeout
        with self._ready:
            while (self._queue or self._busy) and self._thread is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._ready.wait(min(left, 0.05))

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    self._busy = False
                    self._ready.notify_all()
                    self._ready.wait()
                line = self._queue.popleft()
                self._busy = True
            self._write(line, block=True)

    def _write_now(self, line: str) -> None:
        try:
            _, writable, _ = select.select([], [self.fd], [], 0)
        except (OSError, ValueError):
            writable = []
        if not writable:
            self.dropped += 1
            return
        self._write(line, block=False)

    def _write(self, line: str, block: bool) -> None:
        data = line.encode("utf-8", "backslashreplace")
        if self.dropped and self.report is not None:
            count, self.dropped = self.dropped, 0
            data = self.report(count).encode() + data
        try:
            if block:
                while data:
                    data = data[os.write(self.fd, data):]
                return
            # Not from the writer thread: a pipe with room for one more page takes up to
            # PIPE_BUF bytes at once (pipe(7)); a longer line goes a page at a time, each only
            # when there is room for it.
            while data:
                data = data[os.write(self.fd, data[:_PIPE_BUF]):]
                if data and not select.select([], [self.fd], [], 0.05)[1]:
                    self.dropped += 1
                    return
        except OSError:
            self.dropped += 1


_PIPE_BUF = 4096
_WRITERS: dict[int, _Writer] = {}


def _stderr_writer() -> _Writer | None:
    """The writer of fd 2, or None when stderr was closed at start-up: then fd 2 may later be
    some other file we opened, and nothing must be written to it."""
    if sys.stderr is None:
        return None
    try:
        fd = sys.stderr.fileno()
    except (OSError, ValueError, AttributeError):
        return None
    writer = _WRITERS.get(fd)
    if writer is None:
        writer = _WRITERS[fd] = _Writer(fd)
    return writer


def flush_all(timeout: float = 1.0) -> None:
    """Before exit: give the queued lines up to `timeout` to leave."""
    deadline = time.monotonic() + timeout
    for writer in _WRITERS.values():
        writer.flush(max(0.0, deadline - time.monotonic()))


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
