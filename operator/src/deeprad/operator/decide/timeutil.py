"""Timestamps and Go durations as the Kubernetes API writes them."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta


def now() -> datetime:
    """The current time, timezone-aware (UTC): the one clock every pass reads."""
    return datetime.now(UTC)


_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str, where: str = "duration") -> timedelta:
    """A Go duration such as `90m`, `1h30m` or `500ms`; ValueError names `where` otherwise."""
    text = value.strip()
    parts = _DURATION_PART.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{where}: {value!r} is not a Go duration; write e.g. 45m, 2h or 1h30m")
    return timedelta(seconds=sum(float(n) * _UNIT_SECONDS[u] for n, u in parts))


def format_duration(delta: timedelta) -> str:
    """A short human form, e.g. `4m10s`, `2h0m`, for messages."""
    seconds = int(delta.total_seconds())
    sign, seconds = ("-", -seconds) if seconds < 0 else ("", seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{sign}{hours}h{minutes}m"
    if minutes:
        return f"{sign}{minutes}m{secs}s"
    return f"{sign}{secs}s"


def rfc3339(when: datetime) -> str:
    """A timestamp as Kubernetes writes it: UTC, seconds precision, `Z` suffix."""
    if when.tzinfo is None:
        raise ValueError(f"timestamp {when!r} has no time zone; pass an aware datetime")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> datetime:
    """An RFC 3339 timestamp (`Z` or an offset, optional fraction) as an aware datetime."""
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no time zone (expected RFC 3339, e.g. "
                         "2030-01-01T00:00:00Z)")
    return when
