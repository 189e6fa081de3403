"""Real loopback traffic for the tests: free ports, keep-alive clients, the test app's signals."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tests.conftest import Proc

__all__ = ["Client", "clients", "free_port", "signal_time"]


def free_port(family: int = socket.AF_INET) -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Client:
    """A keep-alive client: one connection, a request every `interval` until told to stop or
    until the server answers `Connection: close` (then it leaves, as a real client reconnects
    elsewhere once the pod is out of the endpoints)."""

    port: int
    path: str = "/"
    interval: float = 0.05
    host: str = "127.0.0.1"
    requests: int = 0
    failures: list[str] = field(default_factory=list)
    closed_at: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Client:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        deadline = time.monotonic() + 30  # bounded whatever happens
        try:
            while not self.stop.is_set() and time.monotonic() < deadline:
                try:
                    conn.request("GET", self.path)
                    response = conn.getresponse()
                    response.read()
                except OSError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                    return
                except http.client.HTTPException as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                    return
                self.requests += 1
                if response.status != 200:
                    self.failures.append(f"status {response.status}")
                if (response.getheader("Connection") or "").lower() == "close":
                    return
                self.stop.wait(self.interval)
        finally:
            conn.close()
            self.closed_at = time.time()

    def finish(self) -> None:
        """Stop sending and wait for the client to leave."""
        self.stop.set()
        self.join()

    def join(self, timeout: float = 15) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "client did not finish"


@contextmanager
def clients(*items: Client) -> Iterator[list[Client]]:
    started = [c.start() for c in items]
    try:
        yield started
    finally:
        for c in started:
            c.stop.set()
        for c in started:
            if c.thread is not None:
                c.thread.join(15)


def signal_time(proc: Proc, name: str) -> float | None:
    """When tests/apps/httpapp.py got signal `name` (its own clock), or None."""
    for line in proc.stdout().splitlines():
        if line.startswith(f"signal {name} "):
            return float(line.split()[2])
    return None
