"""Issue 5 against real servers: the down endpoint, Connection: close after it, health stays 200.

Each case starts one real server (subprocess, own process group, free 127.0.0.1 port) serving
tests/appside/{wsgi,asgi}_app.py and drives it with raw keep-alive connections, so that the
server's close is seen as EOF and in /proc/net/tcp (the server's end leaves ESTABLISHED, which is
what drainctl counts).

Multi-worker servers: a worker is addressed by SIGSTOPping its siblings for the length of one
connect (a stopped worker cannot accept, so the connection lands on the running one). The down
request is sent to the first worker only; the other workers' connections, opened before down,
must close too: the down state has crossed processes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.appside.harness import (
    KeepAliveClient,
    Response,
    Server,
    free_port,
    get,
    running,
    server_side_established,
    wait_until,
)

PY = sys.executable


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # "{port}" is replaced
    needs: str  # the module that must be importable
    workers: int = 1
    # Does the server keep connections open before down? gunicorn's sync worker and wsgiref
    # serve one request per connection whatever the app says.
    keepalive: bool = True
    env: dict[str, str] = field(default_factory=dict)
    down_url: str = "/drainctl/down"
    # What the server does with an app's own `Connection: close` header and nothing else
    # (docs/app-side.md's table): "closes", "ignored" (dropped, connection kept) or "error" (500:
    # the server enforces PEP 3333's ban on hop-by-hop headers).
    header_alone: str = "closes"

    def __str__(self) -> str:
        return self.id


WSGI = "appside.wsgi_app:application"
ASGI = "appside.asgi_app:application"
BIND = "127.0.0.1:{port}"

CASES = [
    Case(
        "gunicorn-sync",
        (PY, "-m", "gunicorn", "-k", "sync", "-w", "2", "-b", BIND, WSGI),
        "gunicorn",
        workers=2,
        keepalive=False,  # closes after every response anyway, so "closes" says little
    ),
    Case(
        "gunicorn-gthread",
        # --keep-alive 30: gunicorn's default of 2 s would close idle connections mid-test.
        (PY, "-m", "gunicorn", "-k", "gthread", "--threads", "2", "--keep-alive", "30",
         "-w", "2", "-b", BIND, WSGI),
        "gunicorn",
        workers=2,
        header_alone="ignored",
    ),
    Case(
        "waitress",
        (PY, "-m", "waitress", "--listen=" + BIND, WSGI),
        "waitress",
        # The incident's own contract, and a state file named by the environment.
        env={"APP_DOWN_PATH": "/ok.htm", "APP_DOWN_QUERY": "down=true"},
        down_url="/ok.htm?down=true",
        header_alone="error",
    ),
    Case(
        "wsgiref",
        (PY, "-m", "appside.wsgiref_server", "{port}"),
        "wsgiref",
        keepalive=False,  # HTTP/1.0, one request per connection
        header_alone="error",
    ),
    Case(
        "uvicorn-h11",
        (PY, "-m", "uvicorn", "--http", "h11", "--host", "127.0.0.1", "--port", "{port}", ASGI),
        "uvicorn",
    ),
    Case(
        "uvicorn-httptools",
        (PY, "-m", "uvicorn", "--http", "httptools", "--workers", "2", "--host", "127.0.0.1",
         "--port", "{port}", ASGI),
        "httptools",
        workers=2,
    ),
    Case("hypercorn", (PY, "-m", "hypercorn", "-w", "2", "-b", BIND, ASGI), "hypercorn", workers=2),
]


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
    assert response.status == 200
    assert int(response.headers["x-pid"]) == pid, "the connection reached another worker"
    return client, response


def closes(response: Response) -> bool:
    """Does this response end its connection? RFC 9112 section 9.6 (Connection: close), or
    section 9.3: an HTTP/1.0 response without keep-alive is not persistent (wsgiref)."""
    if response.version == 10:
        return "keep-alive" not in response.headers.get("connection", "").lower()
    return response.says_close


def header_alone(port: int) -> str:
    """Send /naive (the header added by hand, no DrainMiddleware) and classify what happens."""
    client = KeepAliveClient(port)
    try:
        response = client.request("/naive")
        if response.status == 500:
            return "error"
        said, did = response.says_close, client.server_closed(wait=0.5)
        if said and did:
            return "closes"
        if not said and not did:
            return "ignored"
        return f"inconsistent (header {said}, closed {did})"
    finally:
        client.close()


def assert_really_closed(client: KeepAliveClient, port: int) -> None:
    assert client.server_closed(wait=3.0), "the server kept the connection open"
    assert wait_until(lambda: not server_side_established(port, client.local_port), 2.0), (
        "the server's end of the connection is still ESTABLISHED"
    )
    client.close()


@pytest.fixture(params=CASES, ids=str)
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Case, Server]]:
    case: Case = request.param
    if importlib.util.find_spec(case.needs) is None:
        pytest.skip(f"{case.needs} is not installed")
    port = free_port()
    env = dict(case.env)
    if case.id == "waitress":
        env["DRAINCTL_DOWN_STATE"] = str(tmp_path / "down-state")
    argv = [a.replace("{port}", str(port)) for a in case.argv]
    with running(Server(case.id, argv, port, env)) as srv:
        yield case, srv


@pytest.mark.timeout(30)
def test_drain_contract(server: tuple[Case, Server]) -> None:
    case, srv = server
    port = srv.port
    assert srv.proc is not None
    if case.workers > 1:
        assert wait_until(lambda: len(worker_pids(srv)) == case.workers, 10.0), (
            f"expected {case.workers} workers, found {worker_pids(srv)}\n{srv.output()}"
        )
        workers = worker_pids(srv)
    else:
        workers = [srv.proc.pid]

    # Before down: no close, connections stay open; one held connection on every worker.
    held: dict[int, KeepAliveClient] = {}
    for pid in workers:
        client, response = connect_to(pid, workers, port)
        assert response.headers["x-draining"] == "0"
        if case.keepalive:
            assert not closes(response), f"{case}: closes before down: {response.headers}"
            assert not client.server_closed(wait=0.2), f"{case}: closed before down"
            held[pid] = client
        else:
            assert closes(response), f"{case}: was expected to close every connection"
            client.close()
    for path in ("/healthz", "/ok.htm", "/readyz"):
        assert get(port, path).status == 200, path
    assert header_alone(port) == case.header_alone

    # Down, through the first worker only; twice (idempotent), GET then POST.
    with only(workers[0], workers):
        first = get(port, case.down_url)
        second = get(port, case.down_url, method="POST")
    assert (first.status, first.body) == (200, b"down\n")
    assert (second.status, second.body) == (200, b"down\n")
    assert srv.state_file and os.path.exists(srv.state_file), "no shared down state was written"

    # Every connection opened before down gets Connection: close and is really closed.
    for pid, client in held.items():
        response = client.request("/")
        assert response.status == 200
        assert response.headers["x-draining"] == "1", f"worker {pid} did not see the down state"
        assert closes(response), f"{case}: worker {pid} answered without close after down"
        assert_really_closed(client, port)

    # So does every new connection, on every worker.
    for pid in workers:
        client, response = connect_to(pid, workers, port)
        assert response.headers["x-draining"] == "1"
        assert closes(response), f"{case}: worker {pid}: {response.headers}"
        assert_really_closed(client, port)

    # Health stays 200 (with close: the gateway's checker leaves too); readiness says 503.
    for path in ("/healthz", "/ok.htm"):
        client = KeepAliveClient(port)
        response = client.request(path)
        assert (response.status, response.body) == (200, b"ok\n"), path
        assert closes(response), path
        assert_really_closed(client, port)
    ready = get(port, "/readyz")
    assert (ready.status, ready.body) == (503, b"draining\n")
    assert closes(ready)
