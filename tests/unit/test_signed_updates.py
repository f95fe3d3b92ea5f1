"""Forged, replayed, stale, unsigned and foreign updates are refused by the real aggregator Job
and recorded in aggregate.json; trainers refuse a global model the hub did not sign."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from deeprad.aggregator.job import run_aggregation_task
from deeprad.core.checkpoint import read_checkpoint
from deeprad.core.envelope import EnvelopeContext
from deeprad.core.errors import CheckpointError
from deeprad.core.identity import Identity
from deeprad.core.models import build_model, model_weights
from deeprad.core.protocol import DatasetSpec, ModelSpec, TrainConfig, TrainingTask
from deeprad.trainer.job import run_training_task

G = {"w": torch.tensor([1.0, 2.0])}


def delta(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([v, v])}


def only_good_counted(s: Any, round_no: int = 1) -> str:
    """Aggregate; assert that only 'good' counted; return the reason recorded for 'bad'."""
    report = run_aggregation_task(s.task(round=round_no), s.store)
    assert [c.site for c in report.contributors] == ["good"]
    saved = json.loads(s.store.get_text(s.layout.aggregate(round_no)))
    assert [r["site"] for r in saved["rejected"]] == ["bad"]
    weights, _ = read_checkpoint(s.store, s.layout, round_no, hub=s.hub.public())
    before, _ = read_checkpoint(s.store, s.layout, round_no - 1)
    torch.testing.assert_close(weights["w"], before["w"] + 2.0)
    return str(saved["rejected"][0]["reason"])


@pytest.fixture
def s(study: Any) -> Any:
    study.write_global(G)
    study.put_update("good", delta(2.0))
    return study


def test_tampered_envelope(s: Any) -> None:
    s.put_update("bad", delta(1.0))
    key = s.layout.update_payload(1, "bad")
    data = bytearray(s.store.get_bytes(key))
    data[-20] ^= 0x01
    s.store.put_bytes(key, bytes(data))
    assert "altered in transit or at rest" in only_good_counted(s)


def test_tampered_envelope_resigned_by_its_site_fails_authentication(s: Any) -> None:
    # Only the site could sign a new digest; even then AES-GCM refuses the altered bytes.
    m = s.put_update("bad", delta(1.0))
    key = s.layout.update_payload(1, "bad")
    data = bytearray(s.store.get_bytes(key))
    data[-20] ^= 0x01
    s.put_update("bad", delta(1.0), envelope=bytes(data), statement={"nonce": m.nonce})
    assert "fails authentication" in only_good_counted(s)


def test_unsigned_update(s: Any) -> None:
    s.put_update("bad", delta(1.0), sign=False)
    assert "unsigned" in only_good_counted(s)


def test_update_signed_with_another_key(s: Any) -> None:
    s.put_update("bad", delta(1.0), signer=Identity.generate("bad"))
    assert "signature does not verify" in only_good_counted(s)


def test_foreign_unregistered_site(s: Any) -> None:
    s.sites["bad"] = Identity.generate("bad")
    s.keys.registry.sites.pop("bad")  # no HospitalSite for it
    s.put_update("bad", delta(1.0))
    assert "not registered" in only_good_counted(s)


def test_update_copied_into_another_sites_slot(s: Any) -> None:
    # site a's genuine update (statement and envelope bound to a) dropped into bad's slot
    s.put_update("a", delta(1.0), slot="bad")
    assert "foreign update" in only_good_counted(s)


def test_envelope_sealed_for_another_site_does_not_open(s: Any) -> None:
    s.put_update("bad", delta(1.0), seal_as=EnvelopeContext("ns", "study", 1, "a"))
    assert "fails authentication" in only_good_counted(s)


def test_wrong_round(s: Any) -> None:
    s.put_update("bad", delta(1.0), statement={"round": 2}, slot="bad")
    assert "is for round 2, this is round 1" in only_good_counted(s)


def test_stale_parent(s: Any) -> None:
    s.put_update("bad", delta(1.0), statement={"parent_sha256": "a" * 64})
    assert "stale global model" in only_good_counted(s)


def test_replayed_nonce_in_a_later_round(s: Any) -> None:
    first = s.put_update("bad", delta(1.0))
    report = run_aggregation_task(s.task(), s.store)
    assert {c.site for c in report.contributors} == {"good", "bad"}
    s.put_update("good", delta(2.0), round_no=2)
    s.put_update("bad", delta(1.0), round_no=2, statement={"nonce": first.nonce})
    assert re.search("already used: a replayed update", only_good_counted(s, round_no=2))
    nonces = json.loads(s.store.get_text(s.layout.seen_nonces()))
    assert nonces[first.nonce] == 1


def test_resubmitted_round_one_update_in_round_two(s: Any) -> None:
    s.put_update("bad", delta(1.0))
    run_aggregation_task(s.task(), s.store)
    s.put_update("good", delta(2.0), round_no=2)
    for suffix in ("json", "bin"):  # the old signed update, byte for byte
        old = s.layout.updates_prefix(1) + f"bad.{suffix}"
        s.store.put_bytes(s.layout.updates_prefix(2) + f"bad.{suffix}", s.store.get_bytes(old))
    assert "is for round 1, this is round 2" in only_good_counted(s, round_no=2)


# ---- checkpoints --------------------------------------------------------------------------


def _trainer_task(s: Any) -> TrainingTask:
    return TrainingTask(namespace="ns", study="study", round=1, site="st-marys",
                        dataset=DatasetSpec(options={"samples": 24}),
                        train=TrainConfig(local_epochs=1),
                        registry_json=s.keys.registry.to_json(),
                        identity_dir=str(s.keys.site_dirs["st-marys"]))


@pytest.fixture
def model_study(study: Any) -> Any:
    torch.manual_seed(0)
    study.write_global(model_weights(build_model(ModelSpec())))
    return study


def test_trainer_uses_a_signed_checkpoint(model_study: Any) -> None:
    s = model_study
    result = run_training_task(_trainer_task(s), s.store)
    envelope = s.store.get_bytes(s.layout.update_payload(1, "st-marys"))
    assert envelope[:5] == b"DRENV" and result.num_samples == 19


@pytest.mark.parametrize("where", ["payload", "manifest"])
def test_trainer_refuses_a_checkpoint_with_one_flipped_byte(model_study: Any,
                                                            where: str) -> None:
    s = model_study
    path = Path(s.store.root) / (s.layout.global_weights(0) if where == "payload"
                                 else s.layout.global_manifest(0))
    data = bytearray(path.read_bytes())
    if where == "payload":
        data[len(data) // 2] ^= 0x01
    else:  # one hex digit of the signed payload digest
        i = data.index(b'"payload_sha256": "') + len(b'"payload_sha256": "')
        data[i] = ord("0") if data[i] != ord("0") else ord("1")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"does not match the manifest|signature does "
                                              r"not verify"):
        run_training_task(_trainer_task(s), s.store)
    assert not s.store.exists(s.layout.update_manifest(1, "st-marys"))


def test_trainer_refuses_a_checkpoint_signed_by_another_hub(model_study: Any) -> None:
    s = model_study
    from deeprad.core.checkpoint import write_checkpoint

    torch.manual_seed(1)
    write_checkpoint(s.store, s.layout, {"study": "study", "round": 0, "producer": "evil",
                                         "model": ModelSpec(), "parent_sha256": None},
                     model_weights(build_model(ModelSpec())), hub=Identity.generate("hub", "hub"))
    with pytest.raises(CheckpointError, match="signature does not verify against the hub"):
        run_training_task(_trainer_task(s), s.store)


def test_trainer_refuses_an_unsigned_checkpoint(model_study: Any) -> None:
    s = model_study
    from deeprad.core.checkpoint import write_checkpoint

    write_checkpoint(s.store, s.layout, {"study": "study", "round": 0, "producer": "t",
                                         "model": ModelSpec(), "parent_sha256": None},
                     model_weights(build_model(ModelSpec())))
    with pytest.raises(CheckpointError, match="is unsigned"):
        run_training_task(_trainer_task(s), s.store)


def test_swapped_strategy_state_is_refused(study: Any) -> None:
    study.write_global(G)
    study.put_update("a", delta(1.0))
    from deeprad.core.protocol import StrategySpec

    run_aggregation_task(study.task(strategy=StrategySpec(name="fedadam")), study.store)
    key = study.layout.global_manifest(1)
    manifest = json.loads(study.store.get_text(key))
    manifest["strategy_state_sha256"] = "0" * 64
    study.store.put_text(key, json.dumps(manifest))
    with pytest.raises(CheckpointError, match="strategy_state_sha256"):
        read_checkpoint(study.store, study.layout, 1, hub=study.hub.public())
