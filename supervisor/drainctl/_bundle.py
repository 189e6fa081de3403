"""The frozen binary's unpacked bundle, put back when it was removed while drainctl runs.

build/launcher.c unpacks the bundle into <base>/drainctl-<uid>/<id>/ and execs it. drainctl then
reads modules from it as it needs them: the drain's (the connection counter, psutil, httpx) only
when a drain starts, possibly days later. If the directory was removed meanwhile (a tmp cleaner, a
sidecar sharing the emptyDir), each of those imports fails (PyInstaller's importer raises
SystemExit when its archive is gone), and the drain would count nothing and stop the app with its
connections open. So before each of the drain's jobs, `ensure()` looks whether the bundle's
program is still there and, if not, runs the launcher once more in its unpack-only mode, which
puts the same bundle back at the same path (docs/frozen-binary.md, "When the runtime directory is
removed"). What happened is said in one `warning` event.

Imported at start-up (this module itself must not be read from the bundle later): only modules
the interpreter has loaded already.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time

__all__ = ["FallbackCounts", "ensure", "fallback_count", "fallback_listening_ports"]

FROZEN = bool(getattr(sys, "frozen", False))
UNPACK_TIMEOUT = 20.0  # seconds: the first start's unpack takes ~0.2-0.5 s on an idle machine


def _launcher_path(argv0: str) -> str | None:
    """The launcher as started: build/rthook_launcher.py made sys.argv[0] its argv[0]."""
    if not argv0:
        return None
    if "/" in argv0:
        return os.path.abspath(argv0)  # drainctl never changes its working directory
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = os.path.join(directory or ".", argv0)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
    return None


_PROGRAM = sys.executable  # <base>/drainctl-<uid>/<id>/drainctl
_LAUNCHER = _launcher_path(sys.argv[0] if sys.argv else "") if FROZEN else None
_lock = threading.Lock()
_given_up = False


def ensure() -> str | None:
    """Put the bundle back if it was removed; a message for one `warning` event when it was.

    Cheap when all is well (one stat). Thread-safe: concurrent jobs wait for one unpack. After a
    failed attempt it does not try again (and says nothing more): the jobs then fail as they
    would have, and report their own errors.
    """
    global _given_up
    if not FROZEN or _given_up or os.path.exists(_PROGRAM):
        return None
    with _lock:
        if _given_up or os.path.exists(_PROGRAM):
            return None
        bundle = os.path.dirname(_PROGRAM)
        started = time.monotonic()
        problem = _unpack(os.path.dirname(os.path.dirname(bundle)))
        took = round(time.monotonic() - started, 3)
        if problem is None and os.path.exists(_PROGRAM):
            return (f"the unpacked bundle {bundle} was removed while drainctl ran (a tmp "
                    f"cleaner?): unpacked it again in {took} s")
        _given_up = True
        return (f"the unpacked bundle {bundle} was removed while drainctl ran (a tmp cleaner?) "
                f"and could not be unpacked again ({problem or 'it is still missing'}): what "
                "the drain has not loaded yet may fail (the down call); connections are counted "
                "from /proc/net/tcp and tcp6 instead, on every listening port of the network "
                "namespace when no --port was given")


def _unpack(base: str) -> str | None:
    """Run the launcher in its unpack-only mode into `base`; None on success, else why not."""
    if _LAUNCHER is None:
        return "the launcher's own path is unknown"
    env = dict(os.environ, DRAINCTL_RUNTIME_DIR=base, _DRAINCTL_UNPACK_ONLY="1")
    read_fd, write_fd = os.pipe()
    try:
        pid = os.posix_spawn(_LAUNCHER, [_LAUNCHER], env, file_actions=[
            (os.POSIX_SPAWN_DUP2, write_fd, 2), (os.POSIX_SPAWN_CLOSE, read_fd)])
    except OSError as exc:
        os.close(read_fd)
        os.close(write_fd)
        return f"cannot run {_LAUNCHER}: {exc.strerror or exc}"
    os.close(write_fd)
    output = b""
    deadline = time.monotonic() + UNPACK_TIMEOUT
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                _kill(pid)
                return f"{_LAUNCHER} took more than {UNPACK_TIMEOUT:g} s"
            if select.select([read_fd], [], [], left)[0]:
                chunk = os.read(read_fd, 4096)
                if not chunk:
                    break  # the launcher exited (or closed stderr, which it never does)
                output += chunk[: 4096 - len(output)]
    finally:
        os.close(read_fd)
    code = _wait(pid, deadline)
    line = output.decode(errors="replace").strip().removeprefix("drainctl: ")
    # code None: PID 1's loop reaped it first (it reaps every child); its line still tells.
    if code not in (0, None) or line:
        return line or f"{_LAUNCHER} exited with {code}"
    return None


def _wait(pid: int, deadline: float) -> int | None:
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            _kill(pid)
            return None
        time.sleep(0.01)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


# ---- a connection count that needs no further import ------------------------------------------
# What the drain uses when drainctl.connections cannot be imported any more (the bundle is gone
# and could not be put back): the same count as connections.py's "proc" method (ESTABLISHED by
# local port, proc(5)), with the attributes of its Counts that the drain and `status` read.

_PROC_FILES = ("/proc/net/tcp", "/proc/net/tcp6")
_ESTABLISHED, _CLOSE_WAIT, _LISTEN = b"01", b"08", b"0A"  # include/net/tcp_states.h, in hex


class FallbackPort:
    __slots__ = ("close_wait", "close_wait_busy", "established", "idle", "other")

    def __init__(self) -> None:
        self.established = self.close_wait = self.other = self.idle = self.close_wait_busy = 0

    @property
    def holding(self) -> int:
        return self.established


class FallbackCounts:
    """Duck-typed as connections.Counts (which cannot be imported then)."""

    __slots__ = ("again_in", "closed", "closed_with_answer", "method", "ports", "warning")

    def __init__(self, ports: dict[int, FallbackPort]) -> None:
        self.ports = ports
        self.method = "proc"
        self.closed: dict[int, int] = {}  # --close-idle closes nothing from here
        self.again_in: float | None = None
        self.closed_with_answer = 0
        self.warning: str | None = None

    @property
    def established(self) -> int:
        return sum(p.established for p in self.ports.values())

    @property
    def holding(self) -> int:
        return self.established

    @property
    def close_wait_busy(self) -> int:
        return 0  # no tcp_info here: a CLOSE_WAIT connection cannot be judged, and never holds


def _sockets() -> list[tuple[int, bytes, bytes]]:
    """(local port, state, address pair) of every TCP socket in /proc/net/tcp and tcp6."""
    found = []
    for path in _PROC_FILES:
        try:
            with open(path, "rb") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue  # no IPv6 in this namespace
        for line in lines:
            fields = line.split(None, 4)
            if len(fields) >= 4:
                found.append((int(fields[1][-4:], 16), fields[3], fields[1] + b" " + fields[2]))
    return found


def fallback_count(ports: list[int] | tuple[int, ...]) -> FallbackCounts:
    counts = {port: FallbackPort() for port in ports}
    seen: set[bytes] = set()
    for port, state, pair in _sockets():
        each = counts.get(port)
        if each is None or pair in seen:
            continue
        seen.add(pair)  # a line can come twice when sockets change mid-read (connections.py)
        if state == _ESTABLISHED:
            each.established += 1
        elif state == _CLOSE_WAIT:
            each.close_wait += 1
        elif state != _LISTEN:
            each.other += 1
    return FallbackCounts(counts)


def fallback_listening_ports() -> list[int]:
    """Every TCP port something listens on in this network namespace (in a pod: the app's)."""
    return sorted({port for port, state, _ in _sockets() if state == _LISTEN})
