"""Errors that name the object, the field and the fix."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class DeepRadError(Exception):
    """Base class for every error Deep-Rad raises on purpose."""


class ConfigError(DeepRadError):
    """A user-supplied option, spec or name is invalid."""


class PolicyViolation(ConfigError):
    """Something another party sent goes beyond what this party's own configuration allows,
    e.g. a presigned URL to another host than the store endpoint the site configured."""


class StoreError(DeepRadError):
    """An object is missing or unreadable in the object store."""


class ObjectNotFound(StoreError):
    """The requested key does not exist."""


class StoreUnavailable(StoreError):
    """The store stayed unreachable (connection refused, timeouts, 5xx) past the retry window
    or the task's deadline: a transient fault, never bad input (a Job exits 75 on it)."""


class CheckpointError(DeepRadError):
    """A checkpoint is missing, corrupt, or does not match its manifest."""


class UpdateRejected(DeepRadError):
    """A site's update cannot be aggregated; the round goes on without it."""

    def __init__(self, site: str, reason: str) -> None:
        super().__init__(f"update from site {site!r} rejected: {reason}")
        self.site = site
        self.reason = reason


class DataError(DeepRadError):
    """A dataset is empty, unreadable or malformed."""


def field_problems(exc: ValidationError, prefix: str = "") -> str:
    """A pydantic ValidationError as one line: `<prefix><field.path>: <msg>; ...`."""
    return "; ".join(f"{prefix}{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                     for e in exc.errors())
