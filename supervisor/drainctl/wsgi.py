"""`drainctl.wsgi`: the public import path of drainctl.app.wsgi (see that module)."""

from __future__ import annotations

from drainctl.app.wsgi import (
    DEFAULT_DOWN_PATH,
    ENV_STATE_FILE,
    DrainMiddleware,
    is_draining,
    mark_down,
)

__all__ = ['DEFAULT_DOWN_PATH', 'ENV_STATE_FILE', 'DrainMiddleware', 'is_draining', 'mark_down']
