"""Secure aggregation: the hub learns only the sum of the sites' updates.

`protocol` holds the round (site and hub state machines), `quantize` the float <-> ring encoding
and the packed upload (it needs torch: import it from `deeprad.core.secagg.quantize`; this
package itself loads without torch, as the operator needs), `prg` the AES-CTR mask generator,
`shamir` the secret sharing.
"""

from typing import Any

from deeprad.core.secagg.errors import (
    NotEnoughShares,
    ProtocolViolation,
    SecAggAborted,
    SecAggError,
)
from deeprad.core.secagg.threat import default_threshold, threshold_for

# The protocol (numpy, the masks) loads on first use, so the operator, which needs only the
# threshold and the relay's markers, never loads numpy.
_PROTOCOL = ("AdvertiseKeys", "ConsistencySignature", "EncryptedShare", "HubSession",
             "SecAggConfig", "SecAggResult", "ShareKeys", "SiteSession", "SurvivorSet",
             "UnmaskingShares")


def __getattr__(name: str) -> Any:
    if name in _PROTOCOL:
        from deeprad.core.secagg import protocol

        return getattr(protocol, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdvertiseKeys", "ConsistencySignature", "EncryptedShare", "HubSession", "NotEnoughShares",
    "ProtocolViolation", "SecAggAborted", "SecAggConfig", "SecAggError",
    "SecAggResult", "ShareKeys", "SiteSession", "SurvivorSet", "UnmaskingShares",
    "default_threshold", "threshold_for",
]
