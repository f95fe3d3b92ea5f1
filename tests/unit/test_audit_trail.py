"""The audit trail on a local store: the trainer's record of each task, the aggregator's signed
round record vouching for it, and `deeprad audit` verifying the chain from the pinned hub key.
Attacks on the trail (a forged, rewritten or removed record) are refused by name."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from redteam import refused

from deeprad.aggregator.job import run_aggregation_task
from deeprad.cli import main
from deeprad.core.audit import HubRoundRecord, SiteTaskRecord, read_record
from deeprad.core.identity import Identity
from deeprad.core.manifests import read_manifest
from deeprad.core.privacy import DPSteps
from deeprad.core.protocol import RoundEpsilon, TrainingTask, UpdateManifest
from deeprad.core.signing import sign_message
from deeprad.core.site_policy import POLICY_ENV, TRAINER_IMAGE_ENV, parse_policy, policy_digest
from deeprad.core.store import ObjectStore
from deeprad.trainer.audit_record import site_record

IMAGE = "registry.example/deeprad-trainer@sha256:" + "ab" * 32
POLICY = "{}"  # the default site policy
ENV = {TRAINER_IMAGE_ENV: IMAGE, POLICY_ENV: POLICY}
DP = DPSteps(noise_multiplier=1.5, sample_rate=0.02, steps=100)
PRIVACY = RoundEpsilon(epsilon_round=1.5, epsilon_spent=1.5, delta=1e-5)
G = {"w": torch.tensor([1.0, 2.0]), "k": torch.ones(2, 2)}


def _delta(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([v, v]), "k": torch.zeros(2, 2)}


def _record(s: Any, site: str, update: UpdateManifest, signer: Identity | None = None,
            **over: Any) -> SiteTaskRecord:
    """The trainer's record of `site`'s task (altered by `over`, signed by `signer`)."""
    task = TrainingTask(namespace="ns", study="study", round=1, site=site,
                        registry_json=s.keys.registry.to_json())
    parent = read_manifest(s.store, s.layout, 0)
    record = site_record(s.layout, task, s.sites[site], parent, update, DP, environ=ENV)
    if over or signer is not None:
        record = record.model_copy(update=over)
        raw = sign_message(signer or s.sites[site], SiteTaskRecord.PURPOSE,
                           record.signed_bytes())
        record = record.model_copy(update={"signature": base64.b64encode(raw).decode()})
    s.store.put_bytes(s.layout.site_audit(1, site), record.to_bytes())
    return record


def _round(s: Any, **records: dict[str, Any]) -> None:
    """Sites a and b train (each record altered by `records[site]`), then the hub aggregates."""
    s.write_global(G)
    for site, v in (("a", 1.0), ("b", 3.0)):
        _record(s, site, s.put_update(site, _delta(v)), **records.get(site, {}))
    run_aggregation_task(s.task(created_by="alice", privacy=PRIVACY), s.store)


def _audit(s: Any, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    before = _snapshot(s.store)
    code = main(["audit", "study", "-n", "ns", "--store", str(s.store.root), *extra])
    out = capsys.readouterr()
    assert _snapshot(s.store) == before  # the audit only reads
    return code, out.out, out.err


def _snapshot(store: ObjectStore) -> dict[str, bytes]:
    return {k: store.get_bytes(k) for k in store.list("")}


def _hub_record(s: Any) -> HubRoundRecord:
    found = read_record(s.store, s.layout.hub_audit(1), HubRoundRecord)
    assert found is not None
    return found[0]


def test_every_task_leaves_a_record_the_hub_vouches_for(study: Any,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    _round(study)
    hub = _hub_record(study)
    assert hub.created_by == "alice" and hub.privacy == PRIVACY
    assert [(e.site, e.problem) for e in hub.sites] == [("a", None), ("b", None)]
    assert all(e.record_sha256 and e.update_sha256 for e in hub.sites)
    code, out, err = _audit(study, capsys)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[1:3]]
    policy = policy_digest(parse_policy(POLICY, "test"))
    for row, site in zip(rows, ("a", "b"), strict=True):
        assert row[:3] == ["1", site, "alice"]
        assert row[4] == IMAGE and policy.startswith(row[5].removesuffix("…"))
        assert row[-1] == "✓"
        assert float(row[6]) > 0  # ε of the task at the round's δ
    assert "2 of 2 records verified" in out


def test_a_round_in_progress_is_listed_not_failed(study: Any,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _round(study)
    study.store.put_text(study.layout.result(2, "a"), "{}")  # round 2 has begun
    code, out, _ = _audit(study, capsys)
    assert code == 0 and "round(s) 2 not aggregated yet" in out


@pytest.mark.parametrize("attack, site_change, problem", [
    ("site signs its audit record with another site's key", {"signer": "a"},
     "signature does not verify against the site's registered signing key"),
    ("site's audit record names another update than it sent",
     {"update_sha256": "9" * 64}, "names update 9999999999999999…, the round aggregated"),
])
def test_redteam_hub_does_not_vouch_for_a_forged_site_record(
        study: Any, capsys: pytest.CaptureFixture[str], attack: str,
        site_change: dict[str, Any], problem: str) -> None:
    over = dict(site_change)
    if "signer" in over:
        over["signer"] = study.sites[over["signer"]]
    _round(study, b=over)
    entry = next(e for e in _hub_record(study).sites if e.site == "b")
    assert entry.record_sha256 is None and problem in (entry.problem or "")  # not vouched
    code, out, err = _audit(study, capsys)
    assert code == 2
    assert f"{study.layout.site_audit(1, 'b')}: the hub could not vouch for it" in err, err
    assert "1 of 2 records verified" in out
    refused(attack, "aggregator (hub audit record) and `deeprad audit`", err)


def test_redteam_site_rewrites_its_record_after_aggregation(
        study: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """The site holds its key: it re-signs a record claiming another image, after the hub
    vouched for the original. The hub's record names the original's sha256."""
    _round(study)
    update = UpdateManifest.model_validate_json(
        study.store.get_bytes(study.layout.update_manifest(1, "a")))
    _record(study, "a", update, trainer_image="registry.example/innocent:latest")
    code, _, err = _audit(study, capsys)
    assert code == 2
    assert (f"{study.layout.site_audit(1, 'a')}: the record changed after the hub vouched "
            "for it") in err, err
    refused("site rewrites (and re-signs) its audit record after aggregation",
            "`deeprad audit` (sha256 in the hub's signed record)", err)


@pytest.mark.parametrize("attack, forge", [
    ("someone edits the hub's audit record (its creator)", "edit"),
    ("another hub signs a round record for the study", "resign"),
])
def test_redteam_forged_hub_record_is_refused(study: Any, capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path, attack: str, forge: str) -> None:
    _round(study)
    record = _hub_record(study).model_copy(update={"created_by": "mallory"})
    if forge == "resign":
        record = record.signed(Identity.generate("hub", role="hub"))
    study.store.put_bytes(study.layout.hub_audit(1), record.to_bytes())
    code, out, err = _audit(study, capsys)
    assert code == 2
    assert f"{study.layout.hub_audit(1)}: hub audit record of study ns/study, round 1: " \
           "signature does not verify against the pinned hub key" in err, err
    assert "mallory" not in out  # nothing from the forged record is shown as verified
    refused(attack, "`deeprad audit` (pinned hub key)", err)


def test_redteam_hub_record_removed_is_refused(study: Any,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    _round(study)
    study.store.delete(study.layout.hub_audit(1))
    code, _, err = _audit(study, capsys)
    assert code == 2
    assert f"{study.layout.hub_audit(1)}: the round was aggregated but the hub left no " \
           "audit record" in err, err
    refused("someone deletes a round's hub audit record", "`deeprad audit`", err)


def test_the_audit_needs_a_pinned_hub_key(study: Any, capsys: pytest.CaptureFixture[str],
                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    _round(study)
    code = main(["audit", "study", "-n", "ns", "--store", str(study.store.root),
                 "--hub-key", str(study.keys.site_dirs["a"])])
    assert code == 2 and "holds a site's keys (a), not the hub's" in capsys.readouterr().err
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "store"  # no keys/ beside it
    study.store.root.rename(elsewhere)
    code = main(["audit", "study", "-n", "ns", "--store", str(elsewhere)])
    assert code == 2
    assert "no hub key to verify the trail against" in capsys.readouterr().err
    code = main(["audit", "study", "-n", "ns", "--store", str(elsewhere),
                 "--hub-key", str(study.keys.hub_dir)])
    assert code == 0, capsys.readouterr().err


def test_several_studies_of_one_name_need_a_uid(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from deeprad.core.store.local import LocalStore

    store = LocalStore(tmp_path / "store")
    for uid in ("0a1b", "2c3d"):
        store.put_text(f"ns/study/{uid}/rounds/1/aggregate.json", json.dumps({}))
    Identity.generate("hub", role="hub").save(tmp_path / "hub")
    code = main(["audit", "study", "-n", "ns", "--store", str(store.root),
                 "--hub-key", str(tmp_path / "hub")])
    err = capsys.readouterr().err
    assert code == 2
    assert "holds 2 studies of that name (uids 0a1b, 2c3d)" in err and "pass --uid" in err


def test_redteam_rounds_removed_from_the_middle_of_the_trail() -> None:
    """Each aggregated round must continue the previous one: a round whose records were removed
    (it reads as 'not aggregated yet') before an aggregated one, or a parent that is not the
    previous round's checkpoint, fails the audit."""
    from deeprad.cli.audit import _chain_rows
    from deeprad.core.layout import StudyLayout

    layout = StudyLayout("ns", "study", uid="u1")
    r1 = HubRoundRecord.model_construct(round=1, parent_sha256="0" * 64,
                                        checkpoint_sha256="1" * 64)
    r2 = HubRoundRecord.model_construct(round=2, parent_sha256="1" * 64,
                                        checkpoint_sha256="2" * 64)
    r3 = HubRoundRecord.model_construct(round=3, parent_sha256="9" * 64,
                                        checkpoint_sha256="3" * 64)
    assert _chain_rows(layout, r2, r1, pending=[]) == []
    (hole,) = _chain_rows(layout, r3, r1, pending=[2])
    assert not hole.ok and "round(s) 2 before this aggregated round" in hole.problem
    (broken,) = _chain_rows(layout, r3, r2, pending=[])
    assert not broken.ok and "the chain of rounds is broken" in broken.problem
    refused("hub and aggregate records of a middle round removed", "deeprad audit (round chain)",
            str(hole.problem))
