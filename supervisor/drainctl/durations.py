"""Durations: the one parser for every option (`250ms`, `15s`, `2m`, `1h30m`, or seconds) and
the one formatter for every message, event and report.

ASCII only: Python's `\\d` and `str.isdigit` accept digits of other scripts (Arabic-Indic,
fullwidth) and superscripts that `float` then rejects; a duration is written with 0-9. Every
duration has a maximum (README.md, "Options"): a value past it is a usage error, not an
overflow later.
"""

from __future__ import annotations

__all__ = ["DAY", "DurationError", "format_duration", "parse_duration"]

DAY = 86400.0

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DIGITS = frozenset("0123456789.")
# Longer input is not a duration anyone meant.
_MAX_TEXT = 64


class DurationError(ValueError):
    """Not a duration, or one outside its bounds; the message is one line naming `where`."""


def parse_duration(
    text: str,
    where: str = "duration",
    *,
    maximum: float = DAY,
    minimum: float = 0.0,
    positive: bool = False,
) -> float:
    """`250ms`, `15s`, `2m`, `1h`, `1h30m` or plain seconds (`1.5`) -> seconds, within bounds.

    `positive`: zero is refused too. NaN, infinities and negative values never parse.
    """
    seconds = _seconds(text.strip(" \t\n\r\f\v")) if len(text) <= _MAX_TEXT else None
    if seconds is None:
        raise DurationError(
            f"{where}: {text!r} is not a duration (use e.g. 500ms, 15s, 2m, 1h30m, or seconds)"
        )
    if seconds > maximum:  # also +inf: "9" * 400 parses as float("inf")
        raise DurationError(f"{where}: {text!r} is past the maximum of {format_duration(maximum)}")
    if positive and seconds <= 0:
        raise DurationError(f"{where}: {text!r} must be greater than 0")
    if seconds < minimum:
        raise DurationError(f"{where}: {text!r} is below the minimum of "
                            f"{format_duration(minimum)}")
    return seconds


def _seconds(text: str) -> float | None:
    """A number of seconds, or numbers each with a unit (`1h30m`); None if it is neither.
    By hand, not with a regular expression: this runs at PID 1's start-up (options.py)."""
    if text and all(ch in _DIGITS for ch in text):
        return _number(text)
    total, i = 0.0, 0
    while i < len(text):
        start = i
        while i < len(text) and text[i] in _DIGITS:
            i += 1
        number = _number(text[start:i])
        while i < len(text) and text[i] in " \t":  # `5 s`, as before
            i += 1
        unit = "ms" if text.startswith("ms", i) else text[i : i + 1]
        if number is None or unit not in _UNIT_SECONDS:
            return None
        total += number * _UNIT_SECONDS[unit]
        i += len(unit)
    return total if text else None


def _number(text: str) -> float | None:
    """`15`, `1.5`, `.5`, `5.`: ASCII digits with at most one point."""
    if text.count(".") > 1 or not text.strip("."):
        return None
    return float(text)


def format_duration(seconds: float) -> str:
    """Seconds -> `0s`, `250ms`, `4.5s`, `2m05s`, `1h`, `30h15m`: short, and readable back by
    parse_duration (fractions under a minute only)."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return str(seconds)
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds == 0:
        return "0s"
    if seconds < 1:
        millis = f"{seconds * 1000:.1f}".removesuffix(".0")
        return f"{millis}ms"
    if seconds < 60:
        return f"{seconds:.1f}".removesuffix(".0") + "s"
    whole = int(seconds)
    if whole < 3600:
        minutes, secs = divmod(whole, 60)
        return f"{minutes}m{secs:02d}s" if secs else f"{minutes}m"
    hours, rest = divmod(whole, 3600)
    minutes = rest // 60
    return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"
