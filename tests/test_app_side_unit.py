"""The app side in process: the middlewares' routing and headers, the shared down state, imports.

What is checked is docs/app-side.md.

The real servers are in test_app_side.py; here the WSGI/ASGI callables are driven directly, which
pins the edge cases (methods, remote callers, HTTP/2, lifespan) without a process per case.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from drainctl import asgi, wsgi
from drainctl.app import contract
from drainctl.app.contract import DownState, Endpoints, is_local_client

# --- WSGI, driven directly


class Recorder:
    """A start_response that remembers what it was given."""

    def __init__(self) -> None:
        self.status = ""
        self.headers: list[tuple[str, str]] = []

    def __call__(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        self.status, self.headers = status, headers
        return lambda data: None

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name]
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None


class GunicornLikeResponse:
    """gunicorn's Response: start_response is its bound method; force_close() is the way in."""

    def __init__(self) -> None:
        self.forced = False
        self.recorder = Recorder()

    def force_close(self) -> None:
        self.forced = True

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        return self.recorder(status, headers, exc_info)


def hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Connection", "keep-alive")])
    return [b"flag=%d" % environ["drainctl.draining"]]


def environ(path: str = "/", method: str = "GET", **extra: str) -> dict[str, Any]:
    query = ""
    if "?" in path:
        path, query = path.split("?", 1)
    return {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "SERVER_SOFTWARE": "test",
        **extra,
    }


def call(app: wsgi.DrainMiddleware, env: dict[str, Any]) -> tuple[Recorder, bytes]:
    rec = Recorder()
    body = b"".join(app(env, rec))
    return rec, body


@pytest.fixture
def state_file(tmp_path: Path) -> str:
    return str(tmp_path / "down-state")


def test_wsgi_before_and_after_down(state_file: str) -> None:
    app = wsgi.DrainMiddleware(hello, health_paths=["/healthz"], state_file=state_file)
    rec, body = call(app, environ("/"))
    assert (rec.header("connection"), body) == ("keep-alive", b"flag=0")
    assert not app.draining and not wsgi.is_draining(state_file)

    rec, body = call(app, environ("/drainctl/down", "POST"))
    assert (rec.status, body, rec.header("connection")) == ("200 OK", b"down\n", "close")
    assert app.draining and wsgi.is_draining(state_file)

    # The app's own Connection field is replaced, not doubled.
    rec, body = call(app, environ("/"))
    assert (rec.header("connection"), body) == ("close", b"flag=1")
    rec, body = call(app, environ("/healthz"))
    assert (rec.status, body, rec.header("connection")) == ("200 OK", b"ok\n", "close")
    # Idempotent.
    rec, body = call(app, environ("/drainctl/down"))
    assert (rec.status, body) == ("200 OK", b"down\n")


def test_wsgi_request_running_when_down_came_also_closes(state_file: str) -> None:
    def slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        wsgi.mark_down(state_file)  # the down call arrives while this request runs
        start_response("200 OK", [])
        return [b""]

    app = wsgi.DrainMiddleware(slow, state_file=state_file)
    rec, _ = call(app, environ("/"))
    assert rec.header("connection") == "close"


def test_wsgi_incident_contract_ok_htm(state_file: str) -> None:
    app = wsgi.DrainMiddleware(
        hello,
        down_path="/ok.htm",
        down_query="down=true",
        health_paths=["/ok.htm"],
        readiness_path="/ready",
        state_file=state_file,
    )
    for path in ("/ok.htm", "/ok.htm?down=false", "/ok.htm?x=1"):
        rec, body = call(app, environ(path))
        assert (rec.status, body) == ("200 OK", b"ok\n"), path
    assert not app.draining
    rec, body = call(app, environ("/ok.htm?x=1&down=true"))
    assert (rec.status, body) == ("200 OK", b"down\n")
    # The incident's bug was this page answering 503 "halting": it stays 200.
    rec, body = call(app, environ("/ok.htm"))
    assert (rec.status, body) == ("200 OK", b"ok\n")
    rec, body = call(app, environ("/ready"))
    assert (rec.status, body) == ("503 Service Unavailable", b"draining\n")


@pytest.mark.parametrize(
    ("path", "method", "status", "allow"),
    [
        ("/drainctl/down", "PUT", "405 Method Not Allowed", "GET, POST"),
        ("/drainctl/down", "DELETE", "405 Method Not Allowed", "GET, POST"),
        ("/healthz", "POST", "405 Method Not Allowed", "GET, HEAD"),
        ("/readyz", "HEAD", "200 OK", None),
    ],
)
def test_wsgi_methods(
    state_file: str, path: str, method: str, status: str, allow: str | None
) -> None:
    app = wsgi.DrainMiddleware(
        hello, health_paths=["/healthz"], readiness_path="/readyz", state_file=state_file
    )
    rec, body = call(app, environ(path, method))
    assert (rec.status, rec.header("allow")) == (status, allow)
    if method == "HEAD":
        assert body == b"" and rec.header("content-length") == "6"
    assert not app.draining


def test_wsgi_down_is_loopback_only_by_default(state_file: str) -> None:
    app = wsgi.DrainMiddleware(hello, state_file=state_file)
    rec, _ = call(app, environ("/drainctl/down", REMOTE_ADDR="10.1.2.3"))
    assert rec.status == "403 Forbidden" and not app.draining
    for local in ("::1", "127.0.0.9", ""):  # "" : a unix socket
        assert is_local_client(local)
    opened = wsgi.DrainMiddleware(hello, state_file=state_file, allow_remote_down=True)
    rec, _ = call(opened, environ("/drainctl/down", REMOTE_ADDR="10.1.2.3"))
    assert rec.status == "200 OK" and opened.draining


def test_wsgi_gunicorn_force_close(state_file: str) -> None:
    app = wsgi.DrainMiddleware(hello, state_file=state_file)
    app.mark_down()
    resp = GunicornLikeResponse()
    b"".join(app(environ("/", SERVER_SOFTWARE="gunicorn/27"), resp.start_response))
    # gunicorn drops an app's Connection field; force_close makes it send its own and close.
    assert resp.forced
    assert resp.recorder.header("connection") == "keep-alive"


def test_wsgi_waitress_request_is_marked(state_file: str) -> None:
    class Request:
        headers: dict[str, str] = {}  # noqa: RUF012 - mimics waitress's parser

    class Channel:
        def __init__(self) -> None:
            self.requests = [Request()]

        def check_client_disconnected(self) -> None:
            pass

    channel = Channel()
    app = wsgi.DrainMiddleware(hello, state_file=state_file)
    app.mark_down()
    env = environ("/", **{"waitress.client_disconnected": channel.check_client_disconnected})  # type: ignore[arg-type]
    rec, _ = call(app, env)
    assert channel.requests[0].headers["CONNECTION"] == "close"
    # waitress raises on hop-by-hop headers from apps: the middleware must not add one.
    assert rec.header("connection") == "keep-alive"


def test_wsgi_wsgiref_gets_no_hop_by_hop_header(state_file: str) -> None:
    app = wsgi.DrainMiddleware(hello, state_file=state_file)
    app.mark_down()
    rec, _ = call(app, environ("/", SERVER_SOFTWARE="WSGIServer/0.2 CPython/3.11"))
    assert rec.header("connection") == "keep-alive"  # the app's, untouched


def test_wsgi_http2_is_left_alone(state_file: str) -> None:
    app = wsgi.DrainMiddleware(hello, state_file=state_file)
    app.mark_down()
    rec, _ = call(app, environ("/", SERVER_PROTOCOL="HTTP/2"))
    assert rec.header("connection") == "keep-alive"


def test_wsgi_warns_when_gunicorn_is_out_of_reach(
    state_file: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = wsgi.DrainMiddleware(hello, state_file=state_file)
    app.mark_down()
    with caplog.at_level(logging.WARNING, logger="drainctl.app"):
        call(app, environ("/", SERVER_SOFTWARE="gunicorn/27"))
        call(app, environ("/", SERVER_SOFTWARE="gunicorn/27"))
    assert sum("outermost" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"down_path": "drainctl/down"},
        {"down_path": "/x", "health_paths": ["/x"]},
        {"health_paths": ["/r"], "readiness_path": "/r"},
        {"down_query": "&"},
    ],
)
def test_bad_configuration(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Endpoints(**kwargs)


# --- ASGI, driven directly


async def asgi_hello(scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
    if scope["type"] != "http":
        await send({"type": f"{scope['type']}.seen"})
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"connection", b"keep-alive")],
        }
    )
    await send({"type": "http.response.body", "body": b"flag=%d" % scope["drainctl.draining"]})


def asgi_call(
    app: asgi.DrainMiddleware, path: str = "/", method: str = "GET", **scope: Any
) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[asgi.Message] = []

    async def receive() -> asgi.Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: asgi.Message) -> None:
        sent.append(message)

    path, _, query = path.partition("?")
    full: dict[str, Any] = {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "path": path,
        "root_path": "",
        "query_string": query.encode(),
        "client": ("127.0.0.1", 40000),
        "headers": [],
        **scope,
    }
    asyncio.run(app(full, receive, send))
    if full["type"] != "http":
        return 0, {}, json.dumps([m["type"] for m in sent]).encode()
    start, *bodies = sent
    names = [k for k, _ in start["headers"]]
    assert len(names) == len(set(names)), f"a header field is repeated: {names}"
    return start["status"], dict(start["headers"]), b"".join(m["body"] for m in bodies)


def test_asgi_before_and_after_down(state_file: str) -> None:
    app = asgi.DrainMiddleware(
        asgi_hello, health_paths=["/healthz"], readiness_path="/readyz", state_file=state_file
    )
    assert asgi_call(app, "/") == (200, {b"connection": b"keep-alive"}, b"flag=0")
    assert asgi_call(app, "/readyz")[::2] == (200, b"ready\n")
    status, headers, body = asgi_call(app, "/drainctl/down")
    assert (status, body, headers[b"connection"]) == (200, b"down\n", b"close")
    assert app.draining and asgi.is_draining(state_file)
    assert asgi_call(app, "/") == (200, {b"connection": b"close"}, b"flag=1")
    assert asgi_call(app, "/healthz")[::2] == (200, b"ok\n")
    assert asgi_call(app, "/readyz")[::2] == (503, b"draining\n")
    assert asgi_call(app, "/drainctl/down", "POST")[::2] == (200, b"down\n")
    # HTTP/2 forbids the field (RFC 9113 section 8.2.2).
    assert asgi_call(app, "/", http_version="2")[1] == {b"connection": b"keep-alive"}


def test_asgi_root_path_remote_and_other_scopes(state_file: str) -> None:
    app = asgi.DrainMiddleware(asgi_hello, state_file=state_file)
    assert asgi_call(app, "/drainctl/down", client=("10.0.0.8", 1))[0] == 403
    assert asgi_call(app, "/drainctl/down", "PUT")[0] == 405
    assert not app.draining
    # Mounted under /api: the path is matched below the mount point.
    assert asgi_call(app, "/api/drainctl/down", root_path="/api")[::2] == (200, b"down\n")
    for kind in ("lifespan", "websocket"):
        assert asgi_call(app, type=kind)[2] == json.dumps([f"{kind}.seen"]).encode()


def gunicorn_like_send(request: object, sent: list[asgi.Message]) -> asgi.Send:
    """A send() shaped like gunicorn's ASGI worker's: a closure over its request object."""

    async def send(message: asgi.Message) -> None:
        assert request is not None
        sent.append(message)

    send.__module__ = "gunicorn.asgi.protocol"
    return send


def test_asgi_gunicorn_worker_request_is_marked(
    state_file: str, caplog: pytest.LogCaptureFixture
) -> None:
    class Request:
        must_close = False

        def should_close(self) -> bool:
            return self.must_close

    app = asgi.DrainMiddleware(asgi_hello, state_file=state_file)
    app.mark_down()
    scope = {"type": "http", "http_version": "1.1", "method": "GET", "path": "/"}

    async def receive() -> asgi.Message:
        return {"type": "http.request"}

    request = Request()
    sent: list[asgi.Message] = []
    asyncio.run(app(scope, receive, gunicorn_like_send(request, sent)))
    assert request.must_close and dict(sent[0]["headers"])[b"connection"] == b"close"
    # A gunicorn whose send() no longer closes over the request: said once, loudly.
    with caplog.at_level(logging.WARNING, logger="drainctl.app"):
        for _ in range(2):
            asyncio.run(app(scope, receive, gunicorn_like_send(object(), [])))
    assert sum("request object was not found" in r.getMessage() for r in caplog.records) == 1


# --- The shared down state


def test_down_state_crosses_instances_like_workers(state_file: str) -> None:
    # Two DownState objects on one file are two workers of one server.
    first, second = DownState(state_file), DownState(state_file)
    assert not first.is_down() and not second.is_down()
    first.mark_down()
    assert second.is_down()
    assert Path(state_file).read_text().strip() == contract.state_key()
    # A worker that starts after down (gunicorn replaces workers) is down at once.
    assert DownState(state_file).is_down()


def test_stale_state_from_another_incarnation_is_ignored(state_file: str) -> None:
    Path(state_file).write_text("4026531836-7-12345\n")  # same pgid, earlier leader start
    state = DownState(state_file)
    assert not state.is_down()
    assert not state.is_down()  # and not read again while unchanged
    state.mark_down()
    assert DownState(state_file).is_down()


def test_check_interval_caches_the_negative_answer(state_file: str) -> None:
    cached = DownState(state_file, check_interval=3600)
    assert not cached.is_down()
    DownState(state_file).mark_down()
    assert not cached.is_down()  # trusted "not down" until the interval has passed
    assert DownState(state_file, check_interval=0).is_down()


def test_unwritable_state_stays_in_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "missing-dir" / "state")
    state = DownState(path)
    with caplog.at_level(logging.WARNING, logger="drainctl.app"):
        state.mark_down()
    assert state.is_down()
    assert not DownState(path).is_down()
    assert any("only this process" in r.getMessage() for r in caplog.records)
    assert os.listdir(tmp_path) == []  # no temporary file left behind


def test_default_location_and_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(contract.ENV_STATE_FILE, raising=False)
    path = contract.default_state_file()
    assert path is not None
    pidns, pgid, start = Path(path).name.removeprefix("drainctl-down-").split("-")
    assert int(pgid) == os.getpgrp() and pidns.isdigit() and start.isdigit()
    monkeypatch.setenv(contract.ENV_STATE_FILE, str(tmp_path / "x"))
    assert contract.default_state_file() == str(tmp_path / "x")
    # Module-level helpers and middlewares on the same file share one object.
    assert contract.get_state(str(tmp_path / "x")) is wsgi.DrainMiddleware(
        hello, state_file=str(tmp_path / "x")
    ).state


def test_importing_the_app_side_imports_only_the_standard_library() -> None:
    code = (
        "import sys, json; before = set(sys.modules); "
        "import drainctl.wsgi, drainctl.asgi; "
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    modules = set(json.loads(out))
    assert {"drainctl.wsgi", "drainctl.asgi", "drainctl.app.contract"} <= modules  # it ran
    assert not modules & {"typer", "psutil", "httpx"}
    added = {name.split(".")[0] for name in modules}
    foreign = added - set(sys.stdlib_module_names) - {"drainctl"}
    assert not foreign, f"drainctl.wsgi/asgi import {sorted(foreign)}"
    # app/ stands alone: nothing of drainctl outside it but the package and the two public paths.
    outside = {
        name
        for name in modules
        if name.startswith("drainctl.") and not name.startswith("drainctl.app")
    } - {"drainctl.wsgi", "drainctl.asgi"}
    assert not outside, f"the app side imports {sorted(outside)}"


def test_wsgi_and_asgi_helpers_are_one_down_state(tmp_path: Path) -> None:
    path = str(tmp_path / "down")
    assert not wsgi.is_draining(path) and not asgi.is_draining(path)
    asgi.mark_down(path)
    assert wsgi.is_draining(path) and asgi.is_draining(path)
    assert DownState(path).is_down()  # and it is on disk, for the other workers
    # One implementation, re-exported by both public paths.
    assert wsgi.is_draining is asgi.is_draining is contract.is_draining
    assert wsgi.mark_down is asgi.mark_down is contract.mark_down


@pytest.mark.parametrize("module", ["drainctl.wsgi", "drainctl.asgi"])
def test_a_misspelt_option_is_an_error(module: str) -> None:
    import importlib

    middleware = importlib.import_module(module).DrainMiddleware
    with pytest.raises(TypeError, match="health_path"):
        middleware(lambda *a: None, health_path=["/h"])
