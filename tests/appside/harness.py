"""Real servers on loopback and a keep-alive client that can see the server close.

What they check is docs/app-side.md.

Servers run as subprocesses in their own session (so their workers share one process group, as
under ``drainctl run``), on a free 127.0.0.1 port, with a bounded wait for readiness, and are
always stopped: SIGTERM to the group, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from drainctl.app import contract

TESTS_DIR = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
START_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated field is joined with ", "
    body: bytes
    version: int  # 10 or 11

    @property
    def says_close(self) -> bool:
        tokens = self.headers.get("connection", "").lower().replace(" ", "").split(",")
        return "close" in tokens


class KeepAliveClient:
    """One TCP connection, one request at a time, so that the server's close is observable.

    ``http.client.HTTPConnection`` would close (and reopen) by itself on ``Connection: close``;
    here the test decides, and asks whether the server has sent EOF.
    """

    # Every client still open, so that a failed assertion does not leak sockets (pytest turns
    # the ResourceWarning into an error): running() closes them all.
    live: ClassVar[set[KeepAliveClient]] = set()

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.port = port
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.local_port: int = self.sock.getsockname()[1]
        KeepAliveClient.live.add(self)

    def request(self, path: str, method: str = "GET") -> Response:
        self.sock.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
            "User-Agent: drainctl-test\r\n\r\n".encode()
        )
        resp = http.client.HTTPResponse(self.sock, method=method)
        resp.begin()
        body = resp.read()
        headers: dict[str, str] = {}
        for name, value in resp.getheaders():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        return Response(resp.status, headers, body, resp.version)

    def server_closed(self, wait: float = 2.0) -> bool:
        """True if the server sent EOF (or reset) within ``wait`` seconds; False if still open."""
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(1)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        finally:
            self.sock.settimeout(5.0)
        assert data == b"", f"unexpected bytes after the response: {data!r}"
        return True

    def close(self) -> None:
        self.sock.close()
        KeepAliveClient.live.discard(self)

    @classmethod
    def close_all(cls) -> None:
        for client in list(cls.live):
            client.close()


def server_side_established(server_port: int, client_port: int) -> bool:
    """Is the server's end of this connection still ESTABLISHED (what drainctl counts)?

    /proc/net/tcp{,6}, proc(5): state 01 is ESTABLISHED; ports are hex after the colon.
    """
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local_port = int(cols[1].rsplit(":", 1)[1], 16)
            remote_port = int(cols[2].rsplit(":", 1)[1], 16)
            if (local_port, remote_port, cols[3]) == (server_port, client_port, "01"):
                return True
    return False


def get(port: int, path: str, method: str = "GET") -> Response:
    """One request on a fresh connection, closed afterwards."""
    client = KeepAliveClient(port)
    try:
        return client.request(path, method)
    finally:
        client.close()


@dataclass
class Server:
    name: str
    argv: Sequence[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    state_file: str | None = None

    def start(self) -> None:
        fd, log = tempfile.mkstemp(prefix=f"drainctl-{self.name}-", suffix=".log")
        self.log = Path(log)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p
            ),
            **self.env,
        }
        # Own session: the server's workers share its process group, as under `drainctl run`,
        # and the whole group can be stopped at once.
        self.proc = subprocess.Popen(
            list(self.argv),
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            env=env,
            cwd=TESTS_DIR,
            start_new_session=True,
        )
        os.close(fd)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if get(self.port, "/healthz").status == 200:
                    break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"{self.name} not ready in {START_TIMEOUT}s:\n{self.output()}")
        # Where the down state of this server's group lives (its leader is this process).
        self.state_file = self.env.get(contract.ENV_STATE_FILE) or (
            contract.default_state_file(self.proc.pid)
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if self.proc is not None:
            # Workers left behind by a master that died first.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        for path in (self.state_file, self.log):
            if path:
                with contextlib.suppress(OSError):
                    os.unlink(path)


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        server.start()
        yield server
    finally:
        KeepAliveClient.close_all()
        server.stop()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate()`` until true or ``timeout`` (busy_wait, as in tini's tests)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def worker_pids(server: Server) -> list[int]:
    """The processes of the server's group that serve requests: not the master itself, nor
    multiprocessing's resource tracker (uvicorn and hypercorn start workers with spawn)."""
    assert server.proc is not None
    master = server.proc.pid
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == master:
            continue
        try:
            if os.getpgid(int(entry.name)) != master:
                continue
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmdline:
            found.append(int(entry.name))
    return sorted(found)


@contextlib.contextmanager
def only(pid: int, workers: list[int]) -> Iterator[None]:
    """Let only ``pid`` accept: its sibling workers are stopped meanwhile."""
    others = [w for w in workers if w != pid]
    try:
        for w in others:
            os.kill(w, signal.SIGSTOP)
        yield
    finally:
        for w in others:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGCONT)


def connect_to(pid: int, workers: list[int], port: int) -> tuple[KeepAliveClient, Response]:
    with only(pid, workers):
        client = KeepAliveClient(port)
        # The first request too: a worker accepts when it gets to it, which must be now.
        response = client.request("/")
    assert response.status == 200, response
    assert int(response.headers["x-pid"]) == pid, "the connection reached another worker"
    return client, response


def closes(response: Response) -> bool:
    """Does this response end its connection? RFC 9112 section 9.6 (Connection: close), or
    section 9.3: an HTTP/1.0 response without keep-alive is not persistent (wsgiref)."""
    if response.version == 10:
        return "keep-alive" not in response.headers.get("connection", "").lower()
    return response.says_close


def classify_header_alone(port: int) -> str:
    """Send /naive (the header added by hand, no DrainMiddleware) and classify what happens."""
    client = KeepAliveClient(port)
    try:
        response = client.request("/naive")
        if response.status == 500:
            return "error"
        said, did = response.says_close, client.server_closed(wait=0.5)
        return {
            (True, True): "closes",
            (False, False): "dropped",  # header removed, connection kept
            (True, False): "kept-open",  # header sent, connection kept: RFC 9112 9.6 broken
            (False, True): "closes-silently",
        }[said, did]
    finally:
        client.close()


def assert_really_closed(client: KeepAliveClient, port: int) -> None:
    assert client.server_closed(wait=3.0), "the server kept the connection open"
    assert wait_until(lambda: not server_side_established(port, client.local_port), 2.0), (
        "the server's end of the connection is still ESTABLISHED"
    )
    client.close()


def check_contract(
    srv: Server,
    *,
    workers: int = 1,
    keepalive: bool = True,
    down_url: str = "/drainctl/down",
    header_alone: str | None = None,
    shared_state: bool = True,
) -> None:
    """The app-side checks against one running server, in order: before down, down, after down.

    Before: no close, connections stay open (unless the server never keeps them, ``keepalive``).
    Down: through the first worker only, twice. After: every connection opened before down and
    every new one, on every worker, gets ``Connection: close`` and is really closed; health
    paths answer 200, readiness 503. ``header_alone``: what ``/naive`` is expected to show.
    ``shared_state``: a drainctl down-state file must exist after down (Python servers).
    """
    port = srv.port
    assert srv.proc is not None
    if workers > 1:
        assert wait_until(lambda: len(worker_pids(srv)) == workers, 10.0), (
            f"expected {workers} workers, found {worker_pids(srv)}\n{srv.output()}"
        )
        pids = worker_pids(srv)
    else:
        pids = [srv.proc.pid]

    # Before down: no close, connections stay open; one held connection on every worker.
    held: dict[int, KeepAliveClient] = {}
    for pid in pids:
        client, response = connect_to(pid, pids, port)
        assert response.headers["x-draining"] == "0", response
        if keepalive:
            assert not closes(response), f"{srv.name}: closes before down: {response.headers}"
            assert not client.server_closed(wait=0.2), f"{srv.name}: closed before down"
            held[pid] = client
        else:
            assert closes(response), f"{srv.name}: was expected to close every connection"
            client.close()
    for path in ("/healthz", "/ok.htm", "/readyz"):
        assert get(port, path).status == 200, path
    if header_alone is not None:
        seen = classify_header_alone(port)
        assert seen == header_alone, f"{srv.name}: header alone: {seen}, expected {header_alone}"

    # Down, through the first worker only; twice (idempotent), GET then POST.
    with only(pids[0], pids):
        first = get(port, down_url)
        second = get(port, down_url, method="POST")
    assert (first.status, first.body) == (200, b"down\n"), first
    assert (second.status, second.body) == (200, b"down\n"), second
    if shared_state:
        assert srv.state_file and os.path.exists(srv.state_file), "no down state file written"

    # Every connection opened before down gets Connection: close and is really closed.
    for pid, client in held.items():
        response = client.request("/")
        assert response.status == 200, response
        assert response.headers["x-draining"] == "1", f"worker {pid} did not see the down state"
        assert closes(response), f"{srv.name}: worker {pid} answered without close after down"
        assert_really_closed(client, port)

    # So does every new connection, on every worker.
    for pid in pids:
        client, response = connect_to(pid, pids, port)
        assert response.headers["x-draining"] == "1", response
        assert closes(response), f"{srv.name}: worker {pid}: {response.headers}"
        assert_really_closed(client, port)

    # Health stays 200 (with close: the gateway's checker leaves too); readiness says 503.
    for path in ("/healthz", "/ok.htm"):
        client = KeepAliveClient(port)
        response = client.request(path)
        assert (response.status, response.body) == (200, b"ok\n"), (path, response)
        assert closes(response), (path, response)
        assert_really_closed(client, port)
    ready = get(port, "/readyz")
    assert (ready.status, ready.body) == (503, b"draining\n"), ready
    assert closes(ready), ready
