"""The hub's privacy ledger (deeprad.core.privacy_ledger) and the study decisions built on it:
spent ε comes from the sites' signed facts, so no edit in the API lowers it, and the operator
calibrates the noise to the budget. Every test here is selected by `pytest -k ledger`."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from deeprad.core.audit import SiteTaskRecord, StudyRef
from deeprad.core.identity import Identity, KeyRegistry
from deeprad.core.layout import StudyLayout
from deeprad.core.model_catalogue import model_digest
from deeprad.core.privacy import (
    DPSteps,
    PrivacyBudget,
    PrivacyBudgetExceeded,
    calibrate_noise,
    epsilon_of,
    merge_runs,
    noise_for_target_epsilon,
)
from deeprad.core.privacy_ledger import (
    LedgerBudget,
    LedgerError,
    Reservation,
    entry_key,
    index_site_records,
    inherit,
    pin_budget,
    read_entries,
    read_reservations,
    runs,
    site_records,
)
from deeprad.core.store.local import LocalStore
from deeprad.operator.api.common import CheckpointRef
from deeprad.operator.api.federatedround import RoundState, SiteState
from deeprad.operator.api.federatedstudy import FederatedStudySpec, FederatedStudyStatus
from deeprad.operator.decide import study
from deeprad.operator.hub.privacy import LedgerReader
from tests.support.redteam import refused

pytestmark = pytest.mark.unit
logging.getLogger("absl").setLevel(logging.ERROR)

HUB = Identity.generate("hub", role="hub")
OTHER_HUB = Identity.generate("hub", role="hub")
SITES = {n: Identity.generate(n) for n in ("charite", "st-marys")}
REGISTRY = KeyRegistry.of([HUB.public(), *(s.public() for s in SITES.values())])
T0 = datetime(2030, 7, 7, 12, 0, tzinfo=UTC)
RUN = DPSteps(noise_multiplier=1.2, sample_rate=1 / 25, steps=25)
UID = "5f0c2a4e-1111-4f6e-9a51-0d2b7c9e0a11"
NEW_UID = "8e1d3b5f-2222-4a7e-8b62-1e3c8dae1b22"


def _record(store: LocalStore, ns: str, name: str, uid: str | None, round_no: int, site: str,
            steps: DPSteps | None = RUN) -> None:
    layout = StudyLayout(ns, name, uid)
    record = SiteTaskRecord(
        study=StudyRef.of(layout), round=round_no, site=site, model="tumor-cnn",
        model_digest=model_digest("tumor-cnn", {}), trainer_image=None, policy_digest=None,
        privacy=steps, num_samples=800, parent_sha256="1" * 64, update_sha256="2" * 64,
        max_grad_norm=1.5 if steps is not None else None,
        created_at=f"2030-01-0{round_no}T00:00:00Z").signed(SITES[site])
    store.put_bytes(layout.site_audit(round_no, site), record.to_bytes())


def _spec(**over: Any) -> FederatedStudySpec:
    return FederatedStudySpec.model_validate({
        "model": {"name": "tumor-cnn"}, "rounds": 4,
        "privacyBudget": {"epsilon": 4.0, "delta": 1e-5},
        "roundTemplate": {"minSites": 2, "training": {"localEpochs": 1, "batchSize": 32},
                          "privacy": {"differentialPrivacy": {"maxGradNorm": 1.0,
                                                              **over.pop("dp", {})}}},
        **over})


def _sites(*counts: int) -> list[study.Candidate]:
    return [study.Candidate(n, c, ("radiology",)) for n, c in zip(sorted(SITES), counts,
                                                                   strict=False)]


def _decide(spec: FederatedStudySpec, rounds: list[study.RoundView],
            facts: study.LedgerFacts | None, candidates: list[study.Candidate],
            status: FederatedStudyStatus | None = None, uid: str = UID
            ) -> study.StudyDecision:
    return study.decide_study("brain-mri", 1, spec, status or FederatedStudyStatus(), rounds,
                              candidates, T0, namespace="radiology", uid=uid, facts=facts)


def _trained(n: int, spec: FederatedStudySpec, z: float, **kw: Any) -> study.RoundView:
    dp = spec.round_template.privacy.differential_privacy
    assert dp is not None
    ckpt = CheckpointRef(uri=f"s3://b/radiology/brain-mri/{UID}/rounds/{n}/global.safetensors",
                         round=n)
    return study.RoundView(number=n, state=RoundState.SUCCEEDED,
                           output_checkpoint=ckpt, sites=dict.fromkeys(SITES, SiteState.REPORTED),
                           training=spec.round_template.training, data=spec.data,
                           dp=dp.model_copy(update={"noise_multiplier": z}), **kw)


# ---- the ledger in the store ------------------------------------------------------------------


def test_ledger_indexes_each_signed_site_record_once(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for site in SITES:
        _record(store, "radiology", "brain-mri", UID, 1, site)
    _record(store, "radiology", "brain-mri", UID, 2, "charite", steps=None)  # trained without DP
    assert index_site_records(store, "radiology", "brain-mri", HUB, REGISTRY) == 2
    assert index_site_records(store, "radiology", "brain-mri", HUB, REGISTRY) == 0  # idempotent
    entries = read_entries(store, "radiology", "brain-mri", HUB.public())
    assert sorted(e.site for e in entries) == sorted(SITES)
    assert all(e.site_signature_verified and e.steps == RUN and e.round == 1 for e in entries)
    assert all(e.max_grad_norm == 1.5 for e in entries)  # the clip the trainer signed
    assert all(e.study.uid == UID and e.ledger.uid is None for e in entries)


def test_ledger_keeps_an_unverifiable_record_marked_as_such(tmp_path: Path) -> None:
    """A site record that does not verify can only raise ε: it is accounted, and flagged."""
    store = LocalStore(tmp_path)
    _record(store, "radiology", "brain-mri", UID, 1, "charite")
    strangers = KeyRegistry.of([HUB.public(), Identity.generate("charite").public()])
    index_site_records(store, "radiology", "brain-mri", HUB, strangers)
    [entry] = read_entries(store, "radiology", "brain-mri", HUB.public())
    assert not entry.site_signature_verified and entry.steps == RUN


def test_redteam_ledger_entry_altered_to_lower_epsilon(tmp_path: Path) -> None:
    """Attack: edit a stored ledger entry (fewer steps) so the study may spend more."""
    store = LocalStore(tmp_path)
    _record(store, "radiology", "brain-mri", UID, 1, "charite")
    index_site_records(store, "radiology", "brain-mri", HUB, REGISTRY)
    [key] = store.list("radiology/brain-mri/privacy-ledger/")
    body = json.loads(store.get_bytes(key))
    body["steps"]["steps"] = 1
    store.put_bytes(key, json.dumps(body).encode())
    with pytest.raises(LedgerError, match="signature does not verify against the hub key") as e:
        read_entries(store, "radiology", "brain-mri", HUB.public())
    refused("ledger entry altered to lower ε", "operator (privacy ledger)", str(e.value))
    # and the study stops planning rounds, fail closed, instead of dropping the entry
    reader = LedgerReader(store, HUB.public())
    facts = reader.facts("radiology", "brain-mri", _spec(dp={"noiseMultiplier": 1.0}))
    d = _decide(_spec(dp={"noiseMultiplier": 1.0}), [], facts, _sites(1000, 1000))
    assert isinstance(d.action, study.Blocked) and d.action.reason == "PrivacyLedgerUnreadable"
    assert "no round starts until its ε can be accounted" in d.action.message


def test_redteam_ledger_entry_signed_by_another_hub_or_moved(tmp_path: Path) -> None:
    """Attack: write a ledger entry with another key, or move a valid entry to another
    study's ledger (where it would not count)."""
    store = LocalStore(tmp_path)
    _record(store, "radiology", "brain-mri", UID, 1, "charite")
    index_site_records(store, "radiology", "brain-mri", OTHER_HUB, REGISTRY)
    with pytest.raises(LedgerError, match="written by another hub") as e:
        read_entries(store, "radiology", "brain-mri", HUB.public())
    refused("ledger entry signed by another hub", "operator (privacy ledger)", str(e.value))
    store2 = LocalStore(tmp_path / "moved")
    _record(store2, "radiology", "brain-mri", UID, 1, "charite")
    index_site_records(store2, "radiology", "brain-mri", HUB, REGISTRY)
    [key] = store2.list("radiology/brain-mri/privacy-ledger/")
    store2.put_bytes(key.replace("brain-mri", "lung-ct", 1), store2.get_bytes(key))
    with pytest.raises(LedgerError, match="never moved between ledgers") as e:
        read_entries(store2, "radiology", "lung-ct", HUB.public())
    refused("ledger entry moved to another study", "operator (privacy ledger)", str(e.value))


def test_ledger_entry_keys_refuse_what_is_not_a_digest() -> None:
    with pytest.raises(LedgerError, match="not a sha256 hex digest"):
        entry_key("radiology", "brain-mri", "charite", "../../x")


# ---- bypasses: spent ε never decreases --------------------------------------------------------


def _history(store: LocalStore, spec: FederatedStudySpec, rounds: int, uid: str = UID,
             name: str = "brain-mri") -> None:
    for n in range(1, rounds + 1):
        for site in SITES:
            _record(store, "radiology", name, uid, n, site)
    index_site_records(store, "radiology", name, HUB, REGISTRY)


def test_ledger_deleting_rounds_leaves_spent_epsilon_unchanged(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    spec = _spec(dp={"noiseMultiplier": 1.2})
    _history(store, spec, 2)
    facts = LedgerReader(store, HUB.public()).facts("radiology", "brain-mri", spec)
    with_rounds = _decide(spec, [_trained(1, spec, 1.2), _trained(2, spec, 1.2)], facts,
                          _sites(1000, 1000))
    without = _decide(spec, [], facts, _sites(1000, 1000))
    expected = epsilon_of([RUN, RUN], 1e-5)
    assert with_rounds.status.epsilon_spent == pytest.approx(expected)
    assert without.status.epsilon_spent == pytest.approx(expected)
    # before the ledger, deleting the rounds reset ε to 0
    assert _decide(spec, [], None, _sites(1000, 1000)).status.epsilon_spent == 0.0


def test_ledger_raising_sample_count_leaves_spent_epsilon_unchanged(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    spec = _spec(dp={"noiseMultiplier": 1.2})
    _history(store, spec, 2)
    facts = LedgerReader(store, HUB.public()).facts("radiology", "brain-mri", spec)
    rounds = [_trained(1, spec, 1.2), _trained(2, spec, 1.2)]
    honest = _decide(spec, rounds, facts, _sites(1000, 1000)).status.epsilon_spent
    inflated = _decide(spec, rounds, facts, _sites(10**6, 10**6)).status.epsilon_spent
    assert honest is not None and inflated == honest


def test_ledger_recreating_the_study_keeps_its_predecessors_epsilon(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    spec = _spec(dp={"noiseMultiplier": 1.2})
    _history(store, spec, 3, uid=UID)
    facts = LedgerReader(store, HUB.public()).facts("radiology", "brain-mri", spec)
    reborn = _decide(spec, [], facts, _sites(1000, 1000), uid=NEW_UID)
    assert reborn.status.epsilon_spent == pytest.approx(epsilon_of([RUN] * 3, 1e-5))
    # and records of the predecessor not indexed yet count as well (read in place)
    _record(store, "radiology", "brain-mri", UID, 4, "charite")
    facts = LedgerReader(store, HUB.public()).facts("radiology", "brain-mri", spec)
    assert _decide(spec, [], facts, _sites(1000, 1000), uid=NEW_UID).status.epsilon_spent == \
        pytest.approx(epsilon_of([RUN] * 4, 1e-5))


def test_ledger_restarting_from_a_checkpoint_inherits_its_studys_epsilon(tmp_path: Path
                                                                         ) -> None:
    store = LocalStore(tmp_path)
    source = _spec(dp={"noiseMultiplier": 1.2})
    _history(store, source, 3, name="pilot")
    key = StudyLayout("radiology", "pilot", UID).global_weights(3)
    spec = _spec(dp={"noiseMultiplier": 1.2},
                 initialCheckpoint={"uri": store.uri(key), "round": 3})
    reader = LedgerReader(store, HUB.public())
    facts = reader.facts("radiology", "brain-mri", spec)
    assert facts.inherited_from == ("radiology/pilot",)
    d = _decide(spec, [], facts, _sites(1000, 1000))
    assert d.status.epsilon_spent == pytest.approx(epsilon_of([RUN] * 3, 1e-5))
    assert d.status.privacy is not None and d.status.privacy.inherited_from == ["radiology/pilot"]
    # the prepare Job copies the source's ledger, so it stays after the spec changes
    assert inherit(store, "radiology", "brain-mri", "radiology", "pilot", HUB) == 6
    assert inherit(store, "radiology", "brain-mri", "radiology", "pilot", HUB) == 0
    copied = read_entries(store, "radiology", "brain-mri", HUB.public())
    assert {e.source for e in copied} == {StudyRef(namespace="radiology", name="pilot")}
    plain = LedgerReader(store, HUB.public()).facts("radiology", "brain-mri",
                                                    _spec(dp={"noiseMultiplier": 1.2}))
    assert _decide(spec, [], plain, _sites(1000, 1000)).status.epsilon_spent == \
        pytest.approx(epsilon_of([RUN] * 3, 1e-5))


def test_ledger_counts_a_round_in_flight_until_its_sites_report(tmp_path: Path) -> None:
    """A round whose sites are training is reserved from its settings; once a site's record
    is in the store the fact replaces the reservation (never both)."""
    store = LocalStore(tmp_path)
    spec = _spec(dp={"noiseMultiplier": 1.2})
    training = study.RoundView(number=1, state=RoundState.TRAINING,
                               sites=dict.fromkeys(SITES, SiteState.TRAINING),
                               training=spec.round_template.training, data=spec.data,
                               dp=_trained(1, spec, 1.2).dp)
    reserved = study.dp_steps(study.train_records(1000, 0.2), spec.round_template.training, 1.2)
    facts = LedgerReader(store, HUB.public()).facts("radiology", "brain-mri", spec)
    d = _decide(spec, [training], facts, _sites(1000, 1000))
    assert d.status.epsilon_spent == pytest.approx(epsilon_of([reserved], 1e-5))
    _record(store, "radiology", "brain-mri", UID, 1, "charite")
    facts = LedgerReader(store, HUB.public()).facts("radiology", "brain-mri", spec)
    d = _decide(spec, [training], facts, _sites(1000, 1000))
    assert d.status.privacy is not None and d.status.privacy.sites is not None
    assert [s.runs for s in d.status.privacy.sites] == [1, 1]
    by_site = {s.site: s.epsilon_spent for s in d.status.privacy.sites}
    assert by_site["charite"] == pytest.approx(epsilon_of([RUN], 1e-5))
    assert by_site["st-marys"] == pytest.approx(epsilon_of([reserved], 1e-5))


def test_ledger_runs_count_one_per_site_record(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    _record(store, "radiology", "brain-mri", UID, 1, "charite")
    index_site_records(store, "radiology", "brain-mri", HUB, REGISTRY)
    entries = read_entries(store, "radiology", "brain-mri", HUB.public())
    facts = site_records(store, "radiology", "brain-mri")
    assert len(entries) == 1 and len(facts) == 1
    [run] = runs(entries, facts)  # the entry and the record it copies: one run
    assert (run.site, run.round, run.study_uid) == ("charite", 1, UID)


# ---- calibration ------------------------------------------------------------------------------


def test_ledger_calibrated_noise_spends_the_budget_over_the_planned_rounds() -> None:
    budget = PrivacyBudget(epsilon=4.0, delta=1e-5)
    shape = DPSteps(noise_multiplier=0, sample_rate=1 / 25, steps=25)
    z = calibrate_noise(budget, [], shape, 4)
    per_round = shape.model_copy(update={"noise_multiplier": z})
    assert epsilon_of([per_round] * 4, 1e-5) <= 4.0
    assert epsilon_of([per_round.model_copy(update={"noise_multiplier": z - 0.01})] * 4,
                      1e-5) > 4.0
    # the same answer as dp-accounting's calibration of the whole run
    assert z == pytest.approx(noise_for_target_epsilon(4.0, 1 / 25, 100, 1e-5), abs=2e-3)
    # with ε already spent, more noise is needed for the same rounds
    assert calibrate_noise(budget, [per_round], shape, 4) > z
    with pytest.raises(PrivacyBudgetExceeded, match="no noise leaves room"):
        calibrate_noise(budget, [per_round] * 5, shape, 1)


def test_ledger_study_calibrates_its_noise_and_keeps_the_plan(tmp_path: Path) -> None:
    spec = _spec()  # no noiseMultiplier: the operator chooses it
    facts = study.LedgerFacts()
    first = _decide(spec, [], facts, _sites(1000, 400))
    assert isinstance(first.action, study.CreateRound)
    z = first.action.noise_multiplier
    assert z is not None and z > 0
    privacy = first.status.privacy
    assert privacy is not None and privacy.calibrated and privacy.noise_multiplier == z
    # the plan spends at most the budget over spec.rounds at the smaller (costlier) site
    per_round = study.dp_steps(study.train_records(400, 0.2), spec.round_template.training, z)
    assert epsilon_of([per_round] * 4, 1e-5) <= 4.0
    # later passes keep the multiplier, whatever the sites declare afterwards
    rounds = [_trained(1, spec, z)]
    nxt = _decide(spec, rounds, facts, _sites(1000, 4000), status=first.status)
    assert isinstance(nxt.action, study.CreateRound) and nxt.action.noise_multiplier == z
    # and the round the study creates carries it
    from deeprad.operator.render.rounds import round_spec
    dp = round_spec("brain-mri", spec, first.action).privacy.differential_privacy
    assert dp is not None and dp.noise_multiplier == z and dp.delta == 1e-5


def test_ledger_study_stops_when_inherited_epsilon_leaves_no_room(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    heavy = DPSteps(noise_multiplier=0.5, sample_rate=0.5, steps=400)
    for site in SITES:
        _record(store, "radiology", "brain-mri", UID, 1, site, steps=heavy)
    facts = LedgerReader(store, HUB.public()).facts("radiology", "brain-mri", _spec())
    d = _decide(_spec(), [], facts, _sites(1000, 1000), uid=NEW_UID)
    assert isinstance(d.action, study.Stop) and d.action.reason == "PrivacyBudgetExhausted"
    assert "no noise leaves room" in d.action.message


# ---- `deeprad privacy ledger --study` ---------------------------------------------------------


def test_ledger_command_prints_and_verifies_a_studys_ledger(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deeprad.cli import main

    store = LocalStore(tmp_path / "store")
    _history(store, _spec(dp={"noiseMultiplier": 1.2}), 2)
    _record(store, "radiology", "brain-mri", UID, 3, "charite")  # not indexed yet
    HUB.save(tmp_path / "hub")
    args = ["privacy", "ledger", "--study", "brain-mri", "-n", "radiology",
            "--store", str(store.root), "--hub-key", str(tmp_path / "hub")]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    by_site = {s["site"]: s for s in report["sites"]}
    assert by_site["charite"]["entries"] == 2 and by_site["charite"]["not_indexed"] == 1
    assert by_site["charite"]["epsilon"] == pytest.approx(epsilon_of([RUN] * 3, 1e-5))
    assert report["epsilon"] == by_site["charite"]["epsilon"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "every entry verified against hub key hub" in text
    assert "1 site record(s) not indexed yet" in text and "study ε (the largest site's)" in text
    # an altered entry: exit 2, one line naming it
    [key, *_] = store.list("radiology/brain-mri/privacy-ledger/charite/")
    body = json.loads(store.get_bytes(key))
    body["steps"]["noise_multiplier"] = 50.0
    store.put_bytes(key, json.dumps(body).encode())
    assert main(args) == 2
    err = capsys.readouterr().err
    assert key in err and "does not verify against the hub key" in err
    assert main(["privacy", "ledger", "--study", "brain-mri", "--store", str(store.root)]) == 2
    assert "--study needs -n NAMESPACE" in capsys.readouterr().err


# ---- review findings: δ pinned, an unreadable ledger, rounds deleted mid-flight ---------------


def test_ledger_recreating_the_study_with_a_larger_delta_waits(tmp_path: Path) -> None:
    """Attack: delete the study and create it again with δ = 0.5, where the same runs show an ε
    of almost nothing, to get the budget back."""
    store = LocalStore(tmp_path)
    spec = _spec(dp={"noiseMultiplier": 1.2})
    _history(store, spec, 3)
    reader = LedgerReader(store, HUB.public())
    reader.pin("radiology", "brain-mri", UID, spec)
    honest = _decide(spec, [], reader.facts("radiology", "brain-mri", spec), _sites(1000, 1000))
    loose = _spec(dp={"noiseMultiplier": 1.2},
                  privacyBudget={"epsilon": 4.0, "delta": 0.5, "accountant": "pld"})
    reader.pin("radiology", "brain-mri", NEW_UID, loose)  # the first pin stays
    d = _decide(loose, [], reader.facts("radiology", "brain-mri", loose), _sites(1000, 1000),
                uid=NEW_UID)
    assert isinstance(d.action, study.Blocked) and d.action.reason == "PrivacyBudgetMismatch"
    assert "set spec.privacyBudget.delta to 1e-05 and accountant to rdp" in d.action.message
    refused("study re-created with a larger δ to lower its spent ε", "hub operator (ledger pin)",
            d.action.message)
    assert d.status.epsilon_spent == pytest.approx(honest.status.epsilon_spent)
    assert json.loads(store.get_bytes("radiology/brain-mri/privacy-ledger/budget.json"))[
        "delta"] == 1e-5


def test_ledger_unreadable_keeps_the_epsilon_shown(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    spec = _spec(dp={"noiseMultiplier": 1.2})
    _history(store, spec, 2)
    reader = LedgerReader(store, HUB.public())
    good = _decide(spec, [], reader.facts("radiology", "brain-mri", spec), _sites(1000, 1000))
    store.put_bytes("radiology/brain-mri/privacy-ledger/charite/" + "0" * 64 + ".json", b"junk")
    bad = _decide(spec, [], LedgerReader(store, HUB.public()).facts("radiology", "brain-mri",
                                                                    spec),
                  _sites(1000, 1000), status=good.status)
    assert isinstance(bad.action, study.Blocked)
    assert bad.status.epsilon_spent == good.status.epsilon_spent > 0
    assert bad.status.privacy is not None and bad.status.privacy.sites == \
        good.status.privacy.sites  # type: ignore[union-attr]
    assert "not a ledger entry" in (bad.status.privacy.problem or "")


def test_ledger_keeps_a_deleted_rounds_plan_when_a_site_never_signed(tmp_path: Path) -> None:
    """A site trained in round 1 and died before signing its record; the round is deleted (as
    a failure message once suggested). Its plan, stored while the round ran, still counts."""
    store = LocalStore(tmp_path)
    spec = _spec(dp={"noiseMultiplier": 1.2})
    dp = _trained(1, spec, 1.2).dp
    running = study.RoundView(number=1, state=RoundState.FAILED, uid="9a" * 4 + "-r1",
                              sites={"charite": SiteState.FAILED,
                                     "st-marys": SiteState.REPORTED},
                              training=spec.round_template.training, data=spec.data, dp=dp)
    _record(store, "radiology", "brain-mri", UID, 1, "st-marys")  # st-marys signed; charite not
    reader = LedgerReader(store, HUB.public())
    facts = reader.facts("radiology", "brain-mri", spec)
    todo = study.reservations_to_store("brain-mri", "radiology", UID, [running],
                                       _sites(1000, 1000), facts)
    assert [(r.round_uid, sorted(r.sites), r.settled) for r in todo] == [
        (running.uid, ["charite", "st-marys"], True)]
    reader.reserve(todo)
    assert read_reservations(store, "radiology", "brain-mri") == todo
    facts = reader.facts("radiology", "brain-mri", spec)
    assert study.reservations_to_store("brain-mri", "radiology", UID, [running],
                                       _sites(1000, 1000), facts) == []  # settled: written once
    with_round = _decide(spec, [running], facts, _sites(1000, 1000)).status
    deleted = _decide(spec, [], facts, _sites(1000, 1000)).status
    assert deleted.epsilon_spent == with_round.epsilon_spent
    planned = study.dp_steps(study.train_records(1000, 0.2), spec.round_template.training, 1.2)
    by_site = {s.site: s.epsilon_spent for s in deleted.privacy.sites}  # type: ignore[union-attr]
    assert by_site == {"charite": pytest.approx(epsilon_of([planned], 1e-5)),
                       "st-marys": pytest.approx(epsilon_of([RUN], 1e-5))}


def test_ledger_reservation_never_shrinks_while_its_round_runs(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    spec = _spec(dp={"noiseMultiplier": 1.2})
    dp = _trained(1, spec, 1.2).dp
    view = study.RoundView(number=1, state=RoundState.TRAINING, uid="5e" * 4 + "-r1",
                           sites={"charite": SiteState.TRAINING},
                           training=spec.round_template.training, data=spec.data, dp=dp)
    reader = LedgerReader(store, HUB.public())
    reader.reserve(study.reservations_to_store("brain-mri", "radiology", UID, [view],
                                               _sites(1000, 1000),
                                               reader.facts("radiology", "brain-mri", spec)))
    # the site now declares 100x the records (less ε per step): the stored plan stays
    again = study.reservations_to_store("brain-mri", "radiology", UID, [view],
                                        _sites(100000, 100000),
                                        reader.facts("radiology", "brain-mri", spec))
    assert again == []
    [held] = read_reservations(store, "radiology", "brain-mri")
    assert held.sites["charite"] == study.dp_steps(study.train_records(1000, 0.2),
                                                   spec.round_template.training, 1.2)
    assert isinstance(held, Reservation) and not held.settled


def test_ledger_pin_stays_with_the_first_budget(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    first = LedgerBudget(ledger=StudyRef(namespace="radiology", name="brain-mri"), delta=1e-5,
                         accountant="rdp", pinned_by=StudyRef(namespace="radiology",
                                                              name="brain-mri", uid=UID))
    assert pin_budget(store, first) == first
    later = first.model_copy(update={"delta": 0.1})
    assert pin_budget(store, later) == first


def test_ledger_merges_runs_of_one_plan_exactly() -> None:
    other = DPSteps(noise_multiplier=2.0, sample_rate=0.1, steps=5)
    assert merge_runs([RUN, other, RUN]) == [RUN.model_copy(update={"steps": 50}), other]
    assert epsilon_of([RUN] * 20, 1e-5) == pytest.approx(
        epsilon_of([RUN.model_copy(update={"steps": 500})], 1e-5))
