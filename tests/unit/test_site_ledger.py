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
from deeprad.core.privacy import DPConfig, DPSteps, epsilon_of, merge_runs, round_steps
from deeprad.core.protocol import DatasetSpec, TrainConfig, TrainingTask
from deeprad.core.site_policy import (
    DATASET_LEDGER_ENV,
    LEDGER_ENV,
    RESERVATION_ENV,
    WORST_CASE_BATCHES,
    LedgerEntry,
    PrivacyCeiling,
    SitePolicy,
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
    check_reservation,
    decide_task,
)
from deeprad.operator.site.ledger import (
    RECENT_REPORTS,
    Ledger,
    ledger_key,
    read_ledger,
    with_entry,
)

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
            run = round_steps(16 * b, batch_size=16, local_epochs=2, noise_multiplier=1.1)
            assert epsilon_of([run], DELTA) <= planned * (1 + 1e-9) <= worst * (1 + 1e-9), \
                (records, b)
            # ... and on the RDP curve at every order: the trainer accepts each such run.
            SitePolicy().check_reserved(task, planned_steps(task, records), run, 16 * b)


def test_ledger_a_run_of_unknown_size_is_planned_above_every_batch_count() -> None:
    """Without a record count the plan bounds the run at every batch count up to
    WORST_CASE_BATCHES, order by order: the trainer accepts each of them. The run of highest
    ε alone (two batches) is no such bound: a one-batch run has a smaller ε but a larger
    Rényi divergence at some order, so the trainer would refuse it."""
    task = _training()
    plan = planned_steps(task, None)
    policy = SitePolicy()
    for batches in range(1, WORST_CASE_BATCHES + 1):
        policy.check_reserved(task, plan, round_steps(16 * batches, batch_size=16,
                                                      local_epochs=2, noise_multiplier=1.1),
                              16 * batches)
    riskiest = DPSteps(noise_multiplier=1.1, sample_rate=0.5, steps=4)
    one_batch = DPSteps(noise_multiplier=1.1, sample_rate=1.0, steps=2)
    assert epsilon_of([one_batch], DELTA) < epsilon_of([riskiest], DELTA)
    with pytest.raises(PrivacyCeiling, match="Rényi divergence"):
        policy.check_reserved(task, riskiest, one_batch, 16)


def test_ledger_compacted_runs_compose_to_the_same_epsilon() -> None:
    other = DPSteps(noise_multiplier=0.9, sample_rate=0.1, steps=30)
    runs = [EARLIER, other, EARLIER, other, EARLIER]
    assert merge_runs(runs) == [DPSteps(noise_multiplier=0.9, sample_rate=0.1, steps=60),
                             DPSteps(noise_multiplier=1.1, sample_rate=0.05, steps=600)]
    assert epsilon_of(merge_runs(runs), DELTA) == pytest.approx(epsilon_of(runs, DELTA), rel=1e-9)


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
        task=UID, round=2, dataset="a", reserved=True, steps=planned_steps(training, 1000)),
        _task())  # the task, so the write checks the reservation again
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
    # Without a record count a run is planned above every batch count up to 16 (ε about 13
    # for two epochs at noise 1.1), above 4: even the first run is refused, saying how to plan
    # it exactly.
    (only,) = decide_task(cfg, _task(), None, T0, Ledger())
    assert isinstance(only, ReportTask) and only.status.reason == "PrivacyCeiling"
    text = only.status.message or ""
    assert "no record count known, planned above every batch count up to 16" in text
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


# ---- concurrent reservations: the check and the write are one step --------------------------


def test_redteam_ledger_two_tasks_cannot_together_pass_the_dataset_ceiling() -> None:
    """Two studies' tasks, each alone under the hospital's ceiling, together above it. Decided
    in one pass, the second sees the first's reservation (`Ledger.recorded`, what the agent
    decides the next task on) and is refused; decided on a stale read (another hub's agent
    reserved in between), its reservation is refused on the fresh ledger the write is based
    on (`check_reservation`), so the agent writes nothing and creates no Job."""
    one = planned_steps(_training(), 1000)
    ceiling = (epsilon_of([one], DELTA) + epsilon_of([one, one], DELTA)) / 2
    cfg = _config(max_epsilon_per_dataset=ceiling)
    first = decide_task(cfg, _task(study="lung", uid="uid-lung"), None, T0, Ledger())
    assert [type(a) for a in first] == [RecordPrivacy, CreateJob, ReportTask]
    record = first[0]
    assert isinstance(record, RecordPrivacy)
    assert check_reservation(cfg, record, Ledger(), T0) is None  # it fits: written
    after_first = Ledger().recorded(record.key, record.entry)
    assert after_first.dataset("a") == [one]
    # The same pass: the second task is decided on the ledger the first one wrote.
    (same_pass,) = decide_task(cfg, _task(), None, T0, after_first)
    assert isinstance(same_pass, ReportTask)
    assert (same_pass.status.state, same_pass.status.reason) == (TaskState.FAILED,
                                                                 "PrivacyCeiling")
    assert "(1 recorded run(s) of every study and hub)" in (same_pass.status.message or "")
    # A stale read: decided as if the first did not exist, refused when it is written.
    stale = decide_task(cfg, _task(), None, T0, Ledger())
    assert [type(a) for a in stale] == [RecordPrivacy, CreateJob, ReportTask]
    late = stale[0]
    assert isinstance(late, RecordPrivacy) and late.task is not None
    refusal = check_reservation(cfg, late, after_first, T0)
    assert refusal is not None and refusal.name == "brain-r2-a"
    text = refusal.status.message or ""
    assert (refusal.status.state, refusal.status.reason) == (TaskState.FAILED,
                                                             "PrivacyCeiling")
    assert text == same_pass.status.message and "\n" not in text
    assert text.startswith("PrivacyCeiling: policy.maxEpsilonPerDataset: study research/brain "
                           "round 2 would take dataset a from ε=")
    refused("two tasks reserving concurrently past the dataset ceiling",
            "site agent (fresh ledger at the write: no reservation, no Job)", text)
    # The per-study ceiling, reached by a run of the same study recorded in between.
    study_cap = _config(max_epsilon_per_study=epsilon_of([one], DELTA))
    (own,) = [a for a in decide_task(study_cap, _task(), None, T0, Ledger())
              if isinstance(a, RecordPrivacy)]
    other = Ledger().recorded("research_brain", LedgerEntry(task="t-9", round=1, steps=one))
    refusal = check_reservation(study_cap, own, other, T0)
    assert refusal is not None and refusal.status.reason == "PolicyViolation"
    assert (refusal.status.message or "").startswith("PolicyViolation: policy."
                                                     "maxEpsilonPerStudy: ")
    # A report is a fact, not a plan: it is never refused.
    report = RecordPrivacy(record.key, record.entry.model_copy(update={"reserved": False}))
    assert check_reservation(cfg, report, after_first, T0) is None


# ---- a DP run is never retried inside its Job -----------------------------------------------


def test_ledger_a_dp_trainer_job_is_never_retried() -> None:
    """One reservation is one run's ε: a DP task's Job has backoffLimit 0 and no rule that
    ignores an evicted pod (either would train again under the same reservation); a task
    without DP keeps one retry and survives a node drain."""
    (_, dp_create, _) = decide_task(_config(), _task(), None, T0, Ledger())
    (plain_create, _) = decide_task(_config(), _task(privacy={"secureAggregation": False}),
                                    None, T0, Ledger())
    assert isinstance(dp_create, CreateJob) and isinstance(plain_create, CreateJob)
    dp, plain = dp_create.manifest["spec"], plain_create.manifest["spec"]
    assert dp["backoffLimit"] == 0
    # A store outage's exit code is counted against backoffLimit 0: no second run either.
    assert [r["action"] for r in dp["podFailurePolicy"]["rules"]] == ["FailJob", "Count"]
    assert plain["backoffLimit"] == 1
    assert [r["action"] for r in plain["podFailurePolicy"]["rules"]] == ["FailJob", "Count",
                                                                         "Ignore"]


# ---- the reservation bounds the run at every order ------------------------------------------


def test_redteam_ledger_a_run_below_its_reservation_alone_but_above_it_composed_is_refused(
) -> None:
    """One full batch (no sampling) has a smaller ε alone than the two-batch run reserved for
    it, yet a larger one once composed with the dataset's other runs: its RDP curve crosses
    the reservation's. Were it accepted and then crashed, the reservation left in the ledger
    would count less than was spent. The trainer compares the curves order by order."""
    task = _training(records_epochs=1)
    reserved = DPSteps(noise_multiplier=1.1, sample_rate=0.5, steps=2)
    run = DPSteps(noise_multiplier=1.1, sample_rate=1.0, steps=1)
    history = DPSteps(noise_multiplier=1.0, sample_rate=0.01, steps=20000)
    assert epsilon_of([run], DELTA) < epsilon_of([reserved], DELTA)
    assert epsilon_of([history, run], DELTA) > epsilon_of([history, reserved], DELTA)
    with pytest.raises(PrivacyCeiling) as exc:
        SitePolicy().check_reserved(task, reserved, run, 16)
    text = str(exc.value)
    assert text.startswith("PrivacyCeiling: policy.maxEpsilonPerDataset: study research/brain "
                           "round 2 would spend ε=")
    assert "Rényi divergence" in text and "at any order of the RDP accountant" in text
    refused("a run whose ε alone fits its reservation but not once composed",
            "hospital trainer (before training)", text)
    SitePolicy().check_reserved(task, reserved, reserved, 32)  # the reserved run itself fits


# ---- compaction: a bounded ConfigMap with the same ε -----------------------------------------


def test_ledger_ten_thousand_runs_stay_small_and_compose_to_the_same_epsilon() -> None:
    """10 studies × 1000 rounds, on two datasets and two DP-SGD settings, each reserved and
    then reported as the agent writes them: the ConfigMap stays far below its 1 MiB limit and
    every dataset's (and study's) ε is that of all 10k runs."""
    cm = None
    runs: dict[str, list[DPSteps]] = {"a": [], "ct": []}
    by_study: dict[str, list[DPSteps]] = {}
    settings = [DPSteps(noise_multiplier=1.1, sample_rate=0.02, steps=102),
                DPSteps(noise_multiplier=2.0, sample_rate=0.05, steps=40)]
    for round_no in range(1, 1001):
        for s in range(10):
            key, dataset = f"research_s{s}", ("a", "ct")[s % 2]
            steps = settings[(round_no + s) % 2]
            uid = f"uid-{s}-{round_no}"
            reservation = LedgerEntry(task=uid, round=round_no, dataset=dataset,
                                      reserved=True, steps=steps)
            cm = with_entry(cm, "deeprad-training", key, reservation)
            cm = with_entry(cm, "deeprad-training", key,
                            reservation.model_copy(update={"reserved": False}))
            runs[dataset].append(steps)
            by_study.setdefault(key, []).append(steps)
    assert cm is not None
    size = sum(len(k) + len(v) for k, v in cm["data"].items())
    assert size < 100 * 1024, size
    ledger = read_ledger(cm, "cm")
    assert sum(e.runs for e in ledger.entries()) == 10_000
    for dataset, spent in runs.items():
        assert epsilon_of(ledger.dataset(dataset), DELTA) == pytest.approx(
            epsilon_of(spent, DELTA), rel=1e-9)
    for key, spent in by_study.items():
        namespace, _, study = key.partition("_")
        assert epsilon_of(ledger.steps(namespace, study), DELTA) == pytest.approx(
            epsilon_of(spent, DELTA), rel=1e-9)
    # The newest reports keep their task uids: a restarted agent finds them.
    assert ledger.has("research", "s3", "uid-3-1000")
    assert ledger.has("research", "s3", f"uid-3-{1001 - RECENT_REPORTS}")
    assert not ledger.has("research", "s3", "uid-3-1")


def test_ledger_compaction_never_drops_what_a_restarted_agent_looks_up() -> None:
    """A reservation outlives any number of later reports (its report must replace it, or it
    stays spent), and a report just written is the newest entry of its key, so the agent
    restarted before reporting its task Succeeded finds it and writes nothing twice."""
    run = round_steps(812, batch_size=16, local_epochs=2, noise_multiplier=1.1)
    long_running = LedgerEntry(task=UID, round=2, dataset="a", reserved=True,
                               steps=planned_steps(_training(), 1000))
    cm = with_entry(None, "t", "research_brain", long_running)
    for i in range(3 * RECENT_REPORTS):  # the same study's later runs (another hub's, say)
        cm = with_entry(cm, "t", "research_brain",
                        LedgerEntry(task=f"other-{i}", round=3 + i, dataset="a", steps=run))
    ledger = read_ledger(cm, "cm")
    assert ledger.entry("research", "brain", UID) == long_running
    assert len(ledger.runs("research", "brain")) == RECENT_REPORTS + 2  # + one merged entry
    job = JobView("brain-r2-a", UID, succeeded=1, outcome="Complete", log=_result_log(run))
    record, _ = decide_task(_config(), _task({"state": "Running"}), job, T0, ledger)
    assert isinstance(record, RecordPrivacy)
    after = read_ledger(with_entry(cm, "t", record.key, record.entry), "cm")
    assert ledger.recorded(record.key, record.entry) == after
    # Restarted before the task was reported: the report is found, nothing is written again.
    (only,) = decide_task(_config(), _task({"state": "Running"}), job, T0, after)
    assert isinstance(only, ReportTask) and only.status.state == TaskState.SUCCEEDED
    assert sum(e.runs for e in after.runs("research", "brain")) == 3 * RECENT_REPORTS + 1
