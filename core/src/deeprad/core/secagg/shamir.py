"""Shamir secret sharing of 32-byte keys over the prime field GF(2^521 - 1).

A 32-byte secret is one field element (2^256 < p), so a key is shared whole, never cut into
pieces. Share i is the random degree-(t-1) polynomial evaluated at x = i (1-based); any t shares
give the secret by Lagrange interpolation at 0, t-1 shares say nothing about it. `combine`
refuses fewer than t shares and, given more, checks that all of them lie on one polynomial, so a
corrupted share is detected instead of silently producing a wrong key.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from deeprad.core.secagg.errors import NotEnoughShares, ProtocolViolation

PRIME = (1 << 521) - 1  # a Mersenne prime
SECRET_BYTES = 32
_SHARE_BYTES = 66  # ceil(521 / 8)


@dataclass(frozen=True)
class Share:
    """The point (x, y) of a sharing polynomial; x is the holder's 1-based index."""

    x: int
    y: int

    def __post_init__(self) -> None:
        if not 1 <= self.x < PRIME or not 0 <= self.y < PRIME:
            raise ProtocolViolation(f"Shamir share out of range (x={self.x})")

    def to_bytes(self) -> bytes:
        """2-byte x then 66-byte y, big-endian."""
        return self.x.to_bytes(2, "big") + self.y.to_bytes(_SHARE_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if len(data) != 2 + _SHARE_BYTES:
            raise ProtocolViolation(f"a Shamir share is {2 + _SHARE_BYTES} bytes, got {len(data)}")
        return cls(int.from_bytes(data[:2], "big"), int.from_bytes(data[2:], "big"))


def _check_params(n: int, t: int) -> None:
    if not 1 <= t <= n:
        raise ValueError(f"Shamir threshold must be in [1, n={n}], got {t}")
    if n >= 1 << 16:
        raise ValueError(f"at most 65535 shares, got {n}")


def split(secret: bytes, n: int, t: int) -> list[Share]:
    """n shares of a 32-byte `secret`, any `t` of which recover it."""
    _check_params(n, t)
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"Shamir secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append(Share(x, y))
    return shares


def _interpolate_at(points: Sequence[Share], at: int) -> int:
    """Value at `at` of the polynomial through `points` (distinct x). The Lagrange terms are
    summed as one fraction, so a single modular inverse is needed."""
    num_total, den_total = 0, 1
    for i, pi in enumerate(points):
        num, den = pi.y, 1
        for j, pj in enumerate(points):
            if i != j:
                num = num * (at - pj.x) % PRIME
                den = den * (pi.x - pj.x) % PRIME
        num_total = (num_total * den + num * den_total) % PRIME
        den_total = den_total * den % PRIME
    return num_total * pow(den_total, -1, PRIME) % PRIME


def combine(shares: Sequence[Share], t: int) -> bytes:
    """The 32-byte secret from at least `t` shares with distinct x; every extra share must lie
    on the same polynomial (else ProtocolViolation: some share was corrupted)."""
    distinct: dict[int, Share] = {}
    for s in shares:
        if s.x in distinct and distinct[s.x].y != s.y:
            raise ProtocolViolation(f"two different Shamir shares for holder {s.x}")
        distinct[s.x] = s
    if len(distinct) < t:
        raise NotEnoughShares(f"{len(distinct)} Shamir share(s) given, the threshold is {t}: "
                              "the secret cannot be recovered")
    points = list(distinct.values())
    basis = points[:t]
    for extra in points[t:]:
        if _interpolate_at(basis, extra.x) != extra.y:
            raise ProtocolViolation(f"Shamir share of holder {extra.x} is inconsistent with the "
                                    "others: a share was corrupted")
    value = _interpolate_at(basis, 0)
    if value >= 1 << (8 * SECRET_BYTES):
        raise ProtocolViolation("Shamir shares do not combine to a 32-byte secret: corrupted")
    return value.to_bytes(SECRET_BYTES, "big")
