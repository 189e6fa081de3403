"""Fault injection for drainctl's own tests: make named places fail in a real drainctl.

`DRAINCTL_FAULTS` is a comma list of places (`loop`, `drain`, `job:lookup`, `job:count`,
`job:down`, `job:probe`, `job:prepare`, `events`), each optionally `=exit` to raise SystemExit
(what a frozen binary whose files were removed raises on import) instead of RuntimeError. It is
read once, at import, and removed from the environment so the app never sees it. Not for
production: it exists so the tests can prove that PID 1 survives what they inject
(README, "Reliability").
"""

from __future__ import annotations

import os

__all__ = ["check"]


def _parse(text: str) -> dict[str, str]:
    faults: dict[str, str] = {}
    for item in text.split(","):
        place, _, kind = item.strip().partition("=")
        if place:
            faults[place] = kind or "error"
    return faults


_FAULTS = _parse(os.environ.pop("DRAINCTL_FAULTS", ""))


def check(place: str) -> None:
    """Raise the fault injected at `place`, if any (a dict lookup otherwise)."""
    kind = _FAULTS.get(place) if _FAULTS else None
    if kind is None:
        return
    if kind == "exit":
        raise SystemExit(f"injected at {place}")
    raise RuntimeError(f"injected at {place}")
