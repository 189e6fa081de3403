"""Every exit code drainctl gives, in one place (README, "Exit codes")."""

from __future__ import annotations

import os

__all__ = ["OK", "PRESTOP_LEFT", "USAGE", "from_wait_status"]

OK = 0
PRESTOP_LEFT = 1  # prestop: the deadline came with connections left, or no drain was confirmed
USAGE = 2


def from_wait_status(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128+N for death by signal N."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code
