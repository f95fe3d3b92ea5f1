"""Secure aggregation: the hub learns only the sum of the sites' updates.

`protocol` holds the round (site and hub state machines), `quantize` the float <-> ring encoding
and the packed upload, `prg` the AES-CTR mask generator, `shamir` the secret sharing.
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
)
from deeprad.core.secagg.quantize import Quantizer, VectorLayout, flatten, pack, unflatten, unpack

__all__ = [
    "AdvertiseKeys", "ConsistencySignature", "EncryptedShare", "HubSession", "NotEnoughShares",
    "ProtocolViolation", "Quantizer", "SecAggAborted", "SecAggConfig", "SecAggError",
    "SecAggResult", "ShareKeys", "SiteSession", "SurvivorSet", "UnmaskingShares", "VectorLayout",
    "default_threshold", "flatten", "pack", "unflatten", "unpack",
]
