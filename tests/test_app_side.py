"""The app side against real servers: the down endpoint, Connection: close after it, health 200.

What is checked is docs/app-side.md.

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

import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.appside.harness import Server, check_contract, free_port, running

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
    # (docs/app-side.md's table): "closes"; "dropped" (the header never reaches the client, the
    # connection stays); "kept-open" (the header is sent, the connection stays); "error" (500:
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
        header_alone="dropped",
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
    Case(
        "gunicorn-uvicorn-worker",
        (PY, "-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker", "--keep-alive", "30",
         "-w", "2", "-b", BIND, ASGI),
        "uvicorn.workers",
        workers=2,
    ),
    Case(
        "gunicorn-asgi",
        (PY, "-m", "gunicorn", "-k", "asgi", "--keep-alive", "30", "-w", "2", "-b", BIND, ASGI),
        "gunicorn.workers.gasgi",
        workers=2,
        header_alone="kept-open",
    ),
    Case("hypercorn", (PY, "-m", "hypercorn", "-w", "2", "-b", BIND, ASGI), "hypercorn", workers=2),
]


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


@pytest.fixture(params=CASES, ids=str)
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Case, Server]]:
    case: Case = request.param
    if not installed(case.needs):
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
    check_contract(
        srv,
        workers=case.workers,
        keepalive=case.keepalive,
        down_url=case.down_url,
        header_alone=case.header_alone,
    )
