"""The ASGI app the app-side tests serve; the same contract and headers as wsgi_app."""

from __future__ import annotations

import os

from drainctl.asgi import (
    DEFAULT_DOWN_PATH,
    DrainMiddleware,
    Message,
    Receive,
    Scope,
    Send,
    is_draining,
)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    assert scope["type"] == "http"
    draining = "1" if is_draining() else "0"
    body = f"hello from {os.getpid()} draining={draining}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
                (b"x-pid", str(os.getpid()).encode()),
                (b"x-draining", draining.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def naive_close_header(scope: Scope, receive: Receive, send: Send) -> None:
    """What an app would do by hand: add Connection: close and hope the server honours it."""

    async def add_close(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message["headers"], (b"connection", b"close")]}
        await send(message)

    await app(scope, receive, add_close)


drained = DrainMiddleware(
    app,
    down_path=os.environ.get("APP_DOWN_PATH", DEFAULT_DOWN_PATH),
    down_query=os.environ.get("APP_DOWN_QUERY") or None,
    health_paths=["/healthz", "/ok.htm"],
    readiness_path="/readyz",
)


async def application(scope: Scope, receive: Receive, send: Send) -> None:
    # /naive bypasses the middleware: the tests record what each server does with the header
    # alone (docs/app-side.md).
    if scope["type"] == "http" and scope["path"] == "/naive":
        await naive_close_header(scope, receive, send)
    else:
        await drained(scope, receive, send)
