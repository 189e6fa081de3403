"""drainctl: a shell-free PID 1 that drains TCP connections before it stops the app."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
