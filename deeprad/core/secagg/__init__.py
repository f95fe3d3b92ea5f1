"""Secure aggregation: the hub learns only the sum of the sites' updates.

`protocol` holds the round (site and hub state machines), `quantize` the float <-> ring encoding
and the packed upload, `prg` the AES-CTR mask generator, `shamir` the secret sharing.
"""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from deeprad.core.secagg.quantize import (
        Quantizer,
        VectorLayout,
        flatten,
        pack,
        unflatten,
        unpack,
    )

_QUANTIZE = ("Quantizer", "VectorLayout", "flatten", "pack", "unflatten", "unpack")


def __getattr__(name: str) -> Any:
    # The ring encoding needs torch; loading it only when used keeps the operator (which
    # reads the protocol's rules, never tensors) free of torch.
    if name in _QUANTIZE:
        from deeprad.core.secagg import quantize

        return getattr(quantize, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdvertiseKeys", "ConsistencySignature", "EncryptedShare", "HubSession", "NotEnoughShares",
    "ProtocolViolation", "Quantizer", "SecAggAborted", "SecAggConfig", "SecAggError",
    "SecAggResult", "ShareKeys", "SiteSession", "SurvivorSet", "UnmaskingShares", "VectorLayout",
    "default_threshold", "flatten", "pack", "unflatten", "unpack",
]
