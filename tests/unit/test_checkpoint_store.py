"""Checkpoints round-trip through the local store; corruption and tampering are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deeprad.core.checkpoint import read_checkpoint, read_strategy_state, write_checkpoint
from deeprad.core.errors import CheckpointError, ConfigError, ObjectNotFound
from deeprad.core.layout import StudyLayout
from deeprad.core.protocol import ModelSpec, StrategySpec
from deeprad.core.store import open_store
from deeprad.core.store.local import LocalStore

LAYOUT = StudyLayout("ns", "study")
W = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([7])}


def _write(store: LocalStore, round_no: int = 0) -> None:
    write_checkpoint(store, LAYOUT, {"study": "study", "round": round_no, "producer": "test",
                                     "model": ModelSpec(), "parent_sha256": None,
                                     "strategy": StrategySpec(name="fedadam")},
                     W, strategy_state={"m/a": torch.ones(2, 3)})


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    _write(store)
    weights, manifest = read_checkpoint(store, LAYOUT, 0)
    assert set(weights) == {"a", "b"}
    torch.testing.assert_close(weights["a"], W["a"])
    assert weights["b"].dtype == torch.int64
    assert manifest.schema_version == 1 and manifest.round == 0
    assert len(manifest.payload_sha256) == 64
    state = read_strategy_state(store, LAYOUT, manifest)
    assert state is not None
    torch.testing.assert_close(state["m/a"], torch.ones(2, 3))


def test_layout_paths_are_the_documented_ones() -> None:
    assert LAYOUT.global_weights(3) == "ns/study/rounds/3/global.safetensors"
    assert LAYOUT.global_manifest(3) == "ns/study/rounds/3/global.json"
    assert LAYOUT.update_payload(3, "st-marys") == "ns/study/rounds/3/updates/st-marys.bin"
    assert LAYOUT.result(3, "st-marys") == "ns/study/rounds/3/results/st-marys.json"
    assert LAYOUT.aggregate(3) == "ns/study/rounds/3/aggregate.json"
    with pytest.raises(ConfigError, match="site name 'St Marys' must be a DNS-1123 label"):
        LAYOUT.update_payload(1, "St Marys")


def test_missing_checkpoint_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"round 4 missing: no file://.*/rounds/4/global.json"):
        read_checkpoint(LocalStore(tmp_path), LAYOUT, 4)


def test_flipped_byte_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    _write(store)
    path = tmp_path / LAYOUT.global_weights(0)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the manifest"):
        read_checkpoint(store, LAYOUT, 0)


def test_corrupt_manifest_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    _write(store)
    (tmp_path / LAYOUT.global_manifest(0)).write_text('{"kind": "checkpoint"')
    with pytest.raises(CheckpointError, match=r"manifest .* is corrupt"):
        read_checkpoint(store, LAYOUT, 0)


def test_payload_that_is_not_safetensors_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    _write(store)
    (tmp_path / LAYOUT.global_weights(0)).write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError):
        read_checkpoint(store, LAYOUT, 0)


def test_local_store_writes_are_atomic_and_listed(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    store.put_bytes("a/b/c.bin", b"1")
    store.put_bytes("a/b/c.bin", b"22")
    (tmp_path / "a" / "b" / ".c.bin.xyz.part").write_bytes(b"half")  # an interrupted writer
    assert store.get_bytes("a/b/c.bin") == b"22"
    assert store.list("a/") == ["a/b/c.bin"]
    assert store.exists("a/b/c.bin") and not store.exists("a/b/d.bin")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("a/b/d.bin")
    store.delete("a/b/c.bin")
    store.delete("a/b/c.bin")  # deleting twice is fine
    assert store.list("a/") == []


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/./b", ""])
def test_keys_cannot_escape_the_store(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError, match="clean relative path"):
        LocalStore(tmp_path).put_bytes(key, b"x")


def test_store_urls() -> None:
    with pytest.raises(ConfigError, match="unsupported scheme 'gs'"):
        open_store("gs://bucket")
    with pytest.raises(ConfigError, match="missing \\?endpoint"):
        open_store("s3://bucket")
