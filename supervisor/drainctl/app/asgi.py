"""ASGI side of the drain contract: a down endpoint, ``Connection: close`` after it, health 200.

Two lines for an app (docs/app-side.md)::

    from drainctl.asgi import DrainMiddleware
    app = DrainMiddleware(app, health_paths=["/healthz"])

The same contract as drainctl.wsgi. ASGI gives an app one way to ask for a close: the
``Connection: close`` response header (RFC 9112 section 9.6). uvicorn (h11 and httptools, also as
gunicorn's ``uvicorn.workers.UvicornWorker``) and hypercorn honour it and close the connection
after the response. gunicorn's own ASGI worker (``-k asgi``, gunicorn 27) sends the header but
keeps the connection open, against RFC 9112 section 9.6 ("A server that sends a close connection
option MUST initiate closure"); its keep-alive decision reads the request object's
``must_close``, which is reached through the ``send`` callable gunicorn hands to the app (a
closure over that request), so the middleware sets it there. docs/app-side.md has the table;
tests/test_app_side.py checks every row against the real server.

The header is added to HTTP/1.x responses only: HTTP/2 forbids it (RFC 9113 section 8.2.2) and
closing there is the server's GOAWAY. WebSocket and lifespan scopes pass through untouched;
long-lived WebSockets should be closed by the app when ``is_draining()``.

Put DrainMiddleware outermost, so that it gets the server's own ``send``.

Imports only the standard library (README.md, "Dependencies, and why").
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Unpack

from drainctl.app.contract import (
    DEFAULT_DOWN_PATH,
    ENV_STATE_FILE,
    Contract,
    Options,
    Reply,
    is_draining,
    mark_down,
)

__all__ = [
    "DEFAULT_DOWN_PATH",
    "ENV_STATE_FILE",
    "ASGIApp",
    "DrainMiddleware",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "is_draining",
    "mark_down",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


_log = logging.getLogger("drainctl.app")


def _with_close(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    # Replace, not add: two Connection fields that disagree leave the client guessing.
    return [(k, v) for k, v in headers if k.lower() != b"connection"] + [
        (b"connection", b"close")
    ]


def _gunicorn_force_close(send: Send) -> bool | None:
    """For gunicorn's ASGI worker: make it close after this response.

    None: ``send`` is not gunicorn's; True: done; False: gunicorn's, but its request object was
    not found (a gunicorn that changed gunicorn/asgi/protocol.py: the tests will say so).
    """
    if not str(getattr(send, "__module__", "")).startswith("gunicorn."):
        return None
    for cell in getattr(send, "__closure__", None) or ():
        try:
            obj = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        # gunicorn.http.message.Message: should_close() honours must_close.
        if hasattr(obj, "must_close") and callable(getattr(obj, "should_close", None)):
            obj.must_close = True
            return True
    return False


class DrainMiddleware(Contract):
    """Wrap an ASGI app with the drain contract; the options are drainctl.wsgi.DrainMiddleware's.

    The app sees ``scope["drainctl.draining"]`` (as of the request's start).
    """

    def __init__(self, app: ASGIApp, **options: Unpack[Options]) -> None:
        super().__init__(**options)
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        http1 = str(scope.get("http_version", "1.1")).startswith("1")
        scope["drainctl.draining"] = self.state.is_down()
        path = str(scope.get("path", ""))
        root = str(scope.get("root_path", ""))
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        query = bytes(scope.get("query_string", b"")).decode("latin-1")
        route = self.endpoints.route(path, query)
        if route is not None:
            method = str(scope.get("method", "GET")).upper()
            client = scope.get("client")
            host = str(client[0]) if client else None
            reply = self.endpoints.answer(route, method, host, self.state)
            await self._reply(send, reply, head=method == "HEAD", http1=http1)
            return

        async def drain_send(message: Message) -> None:
            # Decided when the response starts: a request that was running when down was
            # called must also make its client leave.
            if message["type"] == "http.response.start" and http1 and self.state.is_down():
                self._force_close(send)
                message = {**message, "headers": _with_close(message.get("headers", ()))}
            await send(message)

        await self.app(scope, receive, drain_send)

    def _force_close(self, send: Send) -> None:
        """What a server needs besides the header (only gunicorn's ASGI worker, so far)."""
        if _gunicorn_force_close(send) is False and not self._warned_unforced:
            self._warned_unforced = True
            _log.warning(
                "drainctl: gunicorn's ASGI worker keeps connections open after Connection: "
                "close and its request object was not found; connections will not close"
            )

    async def _reply(self, send: Send, reply: Reply, *, head: bool, http1: bool) -> None:
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(reply.body)).encode()),
            (b"cache-control", b"no-store"),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers),
        ]
        if http1 and self.state.is_down():
            self._force_close(send)
            headers = _with_close(headers)
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else reply.body})
