"""The app's "down" state, shared by every worker process of one server.

Why this exists (docs/app-side.md, "One down call, every worker"): drainctl calls the app's down
endpoint once; with a multi-worker server (gunicorn, ``uvicorn --workers``, hypercorn) that
request lands in *one* worker, yet every worker must from then on answer ``Connection: close``
(RFC 9112 section 9.6), or the keep-alive clients held by the other workers never leave and the
drain runs into its deadline.

Design:

* **In-process flag first.** Once a process has seen the down state it never does I/O for it
  again; a single-process server (waitress, wsgiref, uvicorn without ``--workers``) costs one
  attribute read per response after down.
* **A marker file is the rendezvous between workers.** The worker that serves the down request
  writes a small file (write to a temporary name, then ``os.replace``: a reader never sees half
  a file). Before down, every worker checks for it with one ``os.stat`` per response (a few
  microseconds; ``check_interval`` can cache the "not down" answer for a while, but the default is
  to look every time so that drainctl's probe request, sent right after the down call, already
  sees ``Connection: close`` whatever worker it lands on). No signal is sent to anyone: gunicorn
  and uvicorn use the usual signals themselves, and a file needs no set-up before ``fork`` (a
  gunicorn app is often imported in each worker, without ``--preload``). A worker started after
  down (gunicorn replaces dead workers, ``max_requests``) finds the file and is down at once.
* **Keyed by the server's process group.** Workers of gunicorn, ``uvicorn --workers`` and
  hypercorn share their master's process group, and ``drainctl run`` gives the app its own group,
  so the group is "the server". The file name is
  ``drainctl-down-<pid-namespace inode>-<pgid>-<start time of the group leader>``: a container
  restarted in the same pod sees the pod's ``/dev/shm`` again and can reuse the same pgid, but not
  the same leader start time (``/proc/<pgid>/stat`` field 22, proc(5)); sibling containers with
  their own PID namespaces differ by the namespace inode. A stale file from an earlier
  incarnation therefore never matches, and no start-up code has to delete anything (a worker
  that deleted it on import would undo a down that another worker had already recorded).
* **A directory that works with a read-only root filesystem:** ``/dev/shm`` if writable (a tmpfs
  in every container runtime), else ``$XDG_RUNTIME_DIR``, else ``tempfile.gettempdir()``.
  ``DRAINCTL_DOWN_STATE`` (or the ``state_file`` argument) names the file instead; its content
  is still the key, so a stale file at a fixed path is ignored too. When no directory is writable
  the state stays per process (logged once): the worker that got the down request still closes.

Only the standard library is imported here (README.md, "Dependencies, and why": the app side
must not pull in typer, psutil or httpx).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypedDict, Unpack
from urllib.parse import parse_qsl

__all__ = [
    "DEFAULT_DOWN_PATH",
    "ENV_STATE_FILE",
    "DownState",
    "Endpoints",
    "Reply",
    "default_state_file",
    "get_state",
    "is_draining",
    "is_local_client",
    "mark_down",
    "state_key",
]

DEFAULT_DOWN_PATH = "/drainctl/down"

ENV_STATE_FILE = "DRAINCTL_DOWN_STATE"

_log = logging.getLogger("drainctl.app")


def _leader_start_time(pgid: int) -> str:
    """The process group leader's start time in clock ticks since boot, or "0" if it is gone.

    proc(5): field 22 of /proc/<pid>/stat. The command name (field 2) may contain spaces and
    parentheses, so the fields are counted after the last ")".
    """
    try:
        with open(f"/proc/{pgid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return "0"
    fields = raw[raw.rfind(b")") + 2 :].split()
    # fields[0] is field 3 (state), so field 22 is fields[19].
    return fields[19].decode() if len(fields) > 19 else "0"


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def state_key(pgid: int | None = None) -> str:
    """What identifies one server incarnation: PID namespace, process group, leader start time."""
    group = os.getpgrp() if pgid is None else pgid
    return f"{_pid_namespace()}-{group}-{_leader_start_time(group)}"


def _state_dir() -> str | None:
    candidates = ["/dev/shm", os.environ.get("XDG_RUNTIME_DIR", ""), tempfile.gettempdir()]
    for directory in candidates:
        # access(2) reports EROFS for a read-only mount, which is the case this order is for.
        if directory and os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK):
            return directory
    return None


def default_state_file(pgid: int | None = None) -> str | None:
    """Where the down state of this process group (or of ``pgid``) lives; None: nowhere writable.

    ``DRAINCTL_DOWN_STATE`` wins when set. Tests use ``pgid`` to find a server's file.
    """
    explicit = os.environ.get(ENV_STATE_FILE)
    if explicit:
        return explicit
    directory = _state_dir()
    if directory is None:
        return None
    return os.path.join(directory, f"drainctl-down-{state_key(pgid)}")


class DownState:
    """One server's down state: an in-process flag, backed by a marker file shared by workers.

    ``check_interval`` (seconds) lets a worker trust a "not down" answer that long before it
    looks at the file again; 0 (the default) looks on every call.
    """

    def __init__(self, path: str | None, *, check_interval: float = 0.0) -> None:
        self._path = path
        self._interval = check_interval
        # The key is fixed for the life of the server: compute it once, not per check.
        self._key = state_key()
        self._down = False
        self._next_check = 0.0
        # (inode, mtime_ns, size) of a file whose content did not match: not read again.
        self._stale: tuple[int, int, int] | None = None
        self._lock = threading.Lock()

    @property
    def path(self) -> str | None:
        return self._path

    def mark_down(self) -> None:
        """Record that the app is going down, for this process and for its sibling workers.

        Idempotent. Never raises: a state that cannot be shared is still set in this process.
        """
        with self._lock:
            self._down = True
            if self._path is None:
                return
            tmp = f"{self._path}.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                with open(tmp, "w", encoding="ascii") as f:
                    f.write(self._key + "\n")
                os.replace(tmp, self._path)
            except OSError as exc:
                _log.warning(
                    "drainctl: cannot write the down state to %s (%s); only this process "
                    "will close connections",
                    self._path,
                    exc,
                )
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def is_down(self) -> bool:
        if self._down:
            return True
        if self._path is None:
            return False
        if self._interval > 0:
            now = time.monotonic()
            if now < self._next_check:
                return False
            self._next_check = now + self._interval
        return self._check_file(self._path)

    def _check_file(self, path: str) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        if signature == self._stale:
            return False
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                content = f.read(256).strip()
        except OSError:
            return False
        if content == self._key:
            self._down = True
            return True
        # Left by an earlier incarnation (or another server pointed at the same fixed path).
        self._stale = signature
        return False



_states: dict[str | None, DownState] = {}
_default: DownState | None = None
_states_lock = threading.Lock()
_warned_nowhere = False


def get_state(state_file: str | None = None, *, check_interval: float = 0.0) -> DownState:
    """The process-wide DownState for ``state_file`` (default: ``default_state_file()``).

    One object per file, so ``is_draining()`` in app code and the middleware always agree. The
    default location is resolved once per process: ``is_draining()`` may be called per request,
    and resolving reads /proc.  ``check_interval`` counts when the object is first made.
    """
    global _default, _warned_nowhere
    if state_file is None and _default is not None:
        return _default
    path = state_file or default_state_file()
    with _states_lock:
        state = _states.get(path)
        if state is None:
            if path is None and not _warned_nowhere:
                _warned_nowhere = True
                _log.warning(
                    "drainctl: no writable directory for the down state (/dev/shm, "
                    "$XDG_RUNTIME_DIR, %s); with several workers only the one that gets the "
                    "down request will close connections; set %s",
                    tempfile.gettempdir(),
                    ENV_STATE_FILE,
                )
            state = DownState(path, check_interval=check_interval)
            _states[path] = state
        if state_file is None:
            _default = state
        return state


def is_draining(state_file: str | None = None) -> bool:
    """True once the down endpoint was called in any worker of this server (or ``mark_down``).

    ``state_file``: only if the middleware was given one.
    """
    return get_state(state_file).is_down()


def mark_down(state_file: str | None = None) -> None:
    """What the down endpoint does, for app code that learns of the shutdown another way."""
    get_state(state_file).mark_down()


# --- The endpoints both middlewares serve (wsgi.py and asgi.py only translate to their protocol).


@dataclass(frozen=True)
class Reply:
    """A response the middleware answers itself."""

    status: int
    reason: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def is_local_client(host: str | None) -> bool:
    """True for loopback peers, and for a unix socket (no address: only local processes reach it).

    drainctl (and a preStop hook) call the down endpoint on 127.0.0.1 from inside the pod; anyone
    else who could reach it could take the pod out of rotation through its readiness probe.
    """
    if not host:
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _text(status: int, reason: str, body: str, *headers: tuple[str, str]) -> Reply:
    return Reply(status, reason, body.encode(), headers)


class Endpoints:
    """Which request is the down call, a health check, or the readiness probe, and the answer.

    ``down_query`` (e.g. ``"down=true"``) must also be present in the query string, so that an
    existing contract such as ``/ok.htm?down=true`` keeps working while ``/ok.htm`` stays a
    health page.
    """

    def __init__(
        self,
        *,
        down_path: str = DEFAULT_DOWN_PATH,
        down_query: str | None = None,
        health_paths: tuple[str, ...] | list[str] = (),
        readiness_path: str | None = None,
        allow_remote_down: bool = False,
    ) -> None:
        if not down_path.startswith("/"):
            raise ValueError(f"down_path must start with '/': {down_path!r}")
        self.down_path = down_path
        self.down_query = tuple(parse_qsl(down_query or "", keep_blank_values=True))
        if down_query and not self.down_query:
            raise ValueError(f"down_query has no name=value pair: {down_query!r}")
        self.health_paths = frozenset(health_paths)
        self.readiness_path = readiness_path
        self.allow_remote_down = allow_remote_down
        if readiness_path is not None and readiness_path in self.health_paths:
            raise ValueError(f"{readiness_path!r} cannot be both a health and the readiness path")
        if not self.down_query and down_path in self.health_paths | {readiness_path}:
            raise ValueError(f"{down_path!r} is the down path: give it a down_query to share it")

    def route(self, path: str, query: str) -> str | None:
        """"down", "health", "readiness", or None for the app's own requests."""
        if path == self.down_path and (
            not self.down_query or set(self.down_query) <= set(parse_qsl(query, True))
        ):
            return "down"
        if path == self.readiness_path:
            return "readiness"
        if path in self.health_paths:
            return "health"
        return None

    def answer(self, route: str, method: str, client: str | None, state: DownState) -> Reply:
        if route == "down":
            if method not in ("GET", "POST"):
                return _text(405, "Method Not Allowed", "use GET or POST\n", ("Allow", "GET, POST"))
            if not (self.allow_remote_down or is_local_client(client)):
                return _text(403, "Forbidden", "the down endpoint answers loopback only\n")
            if not state.is_down():
                _log.warning(
                    "drainctl: down requested; every response now carries Connection: close"
                )
            state.mark_down()  # every call writes: idempotent, and repairs a lost file
            return _text(200, "OK", "down\n")
        if method not in ("GET", "HEAD"):
            return _text(405, "Method Not Allowed", "use GET or HEAD\n", ("Allow", "GET, HEAD"))
        if route == "readiness" and state.is_down():
            # Only for the kubelet's readiness probe, which looks at this pod alone; a gateway
            # must never be pointed here (README.md, "Why": a 503 through the shared LB
            # address took the whole LB out of rotation).
            return _text(503, "Service Unavailable", "draining\n")
        return _text(200, "OK", "ready\n" if route == "readiness" else "ok\n")


class Options(TypedDict, total=False):
    """The keyword options both DrainMiddlewares take (documented on drainctl.wsgi's)."""

    down_path: str
    down_query: str | None
    health_paths: Iterable[str]
    readiness_path: str | None
    allow_remote_down: bool
    state_file: str | None
    check_interval: float


class Contract:
    """What the WSGI and the ASGI middleware share: the routes, the down state, the flag for
    the one warning about a server whose connection cannot be forced closed."""

    def __init__(self, **options: Unpack[Options]) -> None:
        unknown = sorted(set(options) - set(Options.__annotations__))
        if unknown:  # a misspelt option must not be ignored silently
            raise TypeError(f"DrainMiddleware got unexpected options: {', '.join(unknown)}")
        self.endpoints = Endpoints(
            down_path=options.get("down_path", DEFAULT_DOWN_PATH),
            down_query=options.get("down_query"),
            health_paths=tuple(options.get("health_paths", ())),
            readiness_path=options.get("readiness_path"),
            allow_remote_down=options.get("allow_remote_down", False),
        )
        self.state = get_state(options.get("state_file"),
                               check_interval=options.get("check_interval", 0.0))
        self._warned_unforced = False

    @property
    def draining(self) -> bool:
        return self.state.is_down()

    def mark_down(self) -> None:
        self.state.mark_down()
