"""The S3 store backend against a real S3 server: the same checkpoints, updates and rounds as
the local store, through the minio SDK exactly as production uses MinIO."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from deeprad.aggregator.job import run_aggregation_task
from deeprad.core.checkpoint import (
    read_checkpoint,
    read_strategy_state,
    sha256_bytes,
    update_bytes,
    write_checkpoint,
    write_update,
)
from deeprad.core.envelope import EnvelopeContext, seal
from deeprad.core.errors import CheckpointError, ConfigError, ObjectNotFound, StoreError
from deeprad.core.identity import Identity
from deeprad.core.layout import StudyLayout
from deeprad.core.protocol import AggregationTask, ModelSpec, StrategySpec, UpdateManifest
from deeprad.core.signing import Statement, sign_statement
from deeprad.core.store import open_store
from deeprad.core.store.presigned import PresignedStore, site_grants
from deeprad.core.store.s3 import S3Store
from deeprad.devenv.s3_server import S3Server
from deeprad.simulate.keys import make_study_keys

LAYOUT = StudyLayout("hub", "s3-study")


@pytest.fixture
def s3_store(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Store]:
    bucket = f"deeprad-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(bucket)
    monkeypatch.setenv("DEEPRAD_S3_ACCESS_KEY", s3_server.root.access_key)
    monkeypatch.setenv("DEEPRAD_S3_SECRET_KEY", s3_server.root.secret_key)
    store = open_store(f"s3://{bucket}/studies?endpoint={s3_server.endpoint}&secure=false")
    assert isinstance(store, S3Store)
    yield store


def test_objects_round_trip(s3_store: S3Store) -> None:
    s3_store.put_bytes("a/b.bin", b"hello")
    assert s3_store.get_bytes("a/b.bin") == b"hello"
    assert s3_store.exists("a/b.bin") and not s3_store.exists("a/c.bin")
    assert s3_store.list("a/") == ["a/b.bin"]
    with s3_store.local_copy("a/b.bin") as path:
        assert path.read_bytes() == b"hello"
    with pytest.raises(ObjectNotFound):
        s3_store.get_bytes("a/missing.bin")
    s3_store.delete("a/b.bin")
    assert s3_store.list("a/") == []


def test_checkpoint_round_trip_and_tamper_detection(s3_store: S3Store) -> None:
    weights = {"w": torch.randn(64, 3), "steps": torch.tensor([5])}
    state = {"m/w": torch.ones(64, 3)}
    write_checkpoint(s3_store, LAYOUT, {"study": "s3-study", "round": 0, "producer": "test",
                                        "model": ModelSpec(), "parent_sha256": None,
                                        "strategy": StrategySpec(name="fedadam")},
                     weights, strategy_state=state)
    got, manifest = read_checkpoint(s3_store, LAYOUT, 0)
    torch.testing.assert_close(got["w"], weights["w"])
    assert torch.equal(got["steps"], weights["steps"])
    loaded_state = read_strategy_state(s3_store, LAYOUT, manifest)
    assert loaded_state is not None
    torch.testing.assert_close(loaded_state["m/w"], state["m/w"])
    # one flipped byte in the stored object is refused
    data = bytearray(s3_store.get_bytes(LAYOUT.global_weights(0)))
    data[-1] ^= 0x01
    s3_store.put_bytes(LAYOUT.global_weights(0), bytes(data))
    with pytest.raises(CheckpointError, match="does not match the manifest"):
        read_checkpoint(s3_store, LAYOUT, 0)


def test_a_round_aggregates_through_s3(s3_store: S3Store, tmp_path: Path) -> None:
    keys = make_study_keys(tmp_path / "keys", ["st-marys", "charite", "bad"])
    hub = Identity.load(keys.hub_dir)
    glob = {"w": torch.zeros(4)}
    parent = write_checkpoint(s3_store, LAYOUT, {"study": "s3-study", "round": 0,
                                                 "producer": "test", "model": ModelSpec(),
                                                 "parent_sha256": None}, glob, hub=hub)
    for site, value, n in (("st-marys", 1.0, 10), ("charite", 3.0, 30), ("bad", float("nan"), 5)):
        envelope = seal(hub.public(), EnvelopeContext("hub", "s3-study", 1, site),
                        update_bytes({"w": torch.full((4,), value)}, n))
        stmt = Statement(kind="update", namespace="hub", study="s3-study", round=1, site=site,
                         parent_sha256=parent.payload_sha256,
                         payload_sha256=sha256_bytes(envelope))
        write_update(s3_store, LAYOUT, UpdateManifest(
            namespace="hub", study="s3-study", round=1, site=site, nonce=stmt.nonce,
            parent_sha256=parent.payload_sha256, payload_sha256=stmt.payload_sha256,
            signature=sign_statement(Identity.load(keys.site_dirs[site]), stmt),
            num_samples=n, producer="test"), envelope)
    for strategy in ("fedavg", "fedmedian"):  # streamed and buffered reads of S3 temp copies
        s3_store.delete(LAYOUT.aggregate(1))
        s3_store.delete(LAYOUT.seen_nonces())  # the same updates, aggregated again
        report = run_aggregation_task(AggregationTask(
            namespace="hub", study="s3-study", round=1, strategy=StrategySpec(name=strategy),
            registry_json=keys.registry.to_json(), identity_dir=str(keys.hub_dir)), s3_store)
        assert [r.site for r in report.rejected] == ["bad"]
        weights, manifest = read_checkpoint(s3_store, LAYOUT, 1, hub=hub.public())
        expected = 2.5 if strategy == "fedavg" else 2.0  # (10*1 + 30*3)/40; median of 1 and 3
        torch.testing.assert_close(weights["w"], torch.full((4,), expected))
        assert sorted(c.site for c in manifest.contributors) == ["charite", "st-marys"]


def test_presigned_urls_reach_exactly_the_granted_objects(s3_store: S3Store,
                                                           tmp_path: Path) -> None:
    """What a hospital's trainer holds: URLs for its own objects, nothing else, until they
    expire; the store it builds from them reads and writes like any other."""
    s3_store.put_bytes(LAYOUT.global_manifest(0), b'{"hello": 1}')
    grants = site_grants(LAYOUT, 1, "st-marys", secure_aggregation=False)
    site = PresignedStore({k: s3_store.presign(k, m, timedelta(minutes=5))
                           for k, m in grants.items()}, s3_store.endpoint_url)
    assert site.get_bytes(LAYOUT.global_manifest(0)) == b'{"hello": 1}'
    assert site.size(LAYOUT.global_manifest(0)) == 12
    with pytest.raises(ObjectNotFound):
        site.get_bytes(LAYOUT.global_weights(0))
    big = tmp_path / "update.bin"
    big.write_bytes(b"x" * (3 * 2**20 + 7))
    site.put_file(LAYOUT.update_payload(1, "st-marys"), big)
    assert s3_store.size(LAYOUT.update_payload(1, "st-marys")) == 3 * 2**20 + 7
    site.put_text(LAYOUT.result(1, "st-marys"), "{}")
    with pytest.raises(StoreError), site.local_copy(LAYOUT.update_payload(1, "st-marys")):
        pass  # a PUT URL does not allow reading
    with pytest.raises(ConfigError, match="granted no URL"):
        site.put_bytes(LAYOUT.update_payload(1, "charite"), b"forged")
    with pytest.raises(StoreError, match="listing is not granted"):
        site.list(LAYOUT.root)
    # Editing a URL to reach another site's object breaks its signature.
    url = s3_store.presign(LAYOUT.result(1, "st-marys"), "PUT", timedelta(minutes=5))
    forged = PresignedStore({LAYOUT.result(1, "charite"): url.replace("st-marys", "charite")},
                            s3_store.endpoint_url)
    with pytest.raises(StoreError, match="refused"):
        forged.put_bytes(LAYOUT.result(1, "charite"), b"{}")
    assert not s3_store.exists(LAYOUT.result(1, "charite"))
    # Expired URLs are refused.
    short = PresignedStore({LAYOUT.global_manifest(0): s3_store.presign(
        LAYOUT.global_manifest(0), "GET", timedelta(seconds=1))}, s3_store.endpoint_url)
    time.sleep(2.5)
    with pytest.raises(StoreError, match="expired"):
        short.get_bytes(LAYOUT.global_manifest(0))
