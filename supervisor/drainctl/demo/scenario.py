"""`drainctl demo`: the incident and the fix, side by side, on loopback (issue 7, part 3).

No root, no HAProxy, no Kubernetes: everything runs on 127.0.0.1, on free ports.

* **pod-1** is the pod being terminated; **pod-2** is another replica that stays up.
* **The load balancer** is a shared choice the clients make for each *new* connection: pod-1
  until the pod is Terminating (endpoints removed), pod-2 after. Connections already open keep
  going to pod-1, as they do through kube-proxy and an L4 LB (INCIDENT.md, step 1).
* **Clients**: keep-alive clients (a request every 50-100 ms over one connection) and slow
  clients (1.5 s requests back to back). A client opens a new connection after a
  ``Connection: close`` or a failure; failures are non-200 answers, connections closed or reset
  mid-request, refused connections and timeouts (what a gateway turns into a 502).
* **The kubelet** marks pod-1 Terminating at +1 s, then:

  A. *naive*, the incident: the app with the old down endpoint (503 "halting" after down) and the
     old preStop hook: sleep, call down, return; SIGTERM right after.
  B. *drainctl*: the fixed app (``Connection: close`` after down, health 200) under
     ``drainctl run``; SIGTERM goes to drainctl, which sequences delay, down, connection drain,
     and only then stops the app.

Both get the same clients, the same load balancer and the same grace period; pod-2 serves
whatever moves. The demo is bounded: each scenario's traffic stops shortly after the pod is gone,
every client has a request cap and timeouts, every app a maximum lifetime, and every process the
demo started is killed on the way out, also after Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from drainctl.demo.app import DOWN_PATH

__all__ = [
    "DemoError",
    "DemoOptions",
    "Figures",
    "Scenario",
    "app_argv",
    "command",
    "main",
    "render",
    "run_demo",
]

# The pod's story, in seconds from the start of traffic.
TERMINATING_AT = 1.0  # the kubelet marks the pod Terminating
GRACE_PERIOD = 10.0  # terminationGracePeriodSeconds: the kubelet's SIGKILL comes this long after
STOP_TIMEOUT = 3.0  # drainctl --stop-timeout
SETTLE = 0.5  # drainctl --settle: short, the demo has few connections and no stragglers
SHUTDOWN_GRACE = 0.5  # the app's own graceful shutdown: what it gives requests in flight
TAIL = 0.5  # traffic goes on this long after the pod is gone (on pod-2), to show nothing breaks
SLOW_SECONDS = 1.5

# Bounds: a client never sends more than this many requests, nor waits longer than its timeout.
MAX_REQUESTS = 400
KEEPALIVE_TIMEOUT = 3.0
SLOW_TIMEOUT = SLOW_SECONDS + 3.0
READY_TIMEOUT = 15.0  # for an app (under drainctl: drainctl and the app) to listen
APP_LIFETIME = 90.0  # an app exits by itself after this, whatever happens to the demo
MAX_DELAY = 5.0  # --delay: must fit the grace period, and keep the demo short


class DemoError(Exception):
    """The demo could not run (a process failed to start); the message says which."""


@dataclass(frozen=True, slots=True)
class DemoOptions:
    clients: int = 4
    slow_clients: int = 2
    delay: float = 1.0


@dataclass(slots=True)
class Scenario:
    """One scenario's figures; `timeline` is (seconds since traffic started, text)."""

    name: str
    title: str
    requests: int = 0
    failures: int = 0
    failures_by_client: dict[str, int] = field(default_factory=dict)  # keep-alive, slow
    failures_by_outcome: dict[str, int] = field(default_factory=dict)
    terminating_at: float = TERMINATING_AT
    pod_gone_s: float | None = None  # from Terminating to the pod's last process gone
    sigkill: bool = False
    exit_code: int | None = None
    timeline: list[tuple[float, str]] = field(default_factory=list)


# ---- how to run things --------------------------------------------------------------------------


def _frozen() -> bool:
    return bool(getattr(sys, "frozen", False))


def _self_command() -> list[str]:
    """How to start this same drainctl again."""
    if not _frozen():
        return [sys.executable, "-m", "drainctl"]
    # build/launcher.c starts the bundle through the glibc loader it carries
    # (`ld.so --library-path <bundle>/_internal <bundle>/drainctl`): the image may have no loader
    # of its own (scratch) or an older glibc, so a child must be started the same way.
    try:
        exe = os.readlink("/proc/self/exe")
    except OSError:
        exe = ""
    libs = getattr(sys, "_MEIPASS", None)
    if os.path.basename(exe).startswith("ld-") and isinstance(libs, str):
        return [exe, "--library-path", libs, sys.executable]
    return [sys.executable]


def drainctl_command() -> list[str]:
    """drainctl itself: the frozen binary has no python to run `-m` with."""
    return _self_command()


def app_argv(port: int, name: str, naive: bool) -> list[str]:
    """The demo app; from the frozen binary through its hidden `demo --app` entry."""
    base = [*_self_command(), "demo", "--app"] if _frozen() else [
        sys.executable, "-m", "drainctl.demo.app"
    ]
    args = [*base, "--port", str(port), "--name", name, "--shutdown-grace", str(SHUTDOWN_GRACE),
            "--max-lifetime", str(APP_LIFETIME)]
    return [*args, "--naive"] if naive else args


def _environ() -> dict[str, str]:
    from drainctl.pid1.spawn import child_environ

    # The user's DRAINCTL_* settings (DRAINCTL_PORTS, DRAINCTL_DRAIN_TIMEOUT...) are for their
    # pods, not for the demo's: every flag the demo relies on is given on its command lines.
    return {k: v for k, v in child_environ().items() if not k.startswith("DRAINCTL_")}


def _free_port() -> int:
    # bind(0) lets the kernel pick; the app binds it a moment later (SO_REUSEADDR). On loopback,
    # with no connection ever made on it, nothing can hold it in between but a racing process.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Process:
    """A started process in its own session; its output is read by threads (no pipe can fill)."""

    def __init__(self, label: str, argv: Sequence[str], env: dict[str, str],
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.label = label
        self.popen = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env, start_new_session=True,
        )
        self.pid = self.popen.pid
        self.out: list[str] = []
        self.err: list[str] = []
        self._on_event = on_event
        self._ready = threading.Event()
        self._readers = [
            threading.Thread(target=self._read, args=(self.popen.stdout, self.out, False),
                             daemon=True),
            threading.Thread(target=self._read, args=(self.popen.stderr, self.err, True),
                             daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: IO[bytes] | None, lines: list[str], events: bool) -> None:
        assert stream is not None
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            lines.append(line)
            if line.startswith("listening "):
                self._ready.set()
            if events and self._on_event is not None and line.startswith("{"):
                with contextlib.suppress(ValueError):
                    self._on_event(json.loads(line))
        self._ready.set()  # EOF: the process is gone; wait_ready sees it

    def wait_ready(self, timeout: float) -> None:
        self._ready.wait(timeout)
        if not any(line.startswith("listening ") for line in self.out):
            tail = " | ".join((self.err + self.out)[-5:]) or "no output"
            raise DemoError(f"{self.label} did not start listening within {timeout:g}s: {tail}")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signo: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signo)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return None

    def descendants(self) -> list[int]:
        import psutil

        try:
            return [p.pid for p in psutil.Process(self.pid).children(recursive=True)]
        except psutil.Error:
            return []

    def destroy(self) -> None:
        """SIGKILL the process, everything below it and its session's group; reap it."""
        targets = self.descendants() if self.alive() else []
        for pid in [*targets, self.pid]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        # drainctl runs the app in a group of its own; start_new_session made ours.
        for group in {self.pid, *targets}:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        self.wait(5.0)
        for reader in self._readers:
            reader.join(1.0)


class _Processes:
    """Every process the demo starts, and every one it saw below them; all killed in `close`."""

    def __init__(self) -> None:
        self.started: list[_Process] = []
        self.pids: set[int] = set()
        self._seen: dict[int, Any] = {}  # pid -> psutil.Process, which knows its start time
        self.env = _environ()

    def start(self, label: str, argv: Sequence[str],
              on_event: Callable[[dict[str, Any]], None] | None = None) -> _Process:
        proc = _Process(label, argv, self.env, on_event)
        self.started.append(proc)
        self.pids.add(proc.pid)
        return proc

    def track(self, pids: Sequence[int]) -> None:
        """Processes below ours (the app under drainctl runs in a group of its own)."""
        import psutil

        for pid in pids:
            self.pids.add(pid)
            if pid not in self._seen:
                with contextlib.suppress(psutil.Error):
                    self._seen[pid] = psutil.Process(pid)

    def close(self) -> None:
        import psutil

        for proc in reversed(self.started):
            self.track(proc.descendants())
            if proc.alive():
                proc.signal(signal.SIGTERM)  # a polite word first: the apps exit at once on it
        deadline = time.monotonic() + 1.0
        for proc in reversed(self.started):
            proc.wait(deadline - time.monotonic())
            proc.destroy()
        for seen in self._seen.values():
            # psutil refuses to signal a pid that now belongs to another process (reuse check).
            with contextlib.suppress(psutil.Error):
                seen.kill()


# ---- the load balancer and the clients ----------------------------------------------------------


class _Balancer:
    """Where a *new* connection goes: pod-1 until its endpoints are removed, then pod-2."""

    def __init__(self, first: tuple[str, int], other: tuple[str, int]) -> None:
        self._first, self._other = first, other
        self._removed = threading.Event()

    def pick(self) -> tuple[str, int]:
        return self._other if self._removed.is_set() else self._first

    def remove_first(self) -> None:
        self._removed.set()


@dataclass(frozen=True, slots=True)
class _Result:
    t: float  # wall clock (time.time), when the answer (or the failure) came
    client: str
    kind: str  # keep-alive, slow
    pod: str
    outcome: str  # ok, close (200 + Connection: close), http-NNN, closed, refused, timeout, error
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.outcome not in ("ok", "close")


class _Clients:
    def __init__(self, options: DemoOptions, balancer: _Balancer) -> None:
        self.balancer = balancer
        self.stop = threading.Event()
        self.results: list[_Result] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        n = max(1, options.clients)
        for i in range(options.clients):
            interval = 0.05 + 0.05 * i / max(1, n - 1)  # 50-100 ms: clients not in lockstep
            self._add(f"ka-{i + 1}", "keep-alive", "/", interval, KEEPALIVE_TIMEOUT, 0.0)
        for i in range(options.slow_clients):
            # Staggered starts, so that their requests are not in lockstep; all before the pod
            # is Terminating, so that they all begin on pod-1.
            span = min(SLOW_SECONDS, 0.8 * TERMINATING_AT)
            start = span * i / max(1, options.slow_clients)
            self._add(f"slow-{i + 1}", "slow", f"/slow?s={SLOW_SECONDS:g}", 0.0, SLOW_TIMEOUT,
                      start)

    def _add(self, name: str, kind: str, path: str, interval: float, timeout: float,
             start: float) -> None:
        thread = threading.Thread(
            target=self._client, args=(name, kind, path, interval, timeout, start),
            name=f"demo-{name}", daemon=True,
        )
        self._threads.append(thread)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def finish(self) -> None:
        """Stop sending; a request in flight may finish (each is bounded by its timeout)."""
        self.stop.set()
        deadline = time.monotonic() + SLOW_TIMEOUT
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _client(self, name: str, kind: str, path: str, interval: float, timeout: float,
                start: float) -> None:
        if self.stop.wait(start):
            return
        conn: http.client.HTTPConnection | None = None
        pod = ""
        try:
            for _ in range(MAX_REQUESTS):
                if self.stop.is_set():
                    break
                if conn is None:
                    pod, port = self.balancer.pick()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
                outcome, detail = _request(conn, path)
                result = _Result(time.time(), name, kind, pod, outcome, detail)
                with self._lock:
                    self.results.append(result)
                if outcome != "ok":
                    # As a keep-alive client does: after a close, or a failure, a new connection
                    # (the next request is sent through the load balancer again).
                    conn.close()
                    conn = None
                if interval:
                    self.stop.wait(interval)
        finally:
            if conn is not None:
                conn.close()


def _request(conn: http.client.HTTPConnection, path: str) -> tuple[str, str]:
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read().decode(errors="replace").strip()
    except TimeoutError:
        return "timeout", "no answer in time"
    except ConnectionRefusedError:
        return "refused", "connection refused"
    except http.client.RemoteDisconnected:
        return "closed", "connection closed mid-request"
    except ConnectionError as exc:  # reset, broken pipe, aborted
        return "closed", f"{type(exc).__name__}"
    except (OSError, http.client.HTTPException) as exc:
        return "error", f"{type(exc).__name__}: {exc}"
    if response.status != 200:
        return f"http-{response.status}", body
    return ("close" if response.will_close else "ok"), body


# ---- the scenarios ------------------------------------------------------------------------------


class _Clock:
    """Wall-clock seconds since traffic started: drainctl's events carry unix time too."""

    def __init__(self) -> None:
        self.t0 = time.time()

    def now(self) -> float:
        return time.time() - self.t0

    def rel(self, ts: float) -> float:
        return ts - self.t0

    def sleep_until(self, at: float) -> None:
        # time.sleep in the main thread: Ctrl-C interrupts it, and the clean-up runs.
        time.sleep(max(0.0, at - self.now()))


def _start_pod(procs: _Processes, name: str, naive: bool) -> tuple[_Process, int]:
    port = _free_port()
    proc = procs.start(name, app_argv(port, name, naive))
    proc.wait_ready(READY_TIMEOUT)
    return proc, port


def _await_gone(proc: _Process, clock: _Clock, scenario: Scenario, note: Callable[[str], None],
                what: str) -> None:
    """The kubelet: wait for the pod's process until the grace period is over, then SIGKILL."""
    code = proc.wait(scenario.terminating_at + GRACE_PERIOD - clock.now())
    if code is None:
        note(f"kubelet: grace period ({GRACE_PERIOD:g}s) over: SIGKILL to {what}")
        scenario.sigkill = True
        proc.signal(signal.SIGKILL)
        code = proc.wait(5.0)
    scenario.exit_code = code
    scenario.pod_gone_s = round(clock.now() - scenario.terminating_at, 2)


def _naive(procs: _Processes, options: DemoOptions, other: tuple[str, int]) -> Scenario:
    scenario = Scenario("naive", f"naive, the incident. preStop: sleep {options.delay:g}s, call "
                        "down; after down the app answers 503 \"halting\"")
    proc, port = _start_pod(procs, "pod-1", naive=True)
    clients, clock, note = _traffic(options, port, other, scenario)
    try:
        _terminating(clients, clock, note)
        note(f"preStop hook: sleep {options.delay:g}s")
        clock.sleep_until(TERMINATING_AT + options.delay)
        called_at = round(clock.now(), 2)  # the line goes where the call began, like curl's
        scenario.timeline.append((called_at, f"preStop hook: GET {DOWN_PATH} -> {_call(port)}"))
        note(f"kubelet: preStop returned: SIGTERM to the app ({SHUTDOWN_GRACE:g}s for "
             "requests in flight)")
        proc.signal(signal.SIGTERM)
        _await_gone(proc, clock, scenario, note, "the app")
        note(f"app exited (code {scenario.exit_code}): pod-1 gone")
        clock.sleep_until(clock.now() + TAIL)
    except BaseException:
        clients.stop.set()  # Ctrl-C or an error: the processes go next, nothing to wait for
        raise
    clients.finish()
    _tally(scenario, clients, clock)
    return scenario


def _with_drainctl(procs: _Processes, options: DemoOptions, other: tuple[str, int],
                   tmp: Path) -> Scenario:
    scenario = Scenario("drainctl", "drainctl. drainctl run is PID 1; after down the app "
                        "answers Connection: close")
    events: list[dict[str, Any]] = []
    port = _free_port()
    argv = [
        *drainctl_command(), "run",
        "--delay", f"{options.delay:g}s",
        "--down-url", f"http://127.0.0.1:{port}{DOWN_PATH}",
        "--port", str(port),
        "--grace-period", f"{GRACE_PERIOD:g}s",
        "--stop-timeout", f"{STOP_TIMEOUT:g}s",
        "--settle", f"{int(SETTLE * 1000)}ms",
        "--poll-interval", "50ms",
        "--log-format", "json",  # the demo reads the events
        "--termination-log", "",
        "--control-socket", str(tmp / "drainctl.sock"),  # never a real supervisor's socket
        "--", *app_argv(port, "pod-1", naive=False),
    ]
    proc = procs.start("drainctl run", argv, on_event=events.append)
    proc.wait_ready(READY_TIMEOUT)
    procs.track(proc.descendants())  # the app, in its own group: close() must find it
    clients, clock, note = _traffic(options, port, other, scenario)
    try:
        _terminating(clients, clock, note)
        note("kubelet: no preStop hook: SIGTERM to drainctl (PID 1)")
        proc.signal(signal.SIGTERM)
        _await_gone(proc, clock, scenario, note, "drainctl and the app")
        clock.sleep_until(clock.now() + TAIL)
    except BaseException:
        clients.stop.set()  # Ctrl-C or an error: the processes go next, nothing to wait for
        raise
    clients.finish()
    for event in events:
        if event.get("event") == "child.started" and isinstance(event.get("pid"), int):
            procs.pids.add(event["pid"])  # gone by now: listed for the caller to check
        text = _event_text(event)
        if text:
            scenario.timeline.append((round(clock.rel(float(event["ts"])), 2), text))
    if scenario.sigkill:
        scenario.timeline.append((round(scenario.terminating_at + (scenario.pod_gone_s or 0), 2),
                                  "pod-1 gone (killed)"))
    _tally(scenario, clients, clock)
    return scenario


def _traffic_text(options: DemoOptions) -> str:
    return (f"traffic: {options.clients} keep-alive and {options.slow_clients} slow clients, "
            "all connected to pod-1")


def _traffic(
    options: DemoOptions, port: int, other: tuple[str, int], scenario: Scenario
) -> tuple[_Clients, _Clock, Callable[[str], None]]:
    """Start the clients on pod-1; returns them, the scenario's clock, and its `note`."""
    clients = _Clients(options, _Balancer(("pod-1", port), other))
    clock = _Clock()
    clients.start()

    def note(text: str) -> None:
        scenario.timeline.append((round(clock.now(), 2), text))

    scenario.timeline.append((0.0, _traffic_text(options)))
    return clients, clock, note


def _terminating(clients: _Clients, clock: _Clock, note: Callable[[str], None]) -> None:
    """The kubelet marks pod-1 Terminating: from now on new connections go to pod-2."""
    clock.sleep_until(TERMINATING_AT)
    clients.balancer.remove_first()
    note("kubelet: pod-1 Terminating, endpoints removed: new connections go to pod-2")


def _call(port: int) -> str:
    """The old preStop hook's `curl`: one GET, its status or what went wrong."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{DOWN_PATH}", timeout=2.0) as r:
            return str(r.status)
    except Exception as exc:  # an HTTPError is an answer too: its code
        code = getattr(exc, "code", None)
        return str(code) if code is not None else f"failed ({type(exc).__name__})"


def _event_text(event: dict[str, Any]) -> str | None:
    """drainctl's contract events (CONTRACT.md, "Log events"), as timeline lines."""
    name = event.get("event")
    if name == "drain.started":
        return (f"drainctl: drain started by {event.get('trigger')}; stop signal to the app "
                f"{event.get('deadline_s')}s later at the latest")
    if name == "delay.finished":
        return (f"drainctl: delay over ({event.get('elapsed_s')}s): endpoint removal has had "
                "time to propagate")
    if name == "down.called":
        result = event.get("status", event.get("error"))
        return (f"drainctl: GET {DOWN_PATH} -> {result} ({event.get('elapsed_ms')} ms): the app "
                "now answers Connection: close")
    if name == "connections":
        count = event.get("count")
        ports = ",".join(str(p) for p in event.get("ports", []))
        return f"drainctl: {count} established connection{'' if count == 1 else 's'} on :{ports}"
    if name == "contract.warning":
        return f"drainctl: warning: {event.get('message')}"
    if name == "drain.finished":
        return f"drainctl: drain finished: {event.get('reason')} ({event.get('count')} left)"
    if name == "signal.forwarded":
        return f"drainctl: {event.get('signal')} to the app"
    if name == "kill.escalated":
        return "drainctl: stop-timeout over: SIGKILL to the app"
    if name == "child.exited":
        how = f"code {event['code']}" if "code" in event else f"signal {event.get('signal')}"
        return f"app exited ({how})"
    if name == "exit":
        return f"drainctl exited (code {event.get('code')}): pod-1 gone"
    return None


_CLIENT_TEXT = {
    "close": "200, Connection: close -> reconnect, to pod-2",
    "closed": "connection closed mid-request, no answer [FAILED]",
    "refused": "connection refused [FAILED]",
    "timeout": "no answer in time [FAILED]",
    "error": "error [FAILED]",
}


def _client_text(result: _Result) -> str:
    if result.outcome.startswith("http-"):
        return f'{result.outcome[5:]} "{result.detail}" over the old connection [FAILED]'
    return _CLIENT_TEXT.get(result.outcome, result.outcome)


def _tally(scenario: Scenario, clients: _Clients, clock: _Clock) -> None:
    results = sorted(clients.results, key=lambda r: r.t)
    scenario.requests = len(results)
    for result in results:
        if result.failed:
            scenario.failures += 1
            by_client = scenario.failures_by_client
            by_client[result.kind] = by_client.get(result.kind, 0) + 1
            label = "503" if result.outcome == "http-503" else result.outcome
            by_outcome = scenario.failures_by_outcome
            by_outcome[label] = by_outcome.get(label, 0) + 1
    # The clients' side of the story: every answer that was not a plain 200 on pod-1, grouped
    # when several clients saw the same thing within a moment (one line, not one per client).
    groups: list[tuple[float, str, list[str]]] = []
    for result in results:
        if result.outcome == "ok":
            continue
        t, text = round(clock.rel(result.t), 2), _client_text(result)
        for start, other_text, names in groups:
            if other_text == text and t - start <= 0.3:
                names.append(result.client)
                break
        else:
            groups.append((t, text, [result.client]))
    scenario.timeline.extend(
        (t, f"{', '.join(sorted(names, key=_natural))}: {text}") for t, text, names in groups
    )
    scenario.timeline.sort(key=lambda item: item[0])


def _natural(name: str) -> tuple[str, int]:
    kind, _, number = name.rpartition("-")
    return kind, int(number) if number.isdigit() else 0


# ---- the whole demo -----------------------------------------------------------------------------


@dataclass(slots=True)
class Figures:
    scenarios: list[Scenario]
    pids: list[int]  # every process the demo started or saw: all gone when it returns
    elapsed_s: float
    options: DemoOptions

    def as_json(self) -> dict[str, Any]:
        return {
            "scenarios": {s.name: asdict(s) for s in self.scenarios},
            "pids": self.pids,
            "elapsed_s": self.elapsed_s,
            "options": asdict(self.options),
        }


def run_demo(options: DemoOptions, progress: Callable[[str], None] | None = None) -> Figures:
    started = time.monotonic()
    procs = _Processes()
    tmp = Path(tempfile.mkdtemp(prefix="drainctl-demo-"))
    scenarios: list[Scenario] = []
    try:
        with _signals_end_the_demo():
            _, other_port = _start_pod(procs, "pod-2", naive=False)
            other = ("pod-2", other_port)
            if progress:
                progress("A. naive: running...")
            scenarios.append(_naive(procs, options, other))
            if progress:
                progress("B. drainctl: running...")
            scenarios.append(_with_drainctl(procs, options, other, tmp))
    finally:
        with _uninterrupted():
            procs.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return Figures(scenarios, sorted(procs.pids), round(time.monotonic() - started, 2), options)


@contextlib.contextmanager
def _signals_end_the_demo() -> Iterator[None]:
    """SIGTERM / SIGHUP end the demo like Ctrl-C does: through the clean-up, not around it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signo: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signo, handler in previous.items():
            signal.signal(signo, handler)


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """A second Ctrl-C must not cut the clean-up short (it takes a second at most)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in signals}
    try:
        yield
    finally:
        for signo, handler in previous.items():
            signal.signal(signo, handler)


# ---- output -------------------------------------------------------------------------------------


def render(figures: Figures) -> str:
    options = figures.options
    lines = [
        f"pod-1 is terminated twice. On it: {options.clients} keep-alive clients (a request "
        f"every 50-100 ms)",
        f"and {options.slow_clients} slow clients ({SLOW_SECONDS:g} s requests). pod-2 stays "
        f"up and takes new connections.",
        f"Grace period {GRACE_PERIOD:g}s. Times are seconds since the traffic started.",
    ]
    for letter, scenario in zip("AB", figures.scenarios, strict=False):
        lines += ["", f"{letter}. {scenario.title}"]
        lines += [f"  {t:+6.2f}s  {text}" for t, text in scenario.timeline]
    lines += ["", _table(figures.scenarios)]
    if len(figures.scenarios) == 2:
        naive, fixed = figures.scenarios
        lines += ["", f"naive: {naive.failures} of {naive.requests} requests failed; drainctl: "
                  f"{fixed.failures} of {fixed.requests}, and the pod took "
                  f"{(fixed.pod_gone_s or 0) - (naive.pod_gone_s or 0):.1f}s longer to go."]
    return "\n".join(lines)


def _table(scenarios: Sequence[Scenario]) -> str:
    def failed(s: Scenario, *outcomes: str) -> str:
        return str(sum(s.failures_by_outcome.get(o, 0) for o in outcomes))

    rows: list[tuple[str, Callable[[Scenario], str]]] = [
        ("requests", lambda s: str(s.requests)),
        ("failed", lambda s: str(s.failures)),
        ("  keep-alive clients", lambda s: str(s.failures_by_client.get("keep-alive", 0))),
        ("  slow clients", lambda s: str(s.failures_by_client.get("slow", 0))),
        ("  503 \"halting\"", lambda s: failed(s, "503")),
        ("  closed mid-request", lambda s: failed(s, "closed")),
        ("  refused, timeout, other", lambda s: str(
            s.failures - sum(s.failures_by_outcome.get(o, 0) for o in ("503", "closed"))
        )),
        ("pod gone after Terminating", lambda s: "-" if s.pod_gone_s is None
         else f"{s.pod_gone_s:.1f}s"),
        ("SIGKILL", lambda s: "yes" if s.sigkill else "no"),
    ]
    width = max(len(label) for label, _ in rows) + 2
    head = "".join(f"{s.name:>12}" for s in scenarios)
    out = [" " * width + head]
    for label, cell in rows:
        out.append(f"{label:<{width}}" + "".join(f"{cell(s):>12}" for s in scenarios))
    return "\n".join(out)


def main(options: DemoOptions, as_json: bool = False) -> int:
    """`drainctl demo`: 0 when the figures came out as the incident says they must."""
    progress = None if as_json else _progress
    figures = run_demo(options, progress)
    if as_json:
        print(json.dumps(figures.as_json(), indent=2))
    else:
        print(render(figures), flush=True)
    naive, fixed = figures.scenarios
    return 0 if naive.failures > 0 and fixed.failures == 0 and not fixed.sigkill else 1


def _progress(text: str) -> None:
    # On stderr, so that stdout is only the result (and a pipe gets just that).
    if sys.stderr.isatty():
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


def command(*, as_json: bool, clients: int, slow_clients: int, delay: str) -> int:
    """The CLI's entry: flags in, exit code out (0 expected figures, 1 not, 2 usage, 130 ^C)."""
    from drainctl.cli.commands import fail
    from drainctl.durations import DurationError, parse_duration
    from drainctl.exitcodes import EXIT_FAILED, EXIT_INTERRUPTED

    try:
        # At most MAX_DELAY: the demo's grace period is GRACE_PERIOD.
        seconds = parse_duration(delay, "--delay", maximum=MAX_DELAY)
    except DurationError as exc:
        return fail(str(exc))
    try:
        return main(DemoOptions(clients, slow_clients, seconds), as_json)
    except DemoError as exc:
        return fail(f"demo: {exc}", EXIT_FAILED)
    except KeyboardInterrupt:
        return fail("demo: interrupted (every process it started is gone)", EXIT_INTERRUPTED)
