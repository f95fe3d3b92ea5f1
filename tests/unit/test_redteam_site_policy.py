"""Red team: a study author (or a hostile hub) sends a hospital work its site policy forbids.

The hospital states in the site chart's `policy:` which studies may use it, which models (by
catalogue name or exact digest), how many local epochs, whether DP-SGD and secure aggregation
are required and the largest ε a study may spend on its data. Each attack below is refused
twice: by the site agent, which reports the SiteTask Failed with reason PolicyViolation and
creates no Job, and by the trainer, had a Job started anyway (an older agent, a hand-made Job),
which refuses before it reads a byte of the store, or — for the ε ceiling, which needs the real
record count — after opening the data but before its first training step, and uploads nothing.
The run of the real agent against a real API server is in
tests/integration/test_site_policy_agent.py.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from redteam import refused

from deeprad.core.errors import PolicyViolation
from deeprad.core.identity import Identity
from deeprad.core.layout import StudyLayout
from deeprad.core.model_catalogue import model_digest
from deeprad.core.models import build_model, model_weights
from deeprad.core.privacy import DPConfig, DPSteps, epsilon_of, round_steps
from deeprad.core.protocol import DatasetSpec, ModelSpec, SecAggSpec, TrainConfig, TrainingTask
from deeprad.core.site_policy import (
    DATASET_LEDGER_ENV,
    LEDGER_ENV,
    POLICY_ENV,
    RESERVATION_ENV,
    LedgerEntry,
    PrivacyCeiling,
    SitePolicy,
    entry_json,
    ledger_json,
    policy_json,
)
from deeprad.core.store.local import LocalStore
from deeprad.core.store.presigned import site_grants
from deeprad.operator.api.sitetask import SiteTaskSpec, SiteTaskStatus, TaskState
from deeprad.operator.site.config import AgentConfig, AllowedStore
from deeprad.operator.site.decide import ReportTask, TaskView, decide_task
from deeprad.operator.site.ledger import Ledger, ledger_key, read_ledger, with_entry
from deeprad.trainer import job as trainer_job

T0 = datetime(2030, 7, 8, 9, 0, tzinfo=UTC)
HUB = Identity.generate("hub", "hub").public()
APPROVED = model_digest("tumor-cnn", {})  # the one network this hospital reviewed
SMUGGLED = {"_target_": "subprocess.run", "args": ["sh", "-c", "cat /keys/signing.key"]}
DP = {"noiseMultiplier": 1.1, "maxGradNorm": 1.0}
# A 3-site round's secure aggregation (the SiteTask's view); threshold 3 is floor(2n/3)+1.
SECAGG: dict[str, Any] = {
    "roster": [{"name": n, "signingKey": HUB.signing_key, "keyAgreementKey": HUB.key_agreement_key}
               for n in ("a", "b", "c")],
    "threshold": 3, "clip": 1.0, "weightNormalizer": 100, "timeoutSeconds": 60}


# ---- the attacks ------------------------------------------------------------------------------


# (id, attack, the hospital's policy, what the hostile task changes, the rule that refuses it)
ATTACKS: list[tuple[str, str, dict[str, Any], dict[str, Any], str]] = [
    ("digest", "an unapproved model digest (other kwargs than the reviewed network)",
     {"models": [APPROVED]}, {"model": {"name": "tumor-cnn", "kwargs": {"channels": [64, 128]}}},
     "models"),
    ("target", "a MONAI-style _target_ smuggled in model kwargs to a digest-only site",
     {"models": [APPROVED]}, {"model": {"name": "tumor-cnn", "kwargs": SMUGGLED}}, "models"),
    ("namespace", "a study from a hub namespace the site does not allow",
     {"studies": ["oncology/*"]}, {}, "studies"),
    ("prefix", "a namespace that merely starts like an allowed one (research-x vs research)",
     {"studies": ["research/*"]}, {"namespace": "research-x"}, "studies"),
    ("study", "a study the site does not allow, from an allowed namespace",
     {"studies": ["research/lung"]}, {}, "studies"),
    ("epochs", "local epochs over the site's maximum",
     {"max_local_epochs": 2}, {"training": {"localEpochs": 50}}, "maxLocalEpochs"),
    ("no-dp", "a task without DP-SGD at a DP-required site",
     {"require_differential_privacy": True}, {"privacy": {"secureAggregation": False}},
     "requireDifferentialPrivacy"),
    # (DP-SGD with noise multiplier 0 no longer reaches the agent: a SiteTask's
    # noiseMultiplier must be > 0 in its schema; the policy's own check stays in
    # test_site_policy.py.)
    ("no-dp-ceiling", "a task without DP-SGD at a site with an ε ceiling",
     {"max_epsilon_per_study": 4}, {"privacy": {"secureAggregation": False}},
     "maxEpsilonPerStudy"),
    ("no-secagg", "a task without secure aggregation at a site that requires it",
     {"require_secure_aggregation": True}, {}, "requireSecureAggregation"),
    ("threshold", "a secure-aggregation threshold (2 of 3) the hub's side chose, below the "
     "site's malicious threat model", {"secure_aggregation_threat_model": "malicious"},
     {"privacy": {"secureAggregation": True, "differentialPrivacy": DP},
      "secureAggregation": SECAGG | {"threshold": 2}}, "secureAggregationThreatModel"),
]
IDS = [a[0] for a in ATTACKS]


def _spec(namespace: str = "research", **over: Any) -> dict[str, Any]:
    grants = site_grants(StudyLayout(namespace, "brain", "s-uid-1"), 2, "a",
                         secure_aggregation=False)
    spec: dict[str, Any] = {
        "roundRef": {"namespace": namespace, "name": "brain-r2", "uid": "u-2"},
        "study": "brain", "round": 2, "site": "a", "model": {"name": "tumor-cnn"},
        "training": {"localEpochs": 1, "batchSize": 16},
        "privacy": {"secureAggregation": False, "differentialPrivacy": DP},
        "parentDigest": "1" * 64,
        "hub": {"name": "hub", "signingKey": HUB.signing_key,
                "keyAgreementKey": HUB.key_agreement_key},
        "objects": [{"key": k, "method": m, "url": f"https://s3.example/{k}?sig=x"}
                    for k, m in grants.items()],
        "deadline": "2030-07-08T10:00:00Z", "studyUid": "s-uid-1"}
    return {**spec, **over}


def _task(**over: Any) -> TaskView:
    return TaskView("brain-r2-a", "uid-2a", SiteTaskStatus(),
                    SiteTaskSpec.model_validate(_spec(**over)))


def _config(policy: dict[str, Any]) -> AgentConfig:
    return AgentConfig(site="a", store=AllowedStore(endpoint="https://s3.example"),
                       policy=SitePolicy(**policy))


# ---- the site agent ---------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(ATTACKS)), ids=IDS)
def test_redteam_site_agent_refuses_work_its_policy_forbids(index: int) -> None:
    _, attack, policy, change, rule = ATTACKS[index]
    actions = decide_task(_config(policy), _task(**change), None, T0, Ledger())
    assert [type(a) for a in actions] == [ReportTask], actions  # no CreateJob: nothing runs
    (only,) = actions
    assert isinstance(only, ReportTask)
    status = only.status
    assert (status.state, status.reason) == (TaskState.FAILED, "PolicyViolation")
    text = status.message or ""
    assert text.startswith(f"PolicyViolation: policy.{rule}: study "), text
    assert "\n" not in text
    if index == 1:
        assert "_target_" in text and APPROVED[:19] in text  # names what was refused
    # The attack is what is refused: the same task without it starts a Job at this site.
    honest = decide_task(_config(policy), _task(**_honest(change, policy)), None, T0, Ledger())
    assert [type(a).__name__ for a in honest] == ["RecordPrivacy", "CreateJob", "ReportTask"], \
        honest  # the DP run is reserved in the site's ledger, then its Job created
    refused(attack, "site agent (SiteTask PolicyViolation)", text)


def _honest(change: dict[str, Any], policy: dict[str, Any]) -> dict[str, Any]:
    """A task this policy allows (the attack's fields undone)."""
    if "studies" in policy:
        ns, _, study = policy["studies"][0].partition("/")
        return {"namespace": ns, "study": "brain" if study == "*" else study,
                "roundRef": {"namespace": ns, "name": "brain-r2", "uid": "u-2"}}
    if "secure_aggregation_threat_model" in policy:
        return {"privacy": {"secureAggregation": True, "differentialPrivacy": DP},
                "secureAggregation": SECAGG}
    if policy.get("require_secure_aggregation"):
        return {"privacy": {"secureAggregation": True, "differentialPrivacy": DP},
                "secureAggregation": {
                    "roster": [{"name": n, "signingKey": HUB.signing_key,
                                "keyAgreementKey": HUB.key_agreement_key} for n in ("a", "b")],
                    "threshold": 2, "clip": 1.0, "weightNormalizer": 100,
                    "timeoutSeconds": 60}}
    return {}


def test_redteam_site_agent_holds_its_own_secure_aggregation_threat_model() -> None:
    """The round's threshold is chosen by the study author and sent by the hub, the party a
    malicious threat model guards against: a site that requires it refuses a semi-honest
    threshold, saying what was asked, what it allows and the fix; by default (semi-honest)
    the same task runs."""
    change = {"privacy": {"secureAggregation": True, "differentialPrivacy": DP},
              "secureAggregation": SECAGG | {"threshold": 2}}
    actions = decide_task(_config({"secure_aggregation_threat_model": "malicious"}),
                          _task(**change), None, T0, Ledger())
    assert [type(a) for a in actions] == [ReportTask], actions  # no reservation, no Job
    (only,) = actions
    assert isinstance(only, ReportTask)
    text = only.status.message or ""
    assert (only.status.state, only.status.reason) == (TaskState.FAILED, "PolicyViolation")
    assert text == (
        "PolicyViolation: policy.secureAggregationThreatModel: study research/brain round 2 "
        "uses secure aggregation with threshold t=2 of n=3 sites, this site's threat model "
        "malicious needs t >= 3 of 3; set privacy.secureAggregationThreatModel: malicious in "
        "the study (study author) or lower policy.secureAggregationThreatModel (hospital "
        "admin)")
    default = decide_task(_config({}), _task(**change), None, T0, Ledger())
    assert [type(a).__name__ for a in default] == ["RecordPrivacy", "CreateJob", "ReportTask"]
    refused("a semi-honest secure-aggregation threshold at a site requiring malicious",
            "site agent (SiteTask PolicyViolation)", text)


def test_redteam_site_agent_refuses_a_study_whose_epsilon_is_spent_here() -> None:
    """The hub says nothing about ε at this site: the agent's own ledger does."""
    run = DPSteps(noise_multiplier=0.8, sample_rate=0.25, steps=40)
    ceiling = epsilon_of([run], 1e-5)
    cm = with_entry(None, "deeprad-training", ledger_key("research", "brain"),
                    LedgerEntry(task="uid-1a", round=1, steps=run))
    actions = decide_task(_config({"max_epsilon_per_study": ceiling}), _task(), None, T0,
                          read_ledger(cm, "ledger"))
    assert [type(a) for a in actions] == [ReportTask], actions
    (only,) = actions
    assert isinstance(only, ReportTask)
    status = only.status
    assert (status.state, status.reason) == (TaskState.FAILED, "PolicyViolation")
    text = status.message or ""
    assert text.startswith(f"PolicyViolation: policy.maxEpsilonPerStudy: study research/brain "
                           f"round 2: the study already spent ε={ceiling:.4g} (δ=1e-05) on "
                           "this site's data in 1 run(s), this site allows at most "), text
    refused("ε over the per-study ceiling (the site's ledger says spent)",
            "site agent (SiteTask PolicyViolation)", text)


# ---- the trainer ------------------------------------------------------------------------------


class WatchedStore(LocalStore):
    """A local store that records every call: the proof that a refused trainer touched
    nothing (or, for the ε check, read the checkpoint and wrote nothing)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.calls: list[str] = []

    def put_bytes(self, key: str, data: bytes) -> None:
        self.calls.append(f"put {key}")
        super().put_bytes(key, data)

    def put_file(self, key: str, path: Path) -> None:
        self.calls.append(f"put {key}")
        super().put_file(key, path)

    def get_bytes(self, key: str) -> bytes:
        self.calls.append(f"get {key}")
        return super().get_bytes(key)

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        self.calls.append(f"get {key}")
        with super().local_copy(key) as path:
            yield path

    def exists(self, key: str) -> bool:
        self.calls.append(f"exists {key}")
        return super().exists(key)


def _training_task(study: Any, **over: Any) -> TrainingTask:
    fields: dict[str, Any] = {
        "namespace": "ns", "study": "study", "round": 1, "site": "st-marys",
        "dataset": DatasetSpec(options={"samples": 24}),
        "train": TrainConfig(local_epochs=1, batch_size=16),
        "registry_json": study.keys.registry.to_json(),
        "identity_dir": str(study.keys.site_dirs["st-marys"]),
        "privacy": DPConfig(noise_multiplier=1.1, max_grad_norm=1.0)}
    return TrainingTask(**{**fields, **over})


# What each attack looks like once the agent mapped it onto the trainer's task.
TRAINER_ATTACKS: list[tuple[str, str, SitePolicy, dict[str, Any], str]] = [
    ("digest", "an unapproved model digest", SitePolicy(models=[APPROVED]),
     {"model": ModelSpec(kwargs={"channels": [64, 128]})}, "models"),
    ("target", "a MONAI-style _target_ in model kwargs at a digest-only site",
     SitePolicy(models=[APPROVED]), {"model": ModelSpec(kwargs=SMUGGLED)}, "models"),
    ("namespace", "a study from a namespace the site does not allow",
     SitePolicy(studies=["oncology/*"]), {}, "studies"),
    ("epochs", "local epochs over the site's maximum", SitePolicy(max_local_epochs=2),
     {"train": TrainConfig(local_epochs=50)}, "maxLocalEpochs"),
    ("no-dp", "a task without DP-SGD at a DP-required site",
     SitePolicy(require_differential_privacy=True), {"privacy": None},
     "requireDifferentialPrivacy"),
    ("no-secagg", "a task without secure aggregation at a site that requires it",
     SitePolicy(require_secure_aggregation=True), {}, "requireSecureAggregation"),
    ("threshold", "a secure-aggregation threshold below the site's threat model (before the "
     "trainer advertises keys)", SitePolicy(secure_aggregation_threat_model="malicious"),
     {"secagg": SecAggSpec(roster=["a", "b", "st-marys"], threshold=2, weight_normalizer=100)},
     "secureAggregationThreatModel"),
]


@pytest.mark.parametrize("index", range(len(TRAINER_ATTACKS)),
                         ids=[a[0] for a in TRAINER_ATTACKS])
def test_redteam_trainer_refuses_before_touching_the_store(study: Any, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           index: int) -> None:
    _, attack, policy, change, rule = TRAINER_ATTACKS[index]
    store = WatchedStore(study.store.root)
    torch.manual_seed(0)
    study.write_global(model_weights(build_model(ModelSpec())))
    before = sorted(Path(store.root).rglob("*"))
    monkeypatch.setenv(POLICY_ENV, policy_json(policy))
    with pytest.raises(PolicyViolation) as exc:
        trainer_job.run_training_task(_training_task(study, **change), store)
    text = str(exc.value)
    assert text.startswith(f"PolicyViolation: policy.{rule}: study ns/study round 1"), text
    assert store.calls == []  # not one read, let alone a write
    assert sorted(Path(store.root).rglob("*")) == before
    refused(attack, "hospital trainer (before the store)", text)


def test_redteam_trainer_refuses_a_run_that_would_pass_the_epsilon_ceiling(
        study: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent cannot know the record count; the trainer does once the data is open, and
    refuses before its first step when this run would take the study past the ceiling."""
    store = WatchedStore(study.store.root)
    torch.manual_seed(0)
    study.write_global(model_weights(build_model(ModelSpec())))
    earlier = DPSteps(noise_multiplier=1.1, sample_rate=0.5, steps=2)
    planned = round_steps(19, batch_size=16, local_epochs=1, noise_multiplier=1.1)
    spent, after = epsilon_of([earlier], 1e-5), epsilon_of([earlier, planned], 1e-5)
    ceiling = (spent + after) / 2  # the earlier run fits, this one would not
    monkeypatch.setenv(POLICY_ENV, policy_json(SitePolicy(max_epsilon_per_study=ceiling)))
    monkeypatch.setenv(LEDGER_ENV, ledger_json([LedgerEntry(task="t0", round=1, steps=earlier)]))
    steps: list[str] = []
    monkeypatch.setattr(trainer_job, "train_site", lambda *a, **k: steps.append("trained"))
    with pytest.raises(PolicyViolation) as exc:
        trainer_job.run_training_task(_training_task(study), store)
    text = str(exc.value)
    assert text.startswith(
        f"PolicyViolation: policy.maxEpsilonPerStudy: study ns/study round 1 would raise the "
        f"study's ε on this site's data from {spent:.4g} to {after:.4g} (δ=1e-05; 19 records, "
        "batch 16, 1 local epochs, noise multiplier 1.1), this site allows at most "), text
    assert steps == []  # not one training step
    assert not any(c.startswith("put ") for c in store.calls), store.calls
    refused("ε over the per-study ceiling (the planned run, real record count)",
            "hospital trainer (before training)", text)


def test_redteam_ledger_trainer_refuses_a_run_beyond_its_reservation(
        study: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent reserved this run's ε in the site's ledger before the Job started (planned on
    the records the hospital declared); a run that would spend more — fewer records than
    declared, or a reservation rewritten smaller — is refused before its first step, so a
    crash can never leave the ledger below what was spent."""
    store = WatchedStore(study.store.root)
    torch.manual_seed(0)
    study.write_global(model_weights(build_model(ModelSpec())))
    # 19 training records at batch 16 is two batches; the reservation planned on 1000.
    small = DPSteps(noise_multiplier=1.1, sample_rate=1 / 63, steps=63)
    monkeypatch.setenv(POLICY_ENV, policy_json(SitePolicy(max_epsilon_per_dataset=50)))
    monkeypatch.setenv(RESERVATION_ENV, entry_json(LedgerEntry(
        task="t1", round=1, dataset="st-marys", reserved=True, steps=small)))
    monkeypatch.setenv(DATASET_LEDGER_ENV, "[]")
    steps: list[str] = []
    monkeypatch.setattr(trainer_job, "train_site", lambda *a, **k: steps.append("trained"))
    with pytest.raises(PrivacyCeiling) as exc:
        trainer_job.run_training_task(_training_task(study), store)
    text = str(exc.value)
    assert text.startswith("PrivacyCeiling: policy.maxEpsilonPerDataset: study ns/study round 1 "
                           "would spend ε=") and "on 19 training records" in text, text
    assert "more than the ε=" in text and "the site agent reserved for it" in text
    assert steps == []  # not one training step
    assert not any(c.startswith("put ") for c in store.calls), store.calls
    refused("a run spending more ε than the site reserved for it (real record count)",
            "hospital trainer (before training)", text)


def test_redteam_trainer_job_exits_2_naming_the_rule_and_writes_nothing(study: Any) -> None:
    """`python -m deeprad.trainer` as the agent's Job runs it, with the policy in its
    environment: exit 2, the one-line refusal, nothing in the store."""
    torch.manual_seed(0)
    study.write_global(model_weights(build_model(ModelSpec())))
    before = sorted(study.store.root.rglob("*"))
    task = _training_task(study, model=ModelSpec(kwargs=SMUGGLED))
    env = {**os.environ, POLICY_ENV: policy_json(SitePolicy(models=[APPROVED]))}
    proc = subprocess.run([sys.executable, "-m", "deeprad.trainer", "--store",
                           str(study.store.root), "--task", task.model_dump_json()],
                          capture_output=True, text=True, check=False, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("deeprad.trainer: PolicyViolation: policy.models: study ns/study "
                           "round 1 asks for model tumor-cnn with kwargs "), last
    assert sorted(study.store.root.rglob("*")) == before
    refused("a MONAI-style _target_ in model kwargs (the Job's entrypoint)",
            "hospital trainer Job (exit 2)", last)
