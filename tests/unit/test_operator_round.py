"""A FederatedRound's decisions with plain data: start, input, admission, tasks, deadline,
quorum, aggregation and outcome — and the site agent's mapping of a task to a trainer task."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from deeprad.core.errors import ConfigError
from deeprad.core.identity import Identity, KeyRegistry
from deeprad.core.layout import StudyLayout
from deeprad.core.privacy import DPSteps
from deeprad.core.protocol import (
    AggregateReport,
    CheckpointManifest,
    ClinicalMetrics,
    Contribution,
    ModelSpec,
    Rejection,
    SecAggOutcome,
    SiteResult,
    StrategySpec,
)
from deeprad.core.store.presigned import site_grants
from deeprad.operator.api.common import ConditionStatus
from deeprad.operator.api.federatedround import (
    FederatedRoundSpec,
    FederatedRoundStatus,
    RoundState,
    SiteState,
)
from deeprad.operator.api.hospitalsite import HospitalSiteSpec
from deeprad.operator.api.sitetask import PublicKeys, RoundRef, SiteTaskSpec, TaskResult, TaskState
from deeprad.operator.decide import round as rules
from deeprad.operator.decide.conditions import Desired, set_condition
from deeprad.operator.decide.sites import READY, SiteView
from deeprad.operator.hub.round_pass import TaskFacts
from deeprad.operator.hub.rounds import running_tasks
from deeprad.operator.render.tasks import site_task
from deeprad.operator.site.config import AgentConfig
from deeprad.operator.site.training import task_result, training_task

T0 = datetime(2030, 7, 8, 9, 0, tzinfo=UTC)  # a Monday
HUB = Identity.generate("hub", "hub")
KEYS = {n: Identity.generate(n) for n in ("a", "b", "c")}
PARENT = CheckpointManifest(study="s", round=0, producer="t", model=ModelSpec(),
                            payload_sha256="1" * 64, parent_sha256=None)


def _spec(**over: Any) -> FederatedRoundSpec:
    base: dict[str, Any] = {"round": 1, "model": {"name": "tumor-cnn"}, "sites": ["a", "b", "c"],
                            "minSites": 2, "deadline": "1h",
                            "privacy": {"secureAggregation": False}}
    return FederatedRoundSpec.model_validate({**base, **over})


def _view(name: str, ready: bool = True, **spec: Any) -> SiteView:
    ident = KEYS[name].public() if name in KEYS else KEYS["a"].public()
    site = HospitalSiteSpec.model_validate({
        "identity": {"signingKey": ident.signing_key, "keyAgreementKey": ident.key_agreement_key},
        "data": {"modality": "mri", "sampleCount": 100}, "studyNamespaces": ["research"],
        **spec})
    readiness = Desired.true(READY, "AgentReady") if ready else Desired.false(READY, "NoHeartbeat")
    return SiteView(name, site, tuple(set_condition(None, readiness, 1, T0)))


def _world(now: datetime = T0, **kw: Any) -> rules.RoundWorld:
    kw.setdefault("candidates", [_view("a"), _view("b"), _view("c")])
    kw.setdefault("store", rules.StoreView(input_manifest=PARENT))
    kw.setdefault("namespace", "research")
    return rules.RoundWorld(now=now, created=T0, **kw)


def _decide(spec: FederatedRoundSpec, status: FederatedRoundStatus, world: rules.RoundWorld
            ) -> rules.RoundDecision:
    return rules.decide_round("r1", 1, spec, status, world)


def _cond(status: FederatedRoundStatus, type_: str) -> tuple[ConditionStatus, str, str]:
    found = next(c for c in status.conditions or () if c.type == type_)
    return found.status, found.reason, found.message


def _admitted(spec: FederatedRoundSpec | None = None) -> FederatedRoundStatus:
    decision = _decide(spec or _spec(), FederatedRoundStatus(), _world())
    return decision.status


def test_a_round_without_its_input_runs_the_prepare_job_once() -> None:
    decision = _decide(_spec(), FederatedRoundStatus(), _world(store=rules.StoreView()))
    assert decision.actions == [rules.PrepareInput()]
    assert decision.status.start_time == "2030-07-08T09:00:00Z"
    assert decision.status.deadline_time == "2030-07-08T10:00:00Z"
    assert decision.status.state == RoundState.SCHEDULING
    again = _decide(_spec(), decision.status, _world(store=rules.StoreView(),
                                              prepare=rules.JobView("Running")))
    assert again.actions == [] and again.status.start_time == decision.status.start_time
    failed = _decide(_spec(), decision.status, _world(store=rules.StoreView(),
                                               prepare=rules.JobView("Failed", "bad digest")))
    assert failed.status.state == RoundState.FAILED and failed.finished
    assert _cond(failed.status, "Failed")[1:] == (
        "InputCheckpointFailed",
        "FederatedRound r1: preparing the input checkpoint failed: bad digest")


def test_admission_once_with_reasons_and_tasks_for_the_admitted() -> None:
    world = _world(candidates=[_view("a"), _view("b", ready=False), _view("c", suspend=True)])
    decision = _decide(_spec(sites=["a", "b", "c", "ghost"], minSites=1), FederatedRoundStatus(),
                       world)
    sites = {s.site: (s.state, s.reason) for s in decision.status.sites or ()}
    assert sites == {"a": (SiteState.PENDING, "Admitted"), "b": (SiteState.EXCLUDED, "NotReady"),
                     "c": (SiteState.EXCLUDED, "Suspended"),
                     "ghost": (SiteState.EXCLUDED, "NotFound")}
    assert decision.actions == [rules.CreateTasks(("a",), "1" * 64, ("a",))]
    assert decision.status.admitted_sites == 1
    # A later pass keeps the admission even if another site became Ready meanwhile.
    later = _decide(_spec(sites=["a", "b", "c", "ghost"], minSites=1), decision.status,
                    _world(T0 + timedelta(minutes=1), tasks={"a": rules.TaskView("r1-a")}))
    assert later.actions == [] and later.status.admitted_sites == 1


def test_too_few_admitted_sites_fail_the_round_naming_each_reason() -> None:
    world = _world(candidates=[_view("a"), _view("b", ready=False), _view("c", ready=False)])
    decision = _decide(_spec(), FederatedRoundStatus(), world)
    status, reason, message = _cond(decision.status, "Failed")
    assert (decision.status.state, status, reason) == (RoundState.FAILED, "True",
                                                        "InsufficientSites")
    assert message.startswith("FederatedRound r1: 1 site(s) admitted, spec.minSites is 2 "
                              "(b: NotReady; c: NotReady)")
    assert decision.actions == [] and any(e.reason == "InsufficientSites" for e in decision.events)


def test_secure_aggregation_needs_declared_sample_counts() -> None:
    world = _world(candidates=[_view("a"), _view("b"), _view("c", data=None)])
    spec = _spec(privacy={"secureAggregation": True})
    decision = _decide(spec, FederatedRoundStatus(), world)
    site_c = next(s for s in decision.status.sites or () if s.site == "c")
    assert (site_c.state, site_c.reason) == (SiteState.EXCLUDED, "SampleCountUnknown")
    assert decision.actions == [rules.CreateTasks(("a", "b"), "1" * 64, ("a", "b"))]


def _result(site: str) -> TaskResult:
    return TaskResult(samples=80, update_digest=f"{ord(site):064x}", duration_seconds=3.0)


def test_sites_follow_their_tasks_and_aggregation_starts_when_all_finished() -> None:
    admitted = _admitted()
    tasks = {"a": rules.TaskView("r1-a", TaskState.SUCCEEDED, result=_result("a")),
             "b": rules.TaskView("r1-b", TaskState.RUNNING),
             "c": rules.TaskView("r1-c", TaskState.FAILED, "CUDA out of memory")}
    decision = _decide(_spec(), admitted, _world(T0 + timedelta(minutes=5), tasks=tasks))
    states = {s.site: s.state for s in decision.status.sites or ()}
    assert states == {"a": SiteState.REPORTED, "b": SiteState.TRAINING, "c": SiteState.FAILED}
    assert decision.actions == [] and decision.status.state == RoundState.TRAINING
    assert decision.status.reported_sites == 1
    tasks["b"] = rules.TaskView("r1-b", TaskState.SUCCEEDED, result=_result("b"))
    all_finished = _decide(_spec(), decision.status, _world(T0 + timedelta(minutes=6), tasks=tasks))
    assert all_finished.actions == [rules.Aggregate(("a", "b"), ("a", "b", "c"))]
    assert all_finished.status.aggregation_start_time == "2030-07-08T09:06:00Z"


def test_the_deadline_drops_silent_sites_and_enforces_the_quorum() -> None:
    admitted = _admitted()
    late = T0 + timedelta(hours=1, seconds=1)
    tasks = {"a": rules.TaskView("r1-a", TaskState.SUCCEEDED, result=_result("a")),
             "b": rules.TaskView("r1-b", TaskState.RUNNING)}
    decision = _decide(_spec(minSites=1), admitted, _world(late, tasks=tasks))
    states = {s.site: (s.state, s.reason) for s in decision.status.sites or ()}
    assert states["b"] == (SiteState.DROPPED, "DeadlineExceeded")
    assert states["c"] == (SiteState.DROPPED, "DeadlineExceeded")
    assert decision.actions == [rules.Aggregate(("a",), ("a", "b", "c"))]
    quorum = _decide(_spec(), admitted, _world(late, tasks=tasks))
    status, reason, message = _cond(quorum.status, "Failed")
    assert (status, reason) == ("True", "QuorumNotMet")
    assert message == ("FederatedRound r1: 1 site(s) reported, spec.minSites is 2; b: Dropped "
                       "(no report by the round's deadline); c: Dropped (no report by the "
                       "round's deadline)")
    assert quorum.finished and quorum.actions == []


def test_stray_tasks_are_deleted_and_missing_ones_created_before_the_deadline() -> None:
    admitted = _admitted(_spec(sites=["a", "b"]))
    decision = _decide(_spec(sites=["a", "b"]), admitted,
                _world(tasks={"a": rules.TaskView("r1-a"), "x": rules.TaskView("r1-x")}))
    assert rules.DeleteTasks((("x", "r1-x"),)) in decision.actions
    assert rules.CreateTasks(("b",), "1" * 64, ("a", "b")) in decision.actions


def _report(*sites: str, rejected: tuple[str, ...] = ()) -> AggregateReport:
    return AggregateReport(
        study="r1", round=1, strategy=StrategySpec(),
        contributors=[Contribution(site=s, update_sha256="2" * 64, num_samples=80)
                      for s in sites],
        rejected=[Rejection(site=s, reason="bad signature") for s in rejected], missing=[],
        federated_metrics=ClinicalMetrics(n=40, positives=20, loss=0.4, auroc=0.9,
                                          sensitivity=0.8, specificity=0.85, accuracy=0.82),
        checkpoint_sha256="3" * 64, duration_s=2.0)


def test_the_outcome_comes_from_the_aggregators_report() -> None:
    admitted = _admitted()
    tasks = {s: rules.TaskView(f"r1-{s}", TaskState.SUCCEEDED, result=_result(s))
             for s in "abc"}
    aggregating_at = T0 + timedelta(minutes=10)
    running = _decide(_spec(), admitted, _world(aggregating_at, tasks=tasks,
                                                aggregator=rules.JobView("Running")))
    assert running.status.state == RoundState.AGGREGATING and not running.finished
    output = PARENT.model_copy(update={"round": 1, "payload_sha256": "3" * 64})
    done = _decide(_spec(), running.status, _world(
        aggregating_at + timedelta(seconds=30), tasks=tasks, aggregator=rules.JobView("Succeeded"),
        store=rules.StoreView(PARENT, output, _report("a", "b", rejected=("c",)))))
    status = done.status
    assert status.state == RoundState.SUCCEEDED and done.finished
    assert {x.site: x.state for x in status.sites or ()} == {
        "a": SiteState.REPORTED, "b": SiteState.REPORTED, "c": SiteState.REJECTED}
    assert (status.reported_sites, status.rejected_sites) == (2, 1)
    assert status.input_metrics is not None and status.input_metrics.auroc == 0.9
    assert status.timings is not None and status.timings.aggregation_seconds == 30.0
    assert status.timings.total_seconds == 630.0
    assert _cond(status, "Succeeded")[1] == "RoundSucceeded"
    assert any(e.reason == "UpdateRejected" for e in done.events)
    # An aggregating_at round is left alone.
    assert _decide(_spec(), status, _world(aggregating_at + timedelta(hours=2))).actions == []
    failed = _decide(_spec(), running.status, _world(
        aggregating_at, tasks=tasks, aggregator=rules.JobView("Failed", "quorum not met")))
    assert _cond(failed.status, "Failed")[1:] == (
        "AggregationFailed", "FederatedRound r1: the aggregator Job failed: quorum not met")


def test_with_secure_aggregation_the_aggregator_starts_with_the_tasks() -> None:
    spec = _spec(privacy={"secureAggregation": True})
    admitted = _admitted(spec)
    tasks = {s: rules.TaskView(f"r1-{s}") for s in "abc"}
    decision = _decide(spec, admitted, _world(tasks=tasks))
    assert decision.actions == [rules.Aggregate(("a", "b", "c"), ("a", "b", "c"))]
    assert decision.status.state == RoundState.TRAINING


def test_a_failed_aggregator_fails_a_secure_round_at_once_with_its_cause() -> None:
    """The issue's case: sites trained and wait in the exchange, the aggregator refused at
    once; the round must not wait for its deadline and call both sites Dropped."""
    spec = _spec(privacy={"secureAggregation": True})
    tasks = {s: rules.TaskView(f"r1-{s}", TaskState.RUNNING) for s in "abc"}
    log = ("2030-07-08 09:00:01 deeprad.aggregator round 1: starting\n"
           "deeprad.aggregator: strategy krum needs every update in the clear\n")
    aggregator = rules.JobView.failed("PodFailurePolicy", "Container aggregator for pod x "
                                      "failed with exit code 2 matching FailJob rule", log)
    decision = _decide(spec, _admitted(spec), _world(T0 + timedelta(minutes=2), tasks=tasks,
                                                     aggregator=aggregator))
    assert decision.finished and decision.status.state == RoundState.FAILED
    assert _cond(decision.status, "Failed")[1:] == (
        "AggregationFailed", "FederatedRound r1: the aggregator Job failed: deeprad.aggregator: "
        "strategy krum needs every update in the clear (PodFailurePolicy)")
    assert {x.state for x in decision.status.sites or ()} == {SiteState.TRAINING}


def test_a_failed_jobs_cause_is_one_line() -> None:
    crash = rules.JobView.failed("BackoffLimitExceeded", "Job has reached the specified backoff "
                                 "limit", "Traceback (most recent call last):\n  File x\n"
                                 "MemoryError: out of memory\n\n")
    assert crash.message == "MemoryError: out of memory (BackoffLimitExceeded)"
    late = rules.JobView.failed("DeadlineExceeded", "Job was active longer than specified "
                                "deadline", "2030 deeprad.aggregator waiting for sites\n")
    assert late.message == "DeadlineExceeded: Job was active longer than specified deadline"
    silent = rules.JobView.failed("BackoffLimitExceeded", "", "")
    assert silent.message == "BackoffLimitExceeded"
    assert "\n" not in crash.message + late.message + silent.message


def test_a_secure_round_ends_once_its_contributors_reported_not_at_the_deadline() -> None:
    spec = _spec(privacy={"secureAggregation": True})
    admitted = _admitted(spec)
    output = PARENT.model_copy(update={"round": 1, "payload_sha256": "3" * 64})
    report = _report("a", "b").model_copy(update={"secagg": SecAggOutcome(
        survivors=["a", "b"], dropped=[], not_joined=["c"], threshold=2, clip=1.0,
        quantization_bound=1e-9)})
    store = rules.StoreView(PARENT, output, report)
    tasks = {"a": rules.TaskView("r1-a", TaskState.SUCCEEDED, result=_result("a")),
             "b": rules.TaskView("r1-b", TaskState.RUNNING), "c": rules.TaskView("r1-c")}
    at = T0 + timedelta(minutes=5)  # long before the 1h deadline
    waiting = _decide(spec, admitted, _world(at, tasks=tasks, store=store,
                                             aggregator=rules.JobView("Succeeded")))
    assert not waiting.finished and waiting.status.state == RoundState.TRAINING
    tasks["b"] = rules.TaskView("r1-b", TaskState.SUCCEEDED, result=_result("b"))
    done = _decide(spec, waiting.status, _world(at, tasks=tasks, store=store,
                                                aggregator=rules.JobView("Succeeded")))
    assert done.finished and done.status.state == RoundState.SUCCEEDED
    sites = {x.site: x for x in done.status.sites or ()}
    assert (sites["a"].state, sites["b"].state) == (SiteState.REPORTED, SiteState.REPORTED)
    assert sites["b"].samples == 80  # its task's result, not only the aggregator's word
    assert (sites["c"].state, sites["c"].reason) == (SiteState.DROPPED,
                                                     "SecureAggregationDropout")
    assert sites["c"].message == "did not take part in the secure-aggregation exchange"


# ---- the site agent's side --------------------------------------------------------------------


def _task(**over: Any) -> SiteTaskSpec:
    layout = StudyLayout("research", "study", "s-uid")
    grants = site_grants(layout, 2, "a", secure_aggregation=True)
    hub = HUB.public()
    roster = [{"name": n, "signingKey": KEYS[n].public().signing_key,
               "keyAgreementKey": KEYS[n].public().key_agreement_key} for n in ("a", "b", "c")]
    base: dict[str, Any] = {
        "roundRef": {"namespace": "research", "name": "study-r2", "uid": "u-2"},
        "study": "study", "studyUid": "s-uid", "round": 2, "site": "a",
        "model": {"name": "tumor-cnn"},
        "data": {"imageSize": 48, "valFraction": 0.25, "splitSeed": 3},
        "training": {"localEpochs": 2, "lr": 0.01, "optimizer": "sgd"},
        "privacy": {"secureAggregation": True,
                    "differentialPrivacy": {"noiseMultiplier": 1.1, "maxGradNorm": 2.0,
                                            "delta": 1e-5}},
        "parentDigest": "1" * 64,
        "hub": {"name": "hub", "signingKey": hub.signing_key,
                "keyAgreementKey": hub.key_agreement_key},
        "objects": [{"key": k, "method": m, "url": f"https://s3.example/{k}?sig=x"}
                    for k, m in grants.items()],
        "secureAggregation": {"roster": roster, "threshold": 3, "clip": 1.0,
                              "weightNormalizer": 300.0, "timeoutSeconds": 600},
        "deadline": "2030-07-08T10:00:00Z"}
    return SiteTaskSpec.model_validate({**base, **over})


def test_grants_cover_exactly_what_a_site_reads_and_writes() -> None:
    plain = site_grants(StudyLayout("ns", "st"), 3, "a", secure_aggregation=False)
    assert plain == {"ns/st/rounds/2/global.json": "GET",
                 "ns/st/rounds/2/global.safetensors": "GET",
                 "ns/st/rounds/3/updates/a.bin": "PUT", "ns/st/rounds/3/updates/a.json": "PUT",
                 "ns/st/rounds/3/results/a.json": "PUT",
                 "ns/st/rounds/3/audit/sites/a.json": "PUT"}
    secure = site_grants(StudyLayout("ns", "st"), 3, "a", secure_aggregation=True)
    assert secure["ns/st/rounds/3/secagg/routed/a.json"] == "GET"
    assert secure["ns/st/rounds/3/secagg/advertise/a.json"] == "PUT"
    assert not any(k.endswith("/b.json") for k in secure)  # nothing of another site


def test_the_agent_maps_a_task_onto_the_trainers_task() -> None:
    config = AgentConfig.model_validate({"site": "a", "training": {
        "dataset": {"kind": "folder", "path": "/data", "image_size": 64}}})
    task = training_task(_task(), config)
    assert (task.namespace, task.study, task.study_uid, task.round, task.site) == (
        "research", "study", "s-uid", 2, "a")
    dataset = task.dataset
    assert (dataset.kind, dataset.path, dataset.image_size, dataset.val_fraction,
            dataset.split_seed) == ("folder", "/data", 48, 0.25, 3)
    assert (task.train.local_epochs, task.train.lr, task.train.optimizer) == (2, 0.01, "sgd")
    assert task.privacy is not None and task.privacy.noise_multiplier == 1.1
    assert task.secagg is not None and task.secagg.roster == ["a", "b", "c"]
    assert task.secagg.threshold == 3 and task.secagg.weight_normalizer == 300.0
    registry = KeyRegistry.from_json(task.registry_json)
    assert registry.require_hub().signing_key == HUB.public().signing_key
    assert sorted(registry.sites) == ["a", "b", "c"]


def test_the_agent_refuses_foreign_tasks_and_unknown_hubs() -> None:
    with pytest.raises(ConfigError, match="reached the agent of b"):
        training_task(_task(), AgentConfig(site="b"))
    other = Identity.generate("other-hub", "hub").public().signing_key
    with pytest.raises(ConfigError, match="refusing work from an unknown hub"):
        training_task(_task(), AgentConfig(site="a", hub_signing_key=other))
    assert training_task(_task(), AgentConfig(site="a",
                                              hub_signing_key=HUB.public().signing_key))


def test_the_trainers_result_becomes_the_tasks_result_with_epsilon() -> None:
    result = SiteResult(study="study", round=2, site="a", num_samples=80, global_metrics=None,
                        local_metrics=None, train_loss=0.3, update_sha256="4" * 64,
                        duration_s=12.5,
                        privacy=DPSteps(noise_multiplier=1.1, sample_rate=0.2, steps=10))
    reported = task_result(result, _task())
    assert (reported.samples, reported.update_digest, reported.duration_seconds) == (
        80, "4" * 64, 12.5)
    assert reported.epsilon is not None and 0 < reported.epsilon < 10


def test_secure_aggregation_is_told_when_a_site_will_send_nothing() -> None:
    spec = _spec(privacy={"secureAggregation": True})
    admitted = _admitted(spec)
    tasks = {"a": rules.TaskView("r1-a", TaskState.FAILED, "OOM"),
             "b": rules.TaskView("r1-b", TaskState.RUNNING), "c": rules.TaskView("r1-c")}
    decision = _decide(spec, admitted, _world(tasks=tasks, aggregator=rules.JobView("Running")))
    assert rules.MarkGone(("a",)) in decision.actions
    again = _decide(spec, decision.status, _world(tasks=tasks, aggregator=rules.JobView("Running")))
    assert not any(isinstance(a, rules.MarkGone) for a in again.actions)  # once
    late = _decide(spec, again.status, _world(T0 + timedelta(hours=2), tasks=tasks,
                                              aggregator=rules.JobView("Running")))
    assert rules.MarkGone(("b", "c")) in late.actions


def test_rounds_of_the_same_name_in_two_namespaces_get_distinct_work_items() -> None:
    """Two teams may both run a study called tumor-detection: their round-1 work items meet in
    the same site namespace and their training Jobs on the same hospital cluster."""
    hub = PublicKeys(name="hub", signing_key=HUB.public().signing_key,
                     key_agreement_key=HUB.public().key_agreement_key)
    grants = _task().objects
    a, b = (site_task(RoundRef(namespace=ns, name="study-r1", uid=uid), "study", "s-uid",
                      _spec(), "a", "1" * 64, hub, grants, None, "2030-07-08T10:00:00Z")
            for ns, uid in (("team-a", "aaaa1111-x"), ("team-b", "bbbb2222-y")))
    assert a["metadata"]["namespace"] == b["metadata"]["namespace"] == "deeprad-site-a"
    assert (a["metadata"]["name"], b["metadata"]["name"]) == ("study-r1-aaaa1111",
                                                               "study-r1-bbbb2222")


def test_an_input_checkpoint_outside_the_store_fails_the_round_naming_the_field() -> None:
    problem = "'s3://other/x.safetensors' is not in this object store"
    decision = _decide(_spec(), FederatedRoundStatus(),
                _world(store=rules.StoreView(), input_problem=problem))
    assert decision.status.state == RoundState.FAILED and decision.actions == []
    assert _cond(decision.status, "Failed")[1:] == (
        "InvalidInputCheckpoint", f"FederatedRound r1: spec.inputCheckpoint: {problem}")


def test_a_hub_without_store_or_keys_says_so_on_the_round() -> None:
    status = rules.hub_not_configured(FederatedRoundStatus(), ["--store", "--hub-keys"], 1, T0)
    assert _cond(status, "SitesScheduled") == (
        "False", "HubNotConfigured",
        "the hub operator runs without --store, --hub-keys; it cannot run rounds")
    assert status.state is None and status.start_time is None  # the round has not started


def test_admission_counts_unfinished_tasks_of_other_rounds_per_site() -> None:
    def facts(round_uid: str, site: str, state: TaskState | None) -> TaskFacts:
        return TaskFacts(round_uid, site, f"{round_uid}-{site}", f"deeprad-site-{site}", state,
                         None, None, None)

    by_round = {"this": [facts("this", "a", TaskState.RUNNING)],
                "r1": [facts("r1", "a", None), facts("r1", "b", TaskState.SUCCEEDED)],
                "r2": [facts("r2", "a", TaskState.ACCEPTED), facts("r2", "b", TaskState.FAILED),
                       facts("r2", "c", TaskState.RUNNING)]}
    assert running_tasks(by_round, exclude_round="this") == {"a": 2, "c": 1}
