"""The masks' pseudo-random generator: AES-256-CTR keyed by the whole 32-byte secret.

The seed (a self-mask seed b_u or a pairwise X25519 secret s_uv) goes whole into HKDF-SHA256
with a label naming its use, and the derived 256-bit key drives AES-256 in counter mode from a
zero counter. Every 4 bytes of keystream are one little-endian element of Z_(2^32), exactly
uniform when the keystream is. Different labels give independent streams from one seed.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEED_BYTES = 32
_CHUNK = 1 << 20  # ring elements per keystream block: 4 MiB of temporary memory
_ZEROS = bytes(4 * _CHUNK)


def _key(seed: bytes, label: bytes) -> bytes:
    if len(seed) != SEED_BYTES:
        raise ValueError(f"PRG seeds are the full {SEED_BYTES}-byte secret, got {len(seed)} bytes")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"deeprad.io/secagg/prg/v1\x00" + label).derive(seed)


class MaskStream:
    """A keystream of ring elements for one (seed, label); read it in order."""

    def __init__(self, seed: bytes, label: bytes) -> None:
        cipher = Cipher(algorithms.AES256(_key(seed, label)), modes.CTR(bytes(16)))
        self._enc = cipher.encryptor()

    def next(self, count: int) -> np.ndarray:
        """The next `count` elements of Z_(2^32) as uint32."""
        out = np.empty(count, dtype=np.uint32)
        raw = out.view(np.uint8)
        for start in range(0, 4 * count, 4 * _CHUNK):
            n = min(4 * _CHUNK, 4 * count - start)
            raw[start:start + n] = np.frombuffer(self._enc.update(_ZEROS[:n]), dtype=np.uint8)
        return out.view("<u4").astype(np.uint32, copy=False)


def prg(seed: bytes, label: bytes, count: int) -> np.ndarray:
    """`count` uniform elements of Z_(2^32) from `seed` (32 bytes) and `label`."""
    return MaskStream(seed, label).next(count)


def apply_mask(vector: np.ndarray, seed: bytes, label: bytes, sign: int) -> None:
    """vector += sign * PRG(seed, label) (mod 2^32), in place, a block at a time."""
    if vector.dtype != np.uint32 or vector.ndim != 1:
        raise ValueError("masks apply to a 1-D uint32 vector")
    if sign not in (1, -1):
        raise ValueError(f"mask sign must be +1 or -1, got {sign}")
    stream = MaskStream(seed, label)
    for start in range(0, vector.size, _CHUNK):
        block = vector[start:start + _CHUNK]
        mask = stream.next(block.size)
        if sign > 0:
            np.add(block, mask, out=block)
        else:
            np.subtract(block, mask, out=block)
