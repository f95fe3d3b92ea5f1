"""Who the hub is, and so the Shamir threshold of a round: see the protocol module's docstring
and README's privacy section. Kept apart from the protocol (numpy, the masks) so the operator,
which only needs the threshold, loads without them."""

from __future__ import annotations

from typing import Literal

ThreatModel = Literal["semi-honest", "malicious"]
THREAT_MODELS: tuple[ThreatModel, ...] = ("semi-honest", "malicious")
DEFAULT_THREAT_MODEL: ThreatModel = "semi-honest"


def threshold_for(n: int, threat_model: ThreatModel = DEFAULT_THREAT_MODEL) -> int:
    """The round's threshold t for n sites: floor(n/2) + 1 against a semi-honest hub (the
    smallest majority), floor(2n/3) + 1 against a malicious one (the smallest t > 2n/3)."""
    if threat_model == "semi-honest":
        return n // 2 + 1
    if threat_model == "malicious":
        return 2 * n // 3 + 1
    raise ValueError(f"secure aggregation threat model must be one of "
                     f"{', '.join(THREAT_MODELS)}, got {threat_model!r}")


def default_threshold(n: int) -> int:
    """The threshold of the default (semi-honest) threat model."""
    return threshold_for(n, DEFAULT_THREAT_MODEL)
