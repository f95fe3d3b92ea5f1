"""Why a secure-aggregation round stops."""

from __future__ import annotations

from deeprad.core.errors import DeepRadError


class SecAggError(DeepRadError):
    """Secure aggregation cannot go on; the message says at which step and why."""


class SecAggAborted(SecAggError):
    """Fewer than the threshold of sites are left: the round fails rather than leak or guess."""


class NotEnoughShares(SecAggError):
    """A secret was asked for with fewer Shamir shares than the threshold."""


class ProtocolViolation(SecAggError):
    """A message is forged, malformed, out of place, or inconsistent with what others saw."""
