"""Human durations (``"7d"``, ``"1h30m"``, ``"500ms"``) for settings.

Config files are written by people; seconds-as-integers are a classic source of
"was that ms or s?" incidents, so every duration in the settings takes a unit.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

from pydantic.functional_validators import BeforeValidator

_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
ACCEPTED = "a number with a unit (ms, s, m, h, d, w), e.g. '7d', '90s', '1h30m', '500ms'"


def parse_duration(value: object) -> timedelta:
    """Parse a duration; plain numbers are seconds. Raises ``ValueError`` naming the form."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError(f"expected {ACCEPTED}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"must not be negative; expected {ACCEPTED}")
        return timedelta(seconds=value)
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        if text and _PART.fullmatch(text) is None and not _is_parts(text):
            raise ValueError(f"bad duration {value!r}: expected {ACCEPTED}")
        if not text:
            raise ValueError(f"empty duration: expected {ACCEPTED}")
        seconds = sum(float(n) * _UNITS[u] for n, u in _PART.findall(text))
        return timedelta(seconds=seconds)
    raise ValueError(f"expected {ACCEPTED}")


def _is_parts(text: str) -> bool:
    return "".join(m.group(0) for m in _PART.finditer(text)) == text


def format_duration(value: timedelta) -> str:
    """The inverse of :func:`parse_duration`, for logs and messages."""
    ms = round(value.total_seconds() * 1000)
    for unit in ("w", "d", "h", "m", "s"):
        size = round(_UNITS[unit] * 1000)
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
"""A settings field type: a human duration, parsed once at start-up."""
