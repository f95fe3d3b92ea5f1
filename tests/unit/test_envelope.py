"""Encrypted envelopes: only the hub opens them, only for the study, round and site sealed."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from deeprad.core.envelope import (
    HEADER_SIZE,
    TAG_SIZE,
    EnvelopeContext,
    EnvelopeError,
    open_envelope,
    open_file,
    seal,
    seal_file,
    sealed_size,
)
from deeprad.core.errors import UpdateRejected
from deeprad.core.identity import Identity

CTX = EnvelopeContext(namespace="ns", study="lung", round=4, site="st-marys")
CHUNK = 4096


@pytest.fixture(scope="module")
def hub() -> Identity:
    return Identity.generate("hub", "hub")


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK, 5 * CHUNK + 17])
def test_round_trip_at_chunk_edges(hub: Identity, size: int) -> None:
    data = os.urandom(size)
    env = seal(hub.public(), CTX, data, chunk_size=CHUNK)
    assert len(env) == sealed_size(size, CHUNK)
    assert open_envelope(hub, CTX, env) == data


def test_large_update_round_trip_and_no_plaintext_at_rest(hub: Identity, tmp_path: Path) -> None:
    data = os.urandom(48 * 1024 * 1024)
    env = seal(hub.public(), CTX, data)
    assert len(env) == sealed_size(len(data))
    assert len(env) - len(data) < 1024  # 16 bytes per MiB and a 43-byte header
    assert data[1000:1064] not in env
    assert open_envelope(hub, CTX, env) == data
    src, sealed, opened = tmp_path / "u.bin", tmp_path / "u.env", tmp_path / "u.out"
    src.write_bytes(data)
    seal_file(hub.public(), CTX, src, sealed)
    assert sealed.stat().st_size == len(env)
    open_file(hub, CTX, sealed, opened)
    assert opened.read_bytes() == data
    # streamed and in-memory forms are the same format
    assert open_envelope(hub, CTX, sealed.read_bytes()) == data


def test_only_the_intended_recipient_and_context_open_it(hub: Identity) -> None:
    env = seal(hub.public(), CTX, b"weights" * 100, chunk_size=CHUNK)
    with pytest.raises(EnvelopeError, match="authentication"):
        open_envelope(Identity.generate("other-hub", "hub"), CTX, env)
    for other in (EnvelopeContext("ns", "lung", 5, "st-marys"),
                  EnvelopeContext("ns", "lung", 4, "st-johns"),
                  EnvelopeContext("ns", "brain", 4, "st-marys"),
                  EnvelopeContext("other", "lung", 4, "st-marys")):
        with pytest.raises(UpdateRejected, match="another study/round/site"):
            open_envelope(hub, other, env)


def test_every_flipped_byte_truncation_and_reordering_is_detected(hub: Identity) -> None:
    data = os.urandom(3 * CHUNK + 100)
    env = seal(hub.public(), CTX, data, chunk_size=CHUNK)
    rng = random.Random(3)
    positions = list(range(HEADER_SIZE + 2)) + rng.sample(range(len(env)), 200)
    for pos in positions:
        bad = bytearray(env)
        bad[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(EnvelopeError) as err:
            open_envelope(hub, CTX, bytes(bad))
        assert err.value.site == "st-marys"
    step = CHUNK + TAG_SIZE
    body = env[HEADER_SIZE:]
    chunks = [body[i:i + step] for i in range(0, len(body), step)]
    header = env[:HEADER_SIZE]
    tampered = {
        "dropped last chunk": header + b"".join(chunks[:-1]),
        "dropped middle chunk": header + chunks[0] + b"".join(chunks[2:]),
        "swapped chunks": header + chunks[1] + chunks[0] + b"".join(chunks[2:]),
        "cut mid-chunk": env[:-50],
        "trailing bytes": env + b"\x00" * 20,
        "header only": header,
        "empty": b"",
        "plaintext upload": data,
    }
    for name, blob in tampered.items():
        with pytest.raises(EnvelopeError):
            open_envelope(hub, CTX, blob)
        assert name


def test_streamed_open_leaves_no_partial_plaintext(hub: Identity, tmp_path: Path) -> None:
    data = os.urandom(4 * CHUNK)
    env = bytearray(seal(hub.public(), CTX, data, chunk_size=CHUNK))
    env[-1] ^= 0xFF  # the last chunk fails only after earlier ones were decrypted
    (tmp_path / "u.env").write_bytes(bytes(env))
    with pytest.raises(EnvelopeError, match="chunk 3"):
        open_file(hub, CTX, tmp_path / "u.env", tmp_path / "u.out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.env"]


def test_seal_is_randomised(hub: Identity) -> None:
    a = seal(hub.public(), CTX, b"same update")
    b = seal(hub.public(), CTX, b"same update")
    assert a != b and a[HEADER_SIZE - 32:HEADER_SIZE] != b[HEADER_SIZE - 32:HEADER_SIZE]
