"""WSGI side of the drain contract: a down endpoint, ``Connection: close`` after it, health 200.

Two lines for an app (docs/app-side.md)::

    from drainctl.wsgi import DrainMiddleware
    application = DrainMiddleware(application, health_paths=["/healthz"])

After ``GET``/``POST /drainctl/down`` (what ``drainctl run --down-url`` calls), every HTTP/1.x
response tells the client to close and the server closes the connection after it (RFC 9112
section 9.6), so keep-alive clients leave the pod by themselves; health paths keep answering 200
(README.md, "Why": a 503 there, seen through a shared LB address, took the whole LB out of
rotation); the optional readiness path answers 503, for the kubelet's readiness probe only.

PEP 3333 forbids applications to set hop-by-hop headers such as ``Connection``, and servers
differ in what they do with one (see docs/app-side.md for the table, verified by
tests/test_app_side.py), so the close is asked for the way each server understands:

* gunicorn (sync, gthread): drops an app's ``Connection`` header; its response object (the
  owner of ``start_response``) has ``force_close()``, which makes gunicorn send
  ``Connection: close`` and close.
* waitress: rejects hop-by-hop headers (AssertionError); it closes when the *request* said
  ``Connection: close``, so the current request of the connection is marked so.
* wsgiref: rejects hop-by-hop headers too; it answers HTTP/1.0 and closes after every response
  anyway, so nothing is added.
* anything else: the ``Connection: close`` header, which HTTP/1.1 servers that let it through
  honour.

Put DrainMiddleware outermost: gunicorn's ``force_close`` is reached through the server's own
``start_response``, which an outer middleware would hide.

Imports only the standard library (README.md, "Dependencies, and why").
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Unpack

from drainctl.app.contract import (
    DEFAULT_DOWN_PATH,
    ENV_STATE_FILE,
    Contract,
    Options,
    is_draining,
    mark_down,
)

if TYPE_CHECKING:
    from types import TracebackType
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from drainctl.app.contract import Reply

__all__ = [
    "DEFAULT_DOWN_PATH",
    "ENV_STATE_FILE",
    "DrainMiddleware",
    "is_draining",
    "mark_down",
]

_log = logging.getLogger("drainctl.app")

_ExcInfo = tuple[type[BaseException], BaseException, "TracebackType"] | tuple[None, None, None]


def _is_wsgiref(environ: WSGIEnvironment, owner: object) -> bool:
    # wsgiref asserts on hop-by-hop headers (wsgiref/handlers.py, start_response). Look the module
    # up instead of importing it: if it was never imported, this is not wsgiref.
    handlers = sys.modules.get("wsgiref.handlers")
    if handlers is not None and isinstance(owner, handlers.BaseHandler):
        return True
    return str(environ.get("SERVER_SOFTWARE", "")).startswith("WSGIServer/")


def _waitress_close(environ: WSGIEnvironment) -> bool:
    """Mark waitress's current request ``Connection: close``; False if this is not waitress.

    waitress/task.py (build_response_header) decides to close from the request's CONNECTION
    header, read when the response headers are written, i.e. after start_response. The channel is
    reachable through the documented ``waitress.client_disconnected`` callable (a bound method of
    the channel); ``requests[0]`` is the request being served (waitress/channel.py, service).
    """
    checker = environ.get("waitress.client_disconnected")
    channel = getattr(checker, "__self__", None)
    requests = getattr(channel, "requests", None)
    if not requests:
        return False
    headers = getattr(requests[0], "headers", None)
    if not isinstance(headers, dict):
        return False
    headers["CONNECTION"] = "close"
    return True


class DrainMiddleware(Contract):
    """Wrap a WSGI app with the drain contract.

    ``down_path``/``down_query``: the down endpoint (GET or POST, 200, idempotent); e.g.
    ``down_path="/ok.htm", down_query="down=true"`` keeps the incident's contract. Only loopback
    clients may call it unless ``allow_remote_down``.
    ``health_paths``: answered 200 ``ok`` by the middleware, draining or not.
    ``readiness_path``: 200 ``ready``, then 503 ``draining`` after down (kubelet probe only).
    ``state_file``/``check_interval``: see drainctl.app.contract (default: shared by the
    server's process group; ``DRAINCTL_DOWN_STATE`` overrides).
    """

    def __init__(self, app: WSGIApplication, **options: Unpack[Options]) -> None:
        super().__init__(**options)
        self.app = app

    def __call__(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        environ["drainctl.draining"] = self.state.is_down()
        route = self.endpoints.route(
            str(environ.get("PATH_INFO", "")), str(environ.get("QUERY_STRING", ""))
        )
        if route is not None:
            method = str(environ.get("REQUEST_METHOD", "GET")).upper()
            reply = self.endpoints.answer(route, method, environ.get("REMOTE_ADDR"), self.state)
            return self._reply(environ, start_response, reply, head=method == "HEAD")

        def drain_start_response(
            status: str, headers: list[tuple[str, str]], exc_info: _ExcInfo | None = None
        ) -> Callable[[bytes], object]:
            # Decided when the response starts, not when the request came in: a request that
            # was running when down was called must also make its client leave.
            if self.state.is_down():
                headers = self._ask_close(environ, start_response, headers)
            return start_response(status, headers, exc_info)

        return self.app(environ, drain_start_response)

    def _reply(
        self, environ: WSGIEnvironment, start_response: StartResponse, reply: Reply, head: bool
    ) -> list[bytes]:
        headers = [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(reply.body))),
            ("Cache-Control", "no-store"),
            *reply.headers,
        ]
        if self.state.is_down():
            headers = self._ask_close(environ, start_response, headers)
        start_response(f"{reply.status} {reply.reason}", headers)
        return [] if head else [reply.body]

    def _ask_close(
        self,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        headers: list[tuple[str, str]],
    ) -> list[tuple[str, str]]:
        """Make the server close after this response; returns the headers to send."""
        if not str(environ.get("SERVER_PROTOCOL", "")).startswith("HTTP/1."):
            # HTTP/2 has no Connection header (RFC 9113 section 8.2.2): closing is the server's
            # GOAWAY, which WSGI cannot ask for.
            return headers
        owner = getattr(start_response, "__self__", None)
        force_close: Any = getattr(owner, "force_close", None)
        if callable(force_close):
            force_close()  # gunicorn: it writes Connection: close itself and closes
            return headers
        if _is_wsgiref(environ, owner):
            return headers  # HTTP/1.0, one request per connection: closes anyway
        if _waitress_close(environ):
            return headers
        if str(environ.get("SERVER_SOFTWARE", "")).startswith("gunicorn") and (
            not self._warned_unforced
        ):
            self._warned_unforced = True
            _log.warning(
                "drainctl: gunicorn's start_response is wrapped by another middleware, so "
                "connections cannot be closed (gunicorn drops Connection headers from apps); "
                "make DrainMiddleware the outermost middleware"
            )
        return [(k, v) for k, v in headers if k.lower() != "connection"] + [
            ("Connection", "close")
        ]
