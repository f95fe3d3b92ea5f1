"""Secure aggregation: the hub learns only the sum of the sites' updates.

`protocol` holds the round (site and hub state machines), `quantize` the float <-> ring encoding
and the packed upload (it needs torch: import it from `deeprad.core.secagg.quantize`; this
package itself loads without torch, as the operator needs), `prg` the AES-CTR mask generator,
`shamir` the secret sharing.
"""

from deeprad.core.secagg.errors import (
    NotEnoughShares,
    ProtocolViolation,
    SecAggAborted,
    SecAggError,
)
from deeprad.core.secagg.protocol import (
    AdvertiseKeys,
    ConsistencySignature,
    EncryptedShare,
    HubSession,
    SecAggConfig,
    SecAggResult,
    ShareKeys,
    SiteSession,
    SurvivorSet,
    UnmaskingShares,
    default_threshold,
    threshold_for,
)

__all__ = [
    "AdvertiseKeys", "ConsistencySignature", "EncryptedShare", "HubSession", "NotEnoughShares",
    "ProtocolViolation", "SecAggAborted", "SecAggConfig", "SecAggError",
    "SecAggResult", "ShareKeys", "SiteSession", "SurvivorSet", "UnmaskingShares",
    "default_threshold", "threshold_for",
]
