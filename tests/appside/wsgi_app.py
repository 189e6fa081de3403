"""The WSGI app the app-side tests serve: wrapped in DrainMiddleware the two-line way.

Every response says which worker served it (``X-Pid``) and whether that worker is draining
(``X-Draining``), so a test can tell that the down state reached every worker.
APP_DOWN_PATH / APP_DOWN_QUERY switch to another down contract (e.g. /ok.htm + down=true).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from drainctl.wsgi import DEFAULT_DOWN_PATH, DrainMiddleware, is_draining

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    draining = "1" if is_draining() else "0"
    body = f"hello from {os.getpid()} draining={draining}\n".encode()
    start_response(
        "200 OK",
        [
            ("Content-Type", "text/plain"),
            ("Content-Length", str(len(body))),
            ("X-Pid", str(os.getpid())),
            ("X-Draining", draining),
        ],
    )
    return [body]


def naive_close_header(
    environ: WSGIEnvironment, start_response: StartResponse
) -> Iterable[bytes]:
    """What an app would do by hand: add Connection: close and hope the server honours it."""

    def add_close(
        status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        return start_response(status, [*headers, ("Connection", "close")], exc_info)

    return app(environ, add_close)


drained = DrainMiddleware(
    app,
    down_path=os.environ.get("APP_DOWN_PATH", DEFAULT_DOWN_PATH),
    down_query=os.environ.get("APP_DOWN_QUERY") or None,
    health_paths=["/healthz", "/ok.htm"],
    readiness_path="/readyz",
)


def application(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    # /naive bypasses the middleware: the tests record what each server does with the header
    # alone (docs/app-side.md). start_response is passed on as it is, so DrainMiddleware still
    # sees the server's own one.
    if environ.get("PATH_INFO") == "/naive":
        return naive_close_header(environ, start_response)
    return drained(environ, start_response)
