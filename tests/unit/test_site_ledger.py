"""The site's own privacy ledger per dataset: reservations before a Job, reports after it,
the hospital's ε ceiling over every study and hub on a dataset (`policy.maxEpsilonPerDataset`).

Pure functions only (`core.site_policy`, `operator.site.ledger`, `operator.site.decide`); the
real agent against a real API server is in tests/integration/test_site_policy_agent.py.
"""

from __future__ import annotations

import inspect
from datetime import UTC, datetime
from typing import Any

import pytest
from redteam import refused

from deeprad.core.errors import ConfigError
from deeprad.core.identity import Identity
from deeprad.core.layout import StudyLayout
from deeprad.core.privacy import DPConfig, DPSteps, epsilon_of, round_steps
from deeprad.core.protocol import DatasetSpec, TrainConfig, TrainingTask
from deeprad.core.site_policy import (
    DATASET_LEDGER_ENV,
    LEDGER_ENV,
    RESERVATION_ENV,
    LedgerEntry,
    PrivacyCeiling,
    SitePolicy,
    compact,
    parse_entry,
    parse_ledger,
    parse_steps,
    planned_steps,
)
from deeprad.core.store.presigned import site_grants
from deeprad.operator.api.sitetask import SiteTaskSpec, SiteTaskStatus, TaskState
from deeprad.operator.site.config import AgentConfig, AllowedStore, TrainingPlacement
from deeprad.operator.site.decide import (
    CreateJob,
    JobView,
    RecordPrivacy,
    ReportTask,
    TaskView,
    decide_task,
)
from deeprad.operator.site.ledger import Ledger, ledger_key, read_ledger, with_entry

T0 = datetime(2030, 7, 8, 9, 0, tzinfo=UTC)
HUB = Identity.generate("hub", "hub").public()
UID = "uid-2a"
DELTA = 1e-5
EARLIER = DPSteps(noise_multiplier=1.1, sample_rate=0.05, steps=200)


def _spec(namespace: str = "research", study: str = "brain", **over: Any) -> dict[str, Any]:
    grants = site_grants(StudyLayout(namespace, study, "s-uid-1"), 2, "a",
                         secure_aggregation=False)
    spec: dict[str, Any] = {
        "roundRef": {"namespace": namespace, "name": f"{study}-r2", "uid": "u-2"},
        "study": study, "round": 2, "site": "a", "model": {"name": "tumor-cnn"},
        "training": {"localEpochs": 2, "batchSize": 16},
        "privacy": {"secureAggregation": False,
                    "differentialPrivacy": {"noiseMultiplier": 1.1, "maxGradNorm": 1.0}},
        "parentDigest": "1" * 64,
        "hub": {"name": "hub", "signingKey": HUB.signing_key,
                "keyAgreementKey": HUB.key_agreement_key},
        "objects": [{"key": k, "method": m, "url": f"https://s3.example/{k}?sig=x"}
                    for k, m in grants.items()],
        "deadline": "2030-07-08T10:00:00Z", "studyUid": "s-uid-1"}
    return {**spec, **over}


def _task(status: dict[str, Any] | None = None, uid: str = UID, **spec: Any) -> TaskView:
    return TaskView("brain-r2-a", uid, SiteTaskStatus.model_validate(status or {}),
                    SiteTaskSpec.model_validate(_spec(**spec)))


def _config(records: int | None = 1000, **policy: Any) -> AgentConfig:
    return AgentConfig(site="a", store=AllowedStore(endpoint="https://s3.example"),
                       training=TrainingPlacement(dataset_records=records),
                       policy=SitePolicy(**policy))


def _ledger(*entries: tuple[str, str, LedgerEntry]) -> Ledger:
    cm = None
    for namespace, study, entry in entries:
        cm = with_entry(cm, "deeprad-training", ledger_key(namespace, study), entry)
    return read_ledger(cm, "cm")


def _training(records_epochs: int = 2, val: float = 0.2) -> TrainingTask:
    return TrainingTask(namespace="research", study="brain", round=2, site="a",
                        dataset=DatasetSpec(val_fraction=val),
                        train=TrainConfig(local_epochs=records_epochs, batch_size=16),
                        registry_json="{}", privacy=DPConfig(noise_multiplier=1.1,
                                                             max_grad_norm=1.0))


def _env(create: CreateJob) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in
            create.manifest["spec"]["template"]["spec"]["containers"][0]["env"]}


def _stratified_training_count(negatives: int, positives: int, val: float) -> int:
    """What ImageSet.split keeps for training: per label, all but round(n * val)."""
    return sum(n - round(n * val) for n in (negatives, positives))


# ---- the plan: an upper bound of what the trainer can spend ---------------------------------


@pytest.mark.parametrize("val", [0.0, 0.25])
def test_ledger_planned_steps_bound_every_split_of_the_declared_records(val: float) -> None:
    task = _training(val=val)
    worst = epsilon_of([planned_steps(task, None)], DELTA)
    for records in (17, 1000):
        planned = epsilon_of([planned_steps(task, records)], DELTA)
        kept = {max(1, _stratified_training_count(records - positives, positives, val))
                for positives in range(records + 1)}  # every label balance
        batches = {-(-n // 16) for n in kept}
        for b in batches:
            real = epsilon_of([round_steps(16 * b, batch_size=16, local_epochs=2,
                                           noise_multiplier=1.1)], DELTA)
            assert real <= planned * (1 + 1e-9) <= worst * (1 + 1e-9), (records, b)


def test_ledger_a_run_of_unknown_size_is_planned_at_its_riskiest_batch_count() -> None:
    """Not one full batch (no amplification by sampling): two batches of two epochs cost more
    ε at noise 1.1, and more batches cost less."""
    worst = planned_steps(_training(), None)
    assert worst == DPSteps(noise_multiplier=1.1, sample_rate=0.5, steps=4)
    for batches in (1, 3, 5, 16, 64):
        run = DPSteps(noise_multiplier=1.1, sample_rate=1 / batches, steps=2 * batches)
        assert epsilon_of([run], DELTA) < epsilon_of([worst], DELTA), batches


def test_ledger_compacted_runs_compose_to_the_same_epsilon() -> None:
    other = DPSteps(noise_multiplier=0.9, sample_rate=0.1, steps=30)
    runs = [EARLIER, other, EARLIER, other, EARLIER]
    assert compact(runs) == [DPSteps(noise_multiplier=0.9, sample_rate=0.1, steps=60),
                             DPSteps(noise_multiplier=1.1, sample_rate=0.05, steps=600)]
    assert epsilon_of(compact(runs), DELTA) == pytest.approx(epsilon_of(runs, DELTA), rel=1e-9)


def test_ledger_entries_from_before_datasets_were_named_still_parse_and_count() -> None:
    old = '[{"round": 1, "steps": {"noise_multiplier": 1.1, "sample_rate": 0.05, ' \
          '"steps": 200}, "task": "t-0"}]'
    (entry,) = parse_ledger(old, "cm")
    assert (entry.dataset, entry.reserved) == (None, False)
    ledger = read_ledger({"data": {"research_brain": old}}, "cm")
    assert ledger.dataset("any-dataset") == [EARLIER]  # counted against every dataset
    with pytest.raises(ConfigError, match=r"^\$X: not a privacy ledger entry"):
        parse_entry('{"task": "t"}', "$X")
    with pytest.raises(ConfigError, match=r"^\$Y: not a list of DP-SGD runs"):
        parse_steps('{"steps": 1}', "$Y")


def test_ledger_dataset_is_named_by_the_hospital_or_its_data_source() -> None:
    assert AgentConfig(site="st-marys").dataset == "st-marys"
    claim = TrainingPlacement(data_claim="mri-2024")
    assert AgentConfig(site="st-marys", training=claim).dataset == "mri-2024"
    named = TrainingPlacement(data_claim="mri-2024", dataset_name="brain-mri")
    assert AgentConfig(site="st-marys", training=named).dataset == "brain-mri"
    with pytest.raises(ValueError, match=r"dataset_name|datasetName"):
        TrainingPlacement(dataset_name="Brain MRI/2024")


# ---- the agent: reserve, replace, keep ------------------------------------------------------


def test_ledger_decide_task_takes_no_default_ledger() -> None:
    param = inspect.signature(decide_task).parameters["ledger"]
    assert param.default is inspect.Parameter.empty
    with pytest.raises(TypeError):
        decide_task(_config(), _task(), None, T0)  # type: ignore[call-arg]


def test_ledger_a_dp_run_is_reserved_before_its_job_is_created() -> None:
    cfg = _config()
    actions = decide_task(cfg, _task(), None, T0, Ledger())
    assert [type(a) for a in actions] == [RecordPrivacy, CreateJob, ReportTask]
    record, create, _ = actions
    assert isinstance(record, RecordPrivacy) and isinstance(create, CreateJob)
    training = _training()
    assert record == RecordPrivacy("research_brain", LedgerEntry(
        task=UID, round=2, dataset="a", reserved=True, steps=planned_steps(training, 1000)))
    env = _env(create)
    assert parse_entry(env[RESERVATION_ENV], "env") == record.entry
    assert parse_ledger(env[LEDGER_ENV], "env") == [] and env[DATASET_LEDGER_ENV] == "[]"


def test_ledger_a_restarted_agent_neither_reserves_twice_nor_counts_its_own_reservation(
) -> None:
    """The pass wrote the reservation and stopped before the Job: the next pass creates the
    Job without a second write, and the reservation is not counted against its own run."""
    reservation = LedgerEntry(task=UID, round=2, dataset="a", reserved=True,
                              steps=planned_steps(_training(), 1000))
    ledger = _ledger(("research", "brain", reservation))
    ceiling = epsilon_of([reservation.steps], DELTA) * 1.01  # room for this one run only
    for policy in ({"max_epsilon_per_dataset": ceiling}, {"max_epsilon_per_study": ceiling}):
        actions = decide_task(_config(**policy), _task(), None, T0, ledger)
        assert [type(a) for a in actions] == [CreateJob, ReportTask], (policy, actions)
        create = actions[0]
        assert isinstance(create, CreateJob)
        assert parse_ledger(_env(create)[LEDGER_ENV], "env") == []  # not its own reservation


def _result_log(privacy: DPSteps | None) -> str:
    from deeprad.core.protocol import SiteResult

    return "training\n" + SiteResult(
        study="brain", round=2, site="a", num_samples=80, global_metrics=None,
        local_metrics=None, train_loss=0.3, update_sha256="4" * 64, duration_s=12.0,
        privacy=privacy).model_dump_json()


def test_ledger_a_success_replaces_the_reservation_with_the_trainers_report() -> None:
    reservation = LedgerEntry(task=UID, round=2, dataset="a", reserved=True,
                              steps=planned_steps(_training(), 1000))
    ledger = _ledger(("research", "brain", reservation))
    real = round_steps(812, batch_size=16, local_epochs=2, noise_multiplier=1.1)
    job = JobView("brain-r2-a", UID, succeeded=1, outcome="Complete", log=_result_log(real))
    record, done = decide_task(_config(), _task({"state": "Running"}), job, T0, ledger)
    assert isinstance(record, RecordPrivacy) and isinstance(done, ReportTask)
    assert record.entry == LedgerEntry(task=UID, round=2, dataset="a", steps=real)
    assert done.status.state == TaskState.SUCCEEDED
    after = read_ledger(with_entry({"data": {"research_brain": ledger_json_of(ledger)}},
                                   "t", record.key, record.entry), "cm")
    assert after.runs("research", "brain") == (record.entry,)  # replaced, not added
    # Reported already (an agent restarted before the report): nothing written again.
    (only,) = decide_task(_config(), _task({"state": "Running"}), job, T0, after)
    assert isinstance(only, ReportTask) and only.status.state == TaskState.SUCCEEDED


def ledger_json_of(ledger: Ledger) -> str:
    from deeprad.core.site_policy import ledger_json

    return ledger_json(ledger.runs("research", "brain"))


@pytest.mark.parametrize("outcome", ["Failed", "NoResult"])
def test_ledger_a_crashed_run_stays_spent_at_its_reservation(outcome: str) -> None:
    """A trainer that trained and then crashed (or printed no result) spent ε: the
    reservation stays; a Job started before reservations existed gets one now."""
    job = JobView("brain-r2-a", UID, failed=1, outcome="Failed", log="Traceback ...\nOOM") \
        if outcome == "Failed" else \
        JobView("brain-r2-a", UID, succeeded=1, outcome="Complete", log="no result")
    reservation = LedgerEntry(task=UID, round=2, dataset="a", reserved=True,
                              steps=planned_steps(_training(), 1000))
    reserved = _ledger(("research", "brain", reservation))
    (report,) = decide_task(_config(), _task({"state": "Running"}), job, T0, reserved)
    assert isinstance(report, ReportTask) and report.status.state == TaskState.FAILED
    record, report = decide_task(_config(), _task({"state": "Running"}), job, T0, Ledger())
    assert record == RecordPrivacy("research_brain", reservation)
    assert isinstance(report, ReportTask) and report.status.state == TaskState.FAILED


def test_ledger_a_trainer_refusal_over_the_dataset_ceiling_has_its_reason() -> None:
    log = "deeprad.trainer: PrivacyCeiling: policy.maxEpsilonPerDataset: study research/brain"
    job = JobView("brain-r2-a", UID, failed=1, outcome="Failed", log=log)
    *_, report = decide_task(_config(), _task({"state": "Running"}), job, T0, Ledger())
    assert isinstance(report, ReportTask) and report.status.reason == "PrivacyCeiling"


# ---- the hospital's ceiling over every study and hub on a dataset ---------------------------


def test_redteam_ledger_a_second_study_cannot_spend_the_dataset_past_its_ceiling() -> None:
    """Each study alone is within any per-study limit; together, on the same dataset, the
    second would pass the hospital's ceiling: it is refused and nothing is created."""
    training = _training()
    planned = planned_steps(training, 1000)
    # Study research/brain from this hub and a study of another hub's agent (same dataset, same
    # training namespace, another key) spent here; a third study ran on another dataset.
    ledger = _ledger(("research", "brain", LedgerEntry(task="t-1", round=1, dataset="a",
                                                         steps=EARLIER)),
                     ("oncology", "liver", LedgerEntry(task="t-2", round=4, dataset="a",
                                                        steps=EARLIER)),
                     ("research", "brain", LedgerEntry(task="t-3", round=1, dataset="ct",
                                                         steps=EARLIER)))
    before = epsilon_of([EARLIER, EARLIER], DELTA)
    after = epsilon_of([EARLIER, EARLIER, planned], DELTA)
    ceiling = (before + after) / 2
    cfg = _config(max_epsilon_per_dataset=ceiling)
    actions = decide_task(cfg, _task(study="lung"), None, T0, ledger)
    assert [type(a) for a in actions] == [ReportTask], actions  # no reservation, no Job
    (only,) = actions
    assert isinstance(only, ReportTask)
    status = only.status
    assert (status.state, status.reason) == (TaskState.FAILED, "PrivacyCeiling")
    text = status.message or ""
    assert text == (
        f"PrivacyCeiling: policy.maxEpsilonPerDataset: study research/lung round 2 would take "
        f"dataset a from ε={before:.4g} (2 recorded run(s) of every study and hub) to "
        f"ε={after:.4g} (δ=1e-05; {planned.steps} steps at sample rate "
        f"{planned.sample_rate:.4g}, noise multiplier 1.1: 1000 training records), this site "
        f"allows at most ε={ceiling:.4g} per dataset; raise the noise multiplier or lower "
        "localEpochs (study author), or raise policy.maxEpsilonPerDataset (hospital admin)")
    refused("a second study spending a dataset past the hospital's ceiling",
            "site agent (SiteTask PrivacyCeiling)", text)
    # The same task on another dataset, or under a higher ceiling, starts.
    elsewhere = AgentConfig(site="a", store=AllowedStore(endpoint="https://s3.example"),
                            training=TrainingPlacement(dataset_records=1000,
                                                       dataset_name="pet"),
                            policy=cfg.policy)
    assert CreateJob in [type(a) for a in decide_task(elsewhere, _task(study="lung"), None,
                                                      T0, ledger)]
    roomy = _config(max_epsilon_per_dataset=after * 1.01)
    assert CreateJob in [type(a) for a in decide_task(roomy, _task(study="lung"), None, T0,
                                                      ledger)]


def test_redteam_ledger_the_dataset_ceiling_needs_dp_and_plans_the_worst_case() -> None:
    cfg = _config(records=None, max_epsilon_per_dataset=4.0)
    (plain,) = decide_task(cfg, _task(privacy={"secureAggregation": False}), None, T0, Ledger())
    assert isinstance(plain, ReportTask) and plain.status.reason == "PolicyViolation"
    assert (plain.status.message or "").startswith(
        "PolicyViolation: policy.maxEpsilonPerDataset: study research/brain round 2 trains "
        "without differential privacy, this site caps ε per dataset at 4")
    # Without a record count a run is planned at its riskiest size (ε about 6 for two epochs
    # at noise 1.1), above 4: even the first run is refused, saying how to plan it exactly.
    (only,) = decide_task(cfg, _task(), None, T0, Ledger())
    assert isinstance(only, ReportTask) and only.status.reason == "PrivacyCeiling"
    text = only.status.message or ""
    assert "no record count known, planned at the riskiest batch count" in text
    assert text.endswith("or set training.datasetRecords so the plan uses the real record "
                         "count")
    refused("a run the site cannot size, at a site with a dataset ceiling",
            "site agent (SiteTask PrivacyCeiling)", text)


def test_redteam_ledger_a_run_may_not_spend_more_than_its_reservation() -> None:
    """A hospital that declared more records than the trainer finds (or a Job whose
    reservation was forged smaller): the trainer refuses before its first step."""
    task = _training()
    reservation = LedgerEntry(task=UID, round=2, dataset="a", reserved=True,
                              steps=planned_steps(task, 1000))
    policy = SitePolicy()
    policy.check_run(task, 799, spent=[], dataset_spent=[], reservation=reservation)
    with pytest.raises(PrivacyCeiling) as exc:
        policy.check_run(task, 100, spent=[], dataset_spent=[], reservation=reservation)
    text = str(exc.value)
    assert text.startswith("PrivacyCeiling: policy.maxEpsilonPerDataset: study research/brain "
                           "round 2 would spend ε=") and "on 100 training records" in text
    assert text.endswith("set training.datasetRecords to at most the dataset's real record "
                         "count, or unset it (hospital admin)")
    refused("a run spending more than the site reserved for it",
            "hospital trainer (before training)", text)
    # A dataset ceiling without any reservation: the Job was not made by the site's agent.
    with pytest.raises(PrivacyCeiling, match="without a reservation"):
        SitePolicy(max_epsilon_per_dataset=100).check_run(task, 799, spent=[],
                                                          dataset_spent=[], reservation=None)
