"""From float updates to the ring Z_(2^32) and back, plus the packed upload format.

Each coordinate is clipped to [-clip, clip], multiplied by `scale` and rounded to an integer
(stochastically by default: unbiased), then taken mod 2^32. `scale` is chosen so that the sum
of up to `max_sites` encoded vectors never leaves (-2^31, 2^31): the masked sum decodes by
reading it as a signed 32-bit integer and dividing by `scale`.

Error bound, per coordinate, for a sum over n <= max_sites sites:
    |decode(sum) - sum_u clip(x_u)| <= n * r / scale,   r = 1 (stochastic) or 1/2 (nearest),
plus float64 rounding (negligible). Values beyond `clip` are clipped first: that error is the
caller's choice of `clip`, not quantization. A packed upload is 4 bytes per value, the size of
the float32 update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.numpy import load as st_load_numpy
from safetensors.numpy import save as st_save_numpy

from deeprad.core.errors import ConfigError
from deeprad.core.secagg.errors import ProtocolViolation

RING_BITS = 32
_HALF = 1 << (RING_BITS - 1)
PACKED_TENSOR = "masked"


@dataclass(frozen=True)
class Quantizer:
    """Fixed-point encoding into Z_(2^32) that cannot overflow for up to `max_sites` sites."""

    clip: float
    max_sites: int
    stochastic: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"secure aggregation clip must be a positive number, got {self.clip}")
        if not 1 <= self.max_sites <= 1 << 20:
            raise ConfigError(f"secure aggregation max_sites must be in [1, 2^20], "
                              f"got {self.max_sites}")
        if self.scale < 1:
            raise ConfigError(f"clip {self.clip} with {self.max_sites} sites leaves no precision "
                              "in a 32-bit ring; lower the clip")

    @property
    def scale(self) -> float:
        # max_sites * (clip * scale + 1) <= 2^31 - 1: rounding may add one unit per site.
        return ((_HALF - 1) / self.max_sites - 1) / self.clip

    def error_bound(self, n_sites: int) -> float:
        """Worst-case absolute error per coordinate of a decoded sum of `n_sites` vectors."""
        return n_sites * (1.0 if self.stochastic else 0.5) / self.scale

    def encode(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Clip, scale, round and reduce a float vector to uint32 ring elements."""
        v = np.clip(np.asarray(x, dtype=np.float64).ravel(), -self.clip, self.clip)
        if not np.isfinite(v).all():
            raise ConfigError("cannot quantize an update holding NaN or Inf")
        v *= self.scale
        if self.stochastic:
            v += (rng or np.random.default_rng()).random(v.size)
            np.floor(v, out=v)
        else:
            np.rint(v, out=v)
        return v.astype(np.int64).astype(np.uint32)  # two's complement: mod 2^32

    def decode_sum(self, ring_sum: np.ndarray, n_sites: int) -> np.ndarray:
        """The float sum of `n_sites` encoded vectors from their sum in the ring."""
        if not 1 <= n_sites <= self.max_sites:
            raise ConfigError(f"decoding a sum of {n_sites} sites with a quantizer sized for "
                              f"{self.max_sites}")
        if ring_sum.dtype != np.uint32:
            raise ValueError("a ring sum is a uint32 vector")
        return (ring_sum.view(np.int32).astype(np.float64) / self.scale).astype(np.float32)


# ---- tensors <-> one flat vector ------------------------------------------------------------


@dataclass(frozen=True)
class VectorLayout:
    """Where each named tensor sits in the flat vector (names sorted)."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for _, shape in self.entries)

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> VectorLayout:
        bad = [k for k, v in tensors.items() if not v.is_floating_point()]
        if bad:
            raise ConfigError(f"secure aggregation sums floating-point tensors only; "
                              f"{bad[:3]} are not")
        return cls(tuple((k, tuple(tensors[k].shape)) for k in sorted(tensors)))


def flatten(tensors: Mapping[str, torch.Tensor]) -> tuple[np.ndarray, VectorLayout]:
    """All tensors as one float32 vector, in sorted-name order."""
    layout = VectorLayout.of(tensors)
    out = np.empty(layout.size, dtype=np.float32)
    pos = 0
    for name, shape in layout.entries:
        n = math.prod(shape)
        out[pos:pos + n] = tensors[name].detach().to("cpu", torch.float32).reshape(-1).numpy()
        pos += n
    return out, layout


def unflatten(vector: np.ndarray, layout: VectorLayout) -> dict[str, torch.Tensor]:
    """The inverse of `flatten`."""
    if vector.size != layout.size:
        raise ValueError(f"vector has {vector.size} values, the layout {layout.size}")
    out, pos = {}, 0
    for name, shape in layout.entries:
        n = math.prod(shape)
        out[name] = torch.from_numpy(np.array(vector[pos:pos + n], dtype=np.float32)).reshape(shape)
        pos += n
    return out


# ---- packed upload --------------------------------------------------------------------------


def pack(masked: np.ndarray) -> bytes:
    """A masked vector as safetensors (one U32 tensor): 4 bytes per value plus a tiny header."""
    if masked.dtype != np.uint32 or masked.ndim != 1:
        raise ValueError("pack takes a 1-D uint32 vector")
    return st_save_numpy({PACKED_TENSOR: masked})


def unpack(data: bytes, length: int) -> np.ndarray:
    """The masked vector from `pack`'s bytes; ProtocolViolation unless it is one U32 vector of
    `length` values."""
    try:
        tensors = st_load_numpy(data)
    except Exception as exc:  # safetensors raises its own error types
        raise ProtocolViolation(f"masked upload is not a safetensors file: {exc}") from None
    arr = tensors.get(PACKED_TENSOR)
    if set(tensors) != {PACKED_TENSOR} or arr is None or arr.dtype != np.uint32 \
            or arr.shape != (length,):
        raise ProtocolViolation(f"masked upload must hold one uint32 tensor {PACKED_TENSOR!r} of "
                                f"{length} values")
    return arr
