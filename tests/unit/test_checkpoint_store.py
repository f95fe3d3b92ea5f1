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


def test_redteam_manifest_model_swapped_under_a_valid_hub_signature(tmp_path: Path) -> None:
    """The hub signs (study, round, nonce, parent, payload digest); the model the weights belong
    to is inside the signed payload, so rewriting the manifest's model (here: the same network
    with other arguments) leaves the signature valid but is still refused."""
    from redteam import refused

    from deeprad.core.identity import Identity

    hub = Identity.generate("hub", role="hub")
    store = LocalStore(tmp_path)
    write_checkpoint(store, LAYOUT, {"study": "study", "round": 0, "producer": "test",
                                     "model": ModelSpec(), "parent_sha256": None}, W, hub=hub)
    read_checkpoint(store, LAYOUT, 0, hub.public())  # as written: accepted
    key = LAYOUT.global_manifest(0)
    manifest = store.get_text(key).replace('"kwargs": {}', '"kwargs": {"width": 64}')
    assert '"width": 64' in manifest
    store.put_text(key, manifest)
    with pytest.raises(CheckpointError, match="not the one the hub signed") as caught:
        read_checkpoint(store, LAYOUT, 0, hub.public())
    refused("checkpoint manifest names other model kwargs under the hub's signature",
            "checkpoint reader (model digest in the signed payload)", str(caught.value))


def test_redteam_checkpoint_carried_to_a_recreated_study(tmp_path: Path) -> None:
    """A study re-created under its old name (new uid) starting from the same seed writes the
    same weights, yet its checkpoints have other digests (the uid is inside the signed payload),
    so an update signed for the predecessor names a stale parent; and the predecessor's signed
    checkpoint copied under the new uid's keys is refused."""
    from redteam import refused

    from deeprad.core.identity import Identity

    hub = Identity.generate("hub", role="hub")
    store = LocalStore(tmp_path)
    old, new = StudyLayout("ns", "study", uid="uid-old"), StudyLayout("ns", "study", uid="uid-new")
    fields = {"study": "study", "round": 0, "producer": "test", "model": ModelSpec(),
              "parent_sha256": None}
    a = write_checkpoint(store, old, fields, W, hub=hub)
    b = write_checkpoint(store, new, fields, W, hub=hub)
    assert a.payload_sha256 != b.payload_sha256
    for suffix in ("global.safetensors", "global.json"):
        src, dst = f"{old.round_prefix(0)}/{suffix}", f"{new.round_prefix(0)}/{suffix}"
        (tmp_path / dst).write_bytes((tmp_path / src).read_bytes())
    with pytest.raises(CheckpointError, match="not uid-new") as caught:
        read_checkpoint(store, new, 0, hub.public())
    refused("predecessor's signed checkpoint copied under a re-created study's keys",
            "checkpoint reader (study uid in the signed payload)", str(caught.value))
