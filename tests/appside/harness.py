"""Real servers on loopback and a keep-alive client that can see the server close (issue 5).

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from drainctl import _downstate

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

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.port = port
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.local_port: int = self.sock.getsockname()[1]

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
        self.state_file = self.env.get(_downstate.ENV_STATE_FILE) or (
            _downstate.default_state_file(self.proc.pid)
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
        server.stop()


def wait_until(predicate: object, timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate()`` until true or ``timeout`` (busy_wait, as in tini's tests)."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
