"""Durations as people type them: `90s`, `15m`, `24h`, `30d`, `2w`, or plain seconds."""

from __future__ import annotations

import re

from fleetserve.errors import InvalidRequestError

UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
MAX_S = 100 * 365 * 86400


def parse_duration(text: str, name: str) -> float:
    """Seconds, or InvalidRequestError naming `name` and what is allowed."""
    found = _DURATION.match(text)
    if found is None:
        raise InvalidRequestError(
            f"{name}: expected a duration such as 90s, 15m, 24h, 30d or 2w, not {text[:40]!r}",
            param=name,
        )
    seconds = float(found.group(1)) * UNITS_S[found.group(2) or "s"]
    if seconds <= 0 or seconds > MAX_S:
        raise InvalidRequestError(f"{name}: must be more than 0 and at most 100 years", param=name)
    return seconds
