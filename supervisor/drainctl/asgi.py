"""`drainctl.asgi`: the public import path of drainctl.app.asgi (see that module)."""

from __future__ import annotations

from drainctl.app.asgi import (
    DEFAULT_DOWN_PATH,
    ENV_STATE_FILE,
    ASGIApp,
    DrainMiddleware,
    Message,
    Receive,
    Scope,
    Send,
    is_draining,
    mark_down,
)

__all__ = [
    "DEFAULT_DOWN_PATH", "ENV_STATE_FILE", "ASGIApp", "DrainMiddleware", "Message", "Receive",
    "Scope", "Send", "is_draining", "mark_down",
]
