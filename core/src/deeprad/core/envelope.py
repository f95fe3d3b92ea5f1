"""Encrypted envelopes: how an update travels to the hub and rests in the object store.

ECIES-style public-key encryption to the hub's X25519 key (close to HPKE base mode): a fresh
ephemeral X25519 key per envelope, HKDF-SHA256 over the shared secret bound to both public keys,
then AES-256-GCM over fixed-size chunks (the STREAM construction: the nonce is the chunk counter
plus a last-chunk flag), so truncation, reordering and splicing fail authentication and large
payloads can be sealed and opened as streams. Every chunk's associated data is the header plus
the canonical (namespace, study, round, site), so an envelope moved to another site's slot or
round does not open.

Layout (all integers big-endian):

    magic "DRENV" | version u8 = 1 | suite u8 = 1 | chunk size u32 | ephemeral public key (32)
    then chunks: AES-GCM(chunk) with 16-byte tag; every chunk but the last is full size.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from deeprad.core.errors import UpdateRejected
from deeprad.core.identity import Identity, PublicIdentity
from deeprad.core.layout import check_name
from deeprad.core.signing import canonical_json

MAGIC = b"DRENV"
VERSION = 1
SUITE_X25519_HKDF_SHA256_AES256GCM = 1
DEFAULT_CHUNK = 1 << 20
_HEADER = struct.Struct(">5sBBI32s")
HEADER_SIZE = _HEADER.size
TAG_SIZE = 16
_MAX_CHUNKS = 1 << 88  # 11-byte counter


class EnvelopeError(UpdateRejected):
    """An envelope does not open: wrong key, wrong context, altered, truncated or malformed."""


@dataclass(frozen=True)
class EnvelopeContext:
    """What an envelope is for; bound into every chunk's associated data."""

    namespace: str
    study: str
    round: int
    site: str

    def __post_init__(self) -> None:
        check_name("namespace", self.namespace)
        check_name("study", self.study)
        check_name("site", self.site)
        if self.round < 0:
            raise ValueError(f"envelope round must be >= 0, got {self.round}")

    def to_bytes(self) -> bytes:
        return canonical_json({"namespace": self.namespace, "study": self.study,
                               "round": self.round, "site": self.site})


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _recipient_public(recipient: PublicIdentity | X25519PublicKey) -> X25519PublicKey:
    if isinstance(recipient, PublicIdentity):
        return recipient.key_agreement_public_key
    return recipient


def _recipient_private(recipient: Identity | X25519PrivateKey) -> X25519PrivateKey:
    if isinstance(recipient, Identity):
        return recipient.key_agreement_private_key
    return recipient


def _derive_key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    info = b"deeprad.io/envelope/v1\x00" + bytes([SUITE_X25519_HKDF_SHA256_AES256GCM])
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=info + ephemeral + recipient).derive(shared)


def _nonce(index: int, last: bool) -> bytes:
    if index >= _MAX_CHUNKS:
        raise ValueError("envelope has too many chunks")
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


class _Sealer:
    def __init__(self, recipient: PublicIdentity | X25519PublicKey, context: EnvelopeContext,
                 chunk_size: int) -> None:
        if not 1024 <= chunk_size <= (1 << 30):
            raise ValueError(f"envelope chunk size must be in [1 KiB, 1 GiB], got {chunk_size}")
        eph = X25519PrivateKey.generate()
        peer = _recipient_public(recipient)
        shared = eph.exchange(peer)
        self.header = _HEADER.pack(MAGIC, VERSION, SUITE_X25519_HKDF_SHA256_AES256GCM,
                                   chunk_size, _raw(eph.public_key()))
        self._aead = AESGCM(_derive_key(shared, _raw(eph.public_key()), _raw(peer)))
        self._aad = self.header + context.to_bytes()
        self.chunk_size = chunk_size

    def seal(self, index: int, chunk: bytes, last: bool) -> bytes:
        return self._aead.encrypt(_nonce(index, last), chunk, self._aad)


class _Opener:
    def __init__(self, recipient: Identity | X25519PrivateKey, context: EnvelopeContext,
                 header: bytes) -> None:
        self._site = context.site
        if len(header) < HEADER_SIZE:
            raise EnvelopeError(context.site, "envelope is shorter than its header")
        magic, version, suite, chunk_size, eph = _HEADER.unpack(header[:HEADER_SIZE])
        if magic != MAGIC:
            raise EnvelopeError(context.site, "not a Deep-Rad envelope (bad magic); a plaintext "
                                              "or foreign object was uploaded")
        if version != VERSION or suite != SUITE_X25519_HKDF_SHA256_AES256GCM:
            raise EnvelopeError(context.site, f"envelope version {version} suite {suite} is not "
                                              f"supported (expected {VERSION}/"
                                              f"{SUITE_X25519_HKDF_SHA256_AES256GCM})")
        if not 1024 <= chunk_size <= (1 << 30):
            raise EnvelopeError(context.site, f"envelope chunk size {chunk_size} is out of range")
        priv = _recipient_private(recipient)
        try:
            shared = priv.exchange(X25519PublicKey.from_public_bytes(eph))
        except ValueError:  # a low-order point gives an all-zero secret
            raise EnvelopeError(context.site, "envelope ephemeral key is invalid") from None
        self._aead = AESGCM(_derive_key(shared, eph, _raw(priv.public_key())))
        self._aad = header[:HEADER_SIZE] + context.to_bytes()
        self.chunk_size = chunk_size

    def open(self, index: int, chunk: bytes, last: bool) -> bytes:
        try:
            return self._aead.decrypt(_nonce(index, last), chunk, self._aad)
        except InvalidTag:
            raise EnvelopeError(
                self._site, f"envelope chunk {index} fails authentication: altered, truncated, "
                "for another study/round/site, or sealed to another key") from None


def seal(recipient: PublicIdentity | X25519PublicKey, context: EnvelopeContext,
         plaintext: bytes, chunk_size: int = DEFAULT_CHUNK) -> bytes:
    """Encrypt `plaintext` to `recipient` for `context`."""
    sealer = _Sealer(recipient, context, chunk_size)
    parts = [sealer.header]
    n = max(1, -(-len(plaintext) // chunk_size))
    view = memoryview(plaintext)
    for i in range(n):
        parts.append(sealer.seal(i, bytes(view[i * chunk_size:(i + 1) * chunk_size]), i == n - 1))
    return b"".join(parts)


def open_envelope(recipient: Identity | X25519PrivateKey, context: EnvelopeContext,
                  envelope: bytes) -> bytes:
    """Decrypt and authenticate `envelope`; raises EnvelopeError naming the site."""
    opener = _Opener(recipient, context, envelope[:HEADER_SIZE])
    body = memoryview(envelope)[HEADER_SIZE:]
    step = opener.chunk_size + TAG_SIZE
    n = max(1, -(-len(body) // step))
    if len(body) - (n - 1) * step < TAG_SIZE:
        raise EnvelopeError(context.site, "envelope is truncated")
    out = [opener.open(i, bytes(body[i * step:(i + 1) * step]), i == n - 1) for i in range(n)]
    return b"".join(out)


def sealed_size(plaintext_size: int, chunk_size: int = DEFAULT_CHUNK) -> int:
    """Bytes of the envelope for a plaintext of `plaintext_size` bytes."""
    n = max(1, -(-plaintext_size // chunk_size))
    return HEADER_SIZE + plaintext_size + n * TAG_SIZE


def _read_chunks(f: BinaryIO, size: int) -> Iterator[tuple[bytes, bool]]:
    """Chunks of `size` bytes with a flag marking the last (an empty stream yields one b'')."""
    current = f.read(size)
    while True:
        following = f.read(size) if len(current) == size else b""
        yield current, not following
        if not following:
            return
        current = following


def seal_file(recipient: PublicIdentity | X25519PublicKey, context: EnvelopeContext,
              src: Path, dst: Path, chunk_size: int = DEFAULT_CHUNK) -> None:
    """Stream-encrypt file `src` into `dst` (memory: two chunks)."""
    sealer = _Sealer(recipient, context, chunk_size)
    with Path(src).open("rb") as fin, Path(dst).open("wb") as fout:
        fout.write(sealer.header)
        for i, (chunk, last) in enumerate(_read_chunks(fin, chunk_size)):
            fout.write(sealer.seal(i, chunk, last))


def open_file(recipient: Identity | X25519PrivateKey, context: EnvelopeContext,
              src: Path, dst: Path) -> None:
    """Stream-decrypt envelope `src` into `dst`; `dst` appears only once every chunk, the last
    included, has authenticated (a partial plaintext is removed)."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.partial")
    try:
        with Path(src).open("rb") as fin, tmp.open("wb") as fout:
            opener = _Opener(recipient, context, fin.read(HEADER_SIZE))
            for i, (chunk, last) in enumerate(_read_chunks(fin, opener.chunk_size + TAG_SIZE)):
                if len(chunk) < TAG_SIZE:
                    raise EnvelopeError(context.site, "envelope is truncated")
                fout.write(opener.open(i, chunk, last))
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
