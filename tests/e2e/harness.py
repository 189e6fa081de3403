"""The incident's real components on one machine: pods in namespaces, an L4 LB, an L7 gateway.

    load (keep-alive clients) -> gateway: HAProxy `mode http`, reuses its server connections,
                                 marks its single upstream down on a 5xx (the incident's gateway)
                              -> LB: HAProxy `mode tcp`, pins each TCP connection to one pod
                              -> pod a, pod b: a network namespace each (veth to the host, a /30
                                 of 10.250.0.0/16) and a PID namespace each (its PID 1 is
                                 `drainctl run`, or the app itself for the incident as it was)

`Kubelet.delete()` is what the kubelet does for a pod deletion: endpoint removal reaches the LB
after a propagation lag (`set server ... state drain` on HAProxy's runtime API: no new
connections, the established ones go on, as with kube-proxy or a cloud LB), the preStop hook is
exec'd in the pod's namespaces, SIGTERM goes to PID 1 when the hook returns, SIGKILL at the grace
period.

`PodRuntime` makes the pods: `unshare` namespaces here; tests/e2e/oci.py's `Runc` makes them runc
containers and brings runc's verbs (`Pod.enter`, `Pod.signal`, `Pod.wait_gone`) to the Kubelet.

Everything is created per test, named with the test process's pid, and torn down even on failure
(`Cluster.close`): processes first (a network namespace lives on while a process is in it), then
namespaces and veths. Only loopback and the veths created here are used.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tests.conftest import Proc, Processes, drainctl_argv, inner_pid, wait_for
from tests.java_support import tomcat_classpath

APP_PORT = 8080
# A private range for the veths; addresses exist only inside the namespaces created here.
SUBNET = ipaddress.IPv4Network("10.250.0.0/16")
DOWN_PATH = "/ok.htm?down=true"  # the incident's down contract, kept by every app here


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=10)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)}: {result.stderr.strip()}")
    return result


# ---- network ------------------------------------------------------------------------------------


class PodNetwork:
    """A network namespace with a veth to the host: host end .1, pod end (`eth0`) .2 of a /30."""

    def __init__(self, pod: str, index: int) -> None:
        pid = os.getpid()
        self.name = f"drainctl-e2e-{pid}-{pod}"
        self.host_if = f"dce{pid % 1000000}{pod}"  # IFNAMSIZ: at most 15 characters
        # One /30 per pod, chosen by the pid so that two runs on one machine do not collide.
        slot = ((pid % 4096) * 4 + index) % (SUBNET.num_addresses // 4)
        base = SUBNET.network_address + slot * 4
        self.host_addr = str(base + 1)
        self.pod_addr = str(base + 2)
        self.created = False

    def create(self) -> None:
        taken = {word.split("/")[0] for word in _ip("-br", "addr").stdout.split()}
        if self.host_addr in taken:
            raise RuntimeError(f"{self.host_addr} is already on an interface of this host")
        self.created = True
        _ip("netns", "add", self.name)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", "eth0",
            "netns", self.name)
        _ip("addr", "add", f"{self.host_addr}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", self.name, "addr", "add", f"{self.pod_addr}/30", "dev", "eth0")
        _ip("-n", self.name, "link", "set", "eth0", "up")
        # The down call and drainctl's probe go to 127.0.0.1 inside the pod.
        _ip("-n", self.name, "link", "set", "lo", "up")

    def delete(self) -> None:
        if not self.created:
            return
        # Deleting the namespace takes its end of the veth, and the pair with it; the host end
        # is deleted too in case a process still held the namespace.
        _ip("netns", "del", self.name, check=False)
        _ip("link", "del", self.host_if, check=False)


# ---- HAProxy ------------------------------------------------------------------------------------


class HAProxy:
    """One HAProxy in the foreground (`-db`), its log on stdout, its runtime API on a socket."""

    def __init__(self, procs: Processes, name: str, sockdir: Path) -> None:
        self.procs = procs
        self.name = name
        self.socket = sockdir / f"{name}.sock"  # short: sun_path holds 108 bytes
        self.config = procs.tmp / f"{name}.cfg"
        self.proc: Proc | None = None

    def global_section(self) -> str:
        return (
            "global\n"
            "    nbthread 1\n"  # one thread: one pool of idle server connections, reproducible
            "    log stdout format raw local0\n"
            f"    stats socket {self.socket} mode 600 level admin\n"
        )

    def start(self, config: str) -> None:
        self.config.write_text(self.global_section() + config)
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(self.config)],
                               capture_output=True, text=True, timeout=10)
        assert check.returncode == 0, f"{self.name}: {check.stderr}{check.stdout}"
        self.proc = proc = self.procs.start(["haproxy", "-db", "-f", str(self.config)])
        # The runtime API answers once HAProxy runs its loop, after every listener is bound; a
        # probe connection instead would show up in the logs and, through the LB, on a pod.
        wait_for(lambda: self._answers() or proc.popen.poll() is not None, 10)
        assert proc.popen.poll() is None, f"{self.name} exited: {proc.stderr()}"

    def command(self, line: str) -> str:
        """One command on the runtime API (HAProxy management guide, section 9.3)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def _answers(self) -> bool:
        try:
            return "Name: HAProxy" in self.command("show info")
        except OSError:
            return False

    def log(self) -> str:
        return self.proc.stdout() if self.proc is not None else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoadBalancer(HAProxy):
    """The cloud LB / kube-proxy: L4, each TCP connection pinned to one pod for its whole life."""

    BACKEND = "pods"

    def start_for(self, pods: Sequence[Pod]) -> None:
        self.port = free_port()
        servers = "".join(f"    server {p.name} {p.net.pod_addr}:{APP_PORT}\n" for p in pods)
        self.start(
            "defaults\n"
            "    mode tcp\n"
            "    log global\n"
            "    timeout connect 2s\n"
            # Longer than any keep-alive here: the LB never cuts a connection itself.
            "    timeout client 120s\n"
            "    timeout server 120s\n"
            "frontend lb\n"
            f"    bind 127.0.0.1:{self.port}\n"
            f"    default_backend {self.BACKEND}\n"
            f"backend {self.BACKEND}\n"
            "    balance roundrobin\n"
            + servers
        )

    def deregister(self, pod: str) -> None:
        # `drain`: weight 0, so no new connection goes to the pod; established ones go on.
        answer = self.command(f"set server {self.BACKEND}/{pod} state drain")
        assert answer.strip() == "", f"set server: {answer!r}"


class L7Gateway(Protocol):
    """What a scenario needs of its gateway (HAProxy's `Gateway` here, `NginxGateway` in
    tests/e2e/nginx.py): started in front of the LB, then a port for the load, and figures."""

    kind: str  # "haproxy", "nginx"
    port: int

    def start_for(self, lb: LoadBalancer) -> None: ...

    def upstream_up(self) -> bool: ...

    def marked_down(self) -> int:
        """How often the gateway took (part of) its upstream out, from its log."""
        ...

    def details(self) -> dict[str, Any]:
        """Figures of its own, added to the scenario's."""
        ...


class Gateway(HAProxy):
    """The incident's gateway: HTTP keep-alive to its single upstream, the LB's address, and
    passive health checks that mark that upstream down on one 5xx or broken response."""

    kind = "haproxy"

    def start_for(self, lb: LoadBalancer) -> None:
        self.port = free_port()
        self.start(
            "defaults\n"
            "    mode http\n"
            "    log global\n"
            "    option httplog\n"
            "    option http-keep-alive\n"
            "    timeout connect 2s\n"
            "    timeout client 60s\n"
            "    timeout server 60s\n"
            "    timeout http-keep-alive 60s\n"
            "    timeout queue 10s\n"
            "    timeout check 2s\n"
            "frontend gateway\n"
            f"    bind 127.0.0.1:{self.port}\n"
            "    default_backend upstream\n"
            "backend upstream\n"
            # Any idle server connection serves any client's request: the long-lived keep-alive
            # connections to the LB address of the incident.
            "    http-reuse always\n"
            # No retry anywhere: every failure reaches a client and is counted.
            "    retry-on none\n"
            "    option httpchk GET /ok.htm\n"
            # observe layer7 + error-limit 1 + on-error mark-down: one 5xx (or a broken response)
            # from the LB address takes the single upstream out until its checks pass again
            # (rise 2 x inter 1s): the incident's outage.
            f"    server lb 127.0.0.1:{lb.port} check inter 1s fall 3 rise 2 "
            "observe layer7 error-limit 1 on-error mark-down\n"
        )

    def upstream_up(self) -> bool:
        # `show servers state`: field 6 is srv_op_state, 2 = running (management guide 9.3).
        for line in self.command("show servers state upstream").splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[3] == "lb":
                return fields[5] == "2"
        return False

    def marked_down(self) -> int:
        return sum(1 for line in self.log().splitlines() if "Server upstream/lb is DOWN" in line)

    def details(self) -> dict[str, Any]:
        return {}


# ---- pods ---------------------------------------------------------------------------------------


def python_app(mode: str, pod: str) -> tuple[list[str], dict[str, str]]:
    """gunicorn (gthread: keep-alive, threads for the slow requests) serving tests/e2e/app.py."""
    argv = [
        sys.executable, "-m", "gunicorn", "-k", "gthread", "--workers", "2", "--threads", "16",
        # Longer than the gateway's pool ever keeps a connection idle, so that the server never
        # closes an idle keep-alive connection under a request the gateway is sending on it.
        "--keep-alive", "75",
        "--bind", f"0.0.0.0:{APP_PORT}", "--graceful-timeout", "10", "--log-level", "warning",
        "tests.e2e.app:application",
    ]
    return argv, {"E2E_APP_MODE": mode, "E2E_POD": pod}


def java_app(
    classpath: Sequence[Path], pod: str, naive: bool = False
) -> tuple[list[str], dict[str, str]]:
    """examples/java's DrainFilter, as dist/drainctl-servlet-jakarta.jar, in embedded Tomcat 10
    (examples/java/tomcat), on every address (the LB reaches the pod over its veth); `naive`:
    the same app without the filter, never changed (no down endpoint, keeps connections)."""
    return [
        "java", "-Ddrainctl.downPath=/ok.htm", "-Ddrainctl.downQuery=down=true",
        f"-Ddrainctl.pod={pod}",
        *(["-Ddrainctl.filter=off"] if naive else []),
        # Tomcat's work directory in the session's own temporary directory: a pod that is
        # SIGKILLed at the end of a test (pod b) never removes it.
        f"-Djava.io.tmpdir={classpath[0].parent}",
        "-cp", ":".join(map(str, classpath)),
        "io.drainctl.tomcat.TomcatDemo", str(APP_PORT), "0.0.0.0",
    ], {}


def compile_java(out: Path) -> list[Path]:
    """build/java.py's jars and the Tomcat demo, built in `out`; the class path that runs it."""
    return tomcat_classpath(out)


class Pod:
    """A pod: its own network and PID namespaces; `argv` is its PID 1."""

    def __init__(self, procs: Processes, name: str, net: PodNetwork, argv: Sequence[str],
                 env: dict[str, str]) -> None:
        self.procs = procs
        self.name = name
        self.net = net
        self.argv = list(argv)
        self.env = env
        self.proc: Proc | None = None
        self.pid1 = 0  # PID 1 of the pod, as the host sees it

    def start(self) -> None:
        # `ip netns exec` execs unshare (no fork), and `unshare --fork` makes `argv` PID 1 of a
        # new PID namespace with its own /proc.
        self.proc = self.procs.start(
            ["ip", "netns", "exec", self.net.name,
             "unshare", "--pid", "--fork", "--mount-proc", *self.argv],
            env=self.env,
        )
        self.pid1 = inner_pid(self.proc)

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.popen.poll() is not None:
                raise AssertionError(f"pod {self.name} exited: {self.proc.stderr()[-3000:]}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection(self.net.pod_addr, APP_PORT, timeout=1)
                try:
                    conn.request("GET", "/ok.htm")
                    return conn.getresponse().status == 200
                finally:
                    conn.close()
            return False

        wait_for(ready, timeout, interval=0.1)

    def enter(self, argv: Sequence[str]) -> list[str]:
        """`argv` in the pod's namespaces, as the kubelet execs a hook (runc exec joins them)."""
        return ["nsenter", "--target", str(self.pid1), "--pid", "--mount", "--net", *argv]

    def signal(self, signo: int) -> None:
        """What the kubelet's runtime does for SIGTERM / SIGKILL: a signal to PID 1."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid1, signo)

    def wait_gone(self, timeout: float) -> bool:
        """Wait until PID 1 has exited, at most `timeout` seconds; True if it did."""
        assert self.proc is not None
        return wait_exit(self.proc, timeout)

    def events(self) -> list[dict[str, Any]]:
        """drainctl's JSON events (the app's own log lines on the same stderr are skipped)."""
        found = []
        if self.proc is not None:
            for line in self.proc.stderr().splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict) and "event" in record:
                        found.append(record)
        return found


class PodRuntime:
    """How a scenario's pods are made: here `unshare` namespaces, the source or DRAINCTL_BIN's
    drainctl; tests/e2e/oci.py's `Runc` makes them real OCI containers instead."""

    name = "unshare"

    def __init__(self, procs: Processes) -> None:
        self.procs = procs

    def drainctl(self) -> list[str]:
        """drainctl's argv as the pod sees it (PID 1's and the preStop hook's)."""
        return drainctl_argv()

    def pod(self, name: str, net: PodNetwork, argv: Sequence[str], env: dict[str, str]) -> Pod:
        pod = Pod(self.procs, name, net, argv, env)
        pod.start()
        return pod


def old_hook(delay: float) -> list[str]:
    """The incident's preStop script, minus the shell: sleep, then call the down URL."""
    code = (
        f"import time, urllib.request; time.sleep({delay}); "
        f"urllib.request.urlopen('http://127.0.0.1:{APP_PORT}{DOWN_PATH}', timeout=5).read()"
    )
    return [sys.executable, "-c", code]


def prestop_hook() -> list[str]:
    return [*drainctl_argv(), "prestop"]


# ---- the kubelet --------------------------------------------------------------------------------


def wait_exit(proc: Proc, timeout: float) -> bool:
    """Wait for `proc` to exit, at most `timeout` seconds; True if it did.

    A pidfd (pidfd_open(2)) becomes readable the moment the process exits, where
    Popen.wait(timeout) polls every 50 ms: the figures are timings, so wake at once.
    """
    try:
        fd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        fd = -1  # already reaped
    if fd >= 0:
        try:
            select.select([fd], [], [], max(0.0, timeout))
        finally:
            os.close(fd)
    return proc.popen.poll() is not None  # reaps it if it exited


@dataclass
class Deletion:
    t0: float  # time.monotonic() of the deletion
    t0_wall: float  # the same moment on time.time(), the clock of drainctl's events
    deregistered_s: float | None = None
    hook_rc: int | None = None
    hook_s: float | None = None
    hook_output: str = ""
    sigterm_s: float | None = None
    sigkill: bool = False
    gone_s: float | None = None
    exit_code: int | None = None


class Kubelet:
    def __init__(self, procs: Processes, lb: LoadBalancer, lag: float, grace: float) -> None:
        self.procs = procs
        self.lb = lb
        self.lag = lag
        self.grace = grace

    def delete(self, pod: Pod, hook: Sequence[str] | None) -> Deletion:
        assert pod.proc is not None
        d = Deletion(t0=time.monotonic(), t0_wall=time.time())
        deadline = d.t0 + self.grace

        def deregister() -> None:
            self.lb.deregister(pod.name)
            d.deregistered_s = time.monotonic() - d.t0

        # Endpoint removal runs in parallel with the hook and reaches the LB after `lag`.
        timer = threading.Timer(self.lag, deregister)
        timer.start()
        try:
            if hook is not None:
                hook_proc = self.procs.start(pod.enter(hook), env=pod.env)
                if not wait_exit(hook_proc, deadline - time.monotonic()):
                    hook_proc.popen.kill()  # the grace period is over: so is the hook
                    hook_proc.wait(5)
                d.hook_s = time.monotonic() - d.t0
                d.hook_rc = hook_proc.popen.returncode
                d.hook_output = hook_proc.stdout() + hook_proc.stderr()
            if pod.proc.popen.poll() is None:
                d.sigterm_s = time.monotonic() - d.t0
                pod.signal(signal.SIGTERM)
            if not pod.wait_gone(deadline - time.monotonic()):
                d.sigkill = True
                pod.signal(signal.SIGKILL)  # PID 1 gone: the kernel kills the rest
                pod.proc.wait(10)
            d.gone_s = time.monotonic() - d.t0
            d.exit_code = pod.proc.popen.returncode
        finally:
            timer.join(self.lag + 5)
        return d


# ---- load ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    kind: str  # "fast" or "slow"
    start: float  # time.monotonic()
    end: float
    status: int | None
    error: str | None
    pod: str | None

    @property
    def failed(self) -> bool:
        return self.error is not None or self.status != 200

    @property
    def what(self) -> str:
        return self.error or f"status {self.status}"


REQUEST_TIMEOUT = 10.0


class Load:
    """Keep-alive clients through the gateway: `fast` ones with short requests every `interval`,
    `slow` ones with back-to-back requests of `slow_s` seconds. Every request is a Sample; a
    failure is a status other than 200, an error (reset, EOF) or a timeout. Bounded: each client
    stops at `stop()` or after `limit` seconds."""

    def __init__(self, port: int, fast: int = 12, slow: int = 6, slow_s: float = 2.0,
                 interval: float = 0.1, limit: float = 60.0) -> None:
        self.port = port
        self.fast = fast
        self.slow = slow
        self.slow_s = slow_s
        self.interval = interval
        self.limit = limit
        self.samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for kind, n in (("fast", self.fast), ("slow", self.slow)):
            for i in range(n):
                # The slow clients start out of phase, so that at any moment slow requests are
                # in flight at every stage, not all started together.
                offset = i * self.slow_s / n if kind == "slow" else 0.0
                thread = threading.Thread(target=self._client, args=(kind, offset),
                                          name=f"load-{kind}-{i}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT + 5)

    def _client(self, kind: str, offset: float) -> None:
        path = f"/slow?s={self.slow_s}" if kind == "slow" else "/"
        end_by = time.monotonic() + self.limit
        self._stop.wait(offset)
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set() and time.monotonic() < end_by:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
            start = time.monotonic()
            status: int | None = None
            error: str | None = None
            pod: str | None = None
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                status, pod = response.status, response.getheader("X-Pod")
            except (OSError, http.client.HTTPException) as exc:
                error = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
                conn.close()
                conn = None
            sample = Sample(kind, start, time.monotonic(), status, error, pod)
            with self._lock:
                self.samples.append(sample)
            if kind == "fast" or sample.failed:
                self._stop.wait(self.interval)  # also keeps a failing client from spinning
        if conn is not None:
            conn.close()

    def snapshot(self) -> list[Sample]:
        with self._lock:
            return list(self.samples)


# ---- one test's cluster -------------------------------------------------------------------------


@dataclass
class Cluster:
    """Everything one scenario starts; `close()` removes all of it, processes first."""

    procs: Processes
    sockdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dce2e-")))
    networks: list[PodNetwork] = field(default_factory=list)
    loads: list[Load] = field(default_factory=list)
    # Run first at close(), last added first: e.g. `runc delete --force` of each container.
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def network(self, pod: str) -> PodNetwork:
        net = PodNetwork(pod, len(self.networks))
        self.networks.append(net)
        net.create()
        return net

    def load(self, port: int, **kwargs: Any) -> Load:
        load = Load(port, **kwargs)
        self.loads.append(load)
        return load

    def close(self) -> None:
        try:
            for load in self.loads:
                load.stop()
        finally:
            try:
                for cleanup in reversed(self.cleanups):
                    with contextlib.suppress(Exception):  # one failing must not stop the rest
                        cleanup()
                self.procs.cleanup()
            finally:
                for net in self.networks:
                    net.delete()
                shutil.rmtree(self.sockdir, ignore_errors=True)


# ---- figures ------------------------------------------------------------------------------------


def figures(name: str, samples: Sequence[Sample], deletion: Deletion, pod: Pod,
            gateway: L7Gateway, bound_s: float | None) -> dict[str, Any]:
    """What one scenario measured, times in seconds from the deletion."""
    t0 = deletion.t0
    failed = [s for s in samples if s.failed]
    events = pod.events()
    finished = next((e for e in events if e["event"] == "drain.finished"), None)
    escalated = any(e["event"] == "kill.escalated" for e in events)
    closed = [e for e in events if e["event"] == "connections.closed"]

    def at(name: str) -> float | None:
        """When drainctl logged `name` (its first), in seconds from the deletion."""
        found = next((e["ts"] for e in events if e["event"] == name), None)
        return None if found is None else round(found - deletion.t0_wall, 2)

    # The stop signal the app got: from drainctl once drained, or the kubelet's SIGTERM.
    stop_s = at("signal.forwarded") if finished is not None else deletion.sigterm_s
    # The down call: drainctl's, or the old hook's last act.
    down_s = at("down.called") if finished is not None else deletion.hook_s

    def slow_running(moment: float | None) -> int | None:
        """Slow requests that pod a answered and that were running at `moment`."""
        if moment is None:
            return None
        return sum(1 for s in samples if s.kind == "slow" and s.pod == pod.name
                   and s.start - t0 < moment < s.end - t0)

    after_dereg = [
        s for s in samples
        if s.pod == pod.name and deletion.deregistered_s is not None
        and s.start - t0 > deletion.deregistered_s
    ]
    return {
        "scenario": name,
        "requests": len(samples),
        "failures": len(failed),
        "failures_by_kind": dict(Counter(s.what for s in failed)),
        "failures_window_s": (
            [round(min(s.end for s in failed) - t0, 2), round(max(s.end for s in failed) - t0, 2)]
            if failed else None
        ),
        "pod_gone_s": None if deletion.gone_s is None else round(deletion.gone_s, 2),
        "bound_s": bound_s,
        "sigkill": deletion.sigkill,
        "drainctl_kill_escalated": escalated,
        "exit_code": deletion.exit_code,
        "deregistered_s": (
            None if deletion.deregistered_s is None else round(deletion.deregistered_s, 2)
        ),
        "hook_s": None if deletion.hook_s is None else round(deletion.hook_s, 2),
        "hook_rc": deletion.hook_rc,
        "sigterm_s": None if deletion.sigterm_s is None else round(deletion.sigterm_s, 2),
        "drain": None if finished is None else {
            k: finished.get(k) for k in ("reason", "count", "elapsed_s")
        },
        # Where the time went after the drain (drainctl's events; None without drainctl).
        "stop_signal_s": at("signal.forwarded"),
        "app_exited_s": at("child.exited"),
        "drainctl_exit_s": at("exit"),
        "served_by_pod_after_deregistration": len(after_dereg),
        "slow_running_at_down": slow_running(down_s),
        "slow_running_at_stop": slow_running(stop_s),
        "gateway": gateway.kind,
        "gateway_marked_upstream_down": gateway.marked_down(),
        **gateway.details(),
        # --close-idle: how many connections drainctl closed, and when (first, last)
        "connections_closed": sum(e.get("count", 0) for e in closed),
        "closed_with_answer": sum(e.get("with_answer", 0) for e in closed),
        "closed_window_s": (
            [round(closed[0]["ts"] - deletion.t0_wall, 2),
             round(closed[-1]["ts"] - deletion.t0_wall, 2)] if closed else None
        ),
    }
