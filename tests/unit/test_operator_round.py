"""A FederatedRound's decisions with plain data: start, input, admission, tasks, deadline,
quorum, aggregation and outcome — and the site agent's mapping of a task to a trainer task."""

from __future__ import annotations

from dataclasses import replace
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
from deeprad.operator.decide.queue import OpenSites, QueuedRound, queued_behind, waiting_ahead
from deeprad.operator.decide.sites import READY, SiteView
from deeprad.operator.hub.round_pass import TaskFacts
from deeprad.operator.hub.rounds import AdmissionGate, SiteClaim, held_slots, round_claims
from deeprad.operator.render.tasks import site_task
from deeprad.operator.site.config import AgentConfig
from deeprad.operator.site.training import task_result, training_task

T0 = datetime(2030, 7, 8, 9, 0, tzinfo=UTC)  # a Monday
SEC = timedelta(seconds=1)
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
    # Admitted first: the sites are scheduled, training waits for the input.
    assert _cond(decision.status, "SitesScheduled")[:2] == ("True", "SitesAdmitted")
    assert _cond(decision.status, "Training")[:2] == ("False", "PreparingInput")
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


# ---- queueing: a round short of sites waits, in a fair order, up to its admission timeout ----


def _busy(name: str, running: int = 1, **spec: Any) -> SiteView:
    return replace(_view(name, **spec), running_tasks=running)


def test_a_round_short_of_sites_is_queued_naming_each_reason_without_starting() -> None:
    world = _world(store=rules.StoreView(),
                   candidates=[_view("a"), _busy("b"), _view("c", ready=False)])
    decision = _decide(_spec(), FederatedRoundStatus(), world)
    status = decision.status
    assert status.state == RoundState.QUEUED and not decision.finished
    assert _cond(status, "SitesScheduled") == (
        "False", "WaitingForSites",
        "1 site(s) admissible, spec.minSites is 2 (b: AtCapacity; c: NotReady); waiting until "
        "2030-07-08T15:00:00Z (spec.admissionTimeout 6h)")
    assert {s.site: (s.state, s.reason) for s in status.sites or ()} == {
        "a": (SiteState.WAITING, "Available"), "b": (SiteState.WAITING, "AtCapacity"),
        "c": (SiteState.WAITING, "NotReady")}
    assert status.waiting_for == "b:AtCapacity c:NotReady"
    assert status.queued_since == "2030-07-08T09:00:00Z"
    # Its deadline has not started, and a waiting round runs nothing: no prepare Job, no task.
    assert (status.start_time, status.deadline_time, status.admitted_sites) == (None, None, None)
    assert decision.actions == [] and [e.reason for e in decision.events] == ["Queued"]
    again = _decide(_spec(), status, replace(world, now=T0 + timedelta(minutes=5)))
    assert again.status.queued_since == status.queued_since and again.events == []


def test_a_queued_round_is_admitted_when_capacity_frees_and_its_deadline_counts_from_then() -> None:
    queued = _decide(_spec(), FederatedRoundStatus(),
                     _world(candidates=[_view("a"), _busy("b"), _view("c", ready=False)])).status
    later = T0 + timedelta(hours=2)
    decision = _decide(_spec(), queued, _world(later, candidates=[
        _view("a"), _view("b"), _view("c", ready=False)]))
    status = decision.status
    assert {s.site: (s.state, s.reason) for s in status.sites or ()} == {
        "a": (SiteState.PENDING, "Admitted"), "b": (SiteState.PENDING, "Admitted"),
        "c": (SiteState.EXCLUDED, "NotReady")}
    assert (status.start_time, status.deadline_time) == ("2030-07-08T11:00:00Z",
                                                         "2030-07-08T12:00:00Z")
    assert status.waiting_for == "" and status.admitted_sites == 2
    assert status.timings is not None and status.timings.scheduling_seconds == 7200
    assert _cond(status, "SitesScheduled")[:2] == ("True", "SitesAdmitted")
    assert decision.actions == [rules.CreateTasks(("a", "b"), "1" * 64, ("a", "b"))]
    # Still training within the hour after admission (past an hour after creation).
    within = _decide(_spec(), status, _world(later + timedelta(minutes=59), tasks={
        "a": rules.TaskView("r1-a", TaskState.RUNNING),
        "b": rules.TaskView("r1-b", TaskState.RUNNING)}))
    assert within.status.state == RoundState.TRAINING
    assert all(s.state != SiteState.DROPPED for s in within.status.sites or ())


def test_a_queued_round_fails_insufficient_sites_at_its_admission_timeout() -> None:
    candidates = [_view("a"), _busy("b"), _view("c", suspend=True)]
    queued = _decide(_spec(), FederatedRoundStatus(), _world(candidates=candidates)).status
    waiting = _decide(_spec(), queued, _world(T0 + timedelta(hours=5, minutes=59),
                                              candidates=candidates))
    assert waiting.status.state == RoundState.QUEUED
    decision = _decide(_spec(), queued, _world(T0 + timedelta(hours=6), candidates=candidates))
    status, reason, message = _cond(decision.status, "Failed")
    assert (decision.status.state, status, reason) == (RoundState.FAILED, "True",
                                                        "InsufficientSites")
    assert message == ("FederatedRound r1: 1 site(s) admissible, spec.minSites is 2 "
                       "(b: AtCapacity; c: Suspended); still short after "
                       "spec.admissionTimeout 6h; make more sites Ready or lower minSites")
    assert {s.site: s.state for s in decision.status.sites or ()} == dict.fromkeys(
        "abc", SiteState.EXCLUDED)
    assert decision.finished and decision.actions == []
    assert any(e.reason == "InsufficientSites" for e in decision.events)
    # admissionTimeout 0s: no waiting at all.
    at_once = _decide(_spec(admissionTimeout="0s"), FederatedRoundStatus(),
                      _world(candidates=candidates))
    assert _cond(at_once.status, "Failed")[1] == "InsufficientSites"


def test_permanent_reasons_fail_a_round_at_once_instead_of_queueing() -> None:
    wrong_data = _view("b", data={"modality": "ct", "sampleCount": 100})
    world = _world(candidates=[_view("a"), wrong_data, _view("c", ready=False)])
    decision = _decide(_spec(sites=["a", "b", "ghost"], data={"modality": "mri"}),
                       FederatedRoundStatus(), replace(world, candidates=[_view("a"), wrong_data]))
    status, reason, message = _cond(decision.status, "Failed")
    assert (status, reason) == ("True", "InsufficientSites")
    assert message == ("FederatedRound r1: 1 site(s) admissible, spec.minSites is 2 "
                       "(b: DataMismatch; ghost: NotFound); waiting cannot help: fix the sites' "
                       "reasons or lower minSites")
    # One permanent refusal with a site that may still come: the round waits for that one.
    waits = _decide(_spec(sites=["a", "b", "c"], data={"modality": "mri"}),
                    FederatedRoundStatus(), world)
    assert waits.status.state == RoundState.QUEUED
    assert {s.site: (s.state, s.reason) for s in waits.status.sites or ()} == {
        "a": (SiteState.WAITING, "Available"), "b": (SiteState.EXCLUDED, "DataMismatch"),
        "c": (SiteState.WAITING, "NotReady")}
    assert waits.status.waiting_for == "b:DataMismatch c:NotReady"


def _waiting(name: str, priority: int = 0, since: datetime = T0, sites: str = "ab",
             created: datetime | None = None, min_sites: int = 1, namespace: str = "research"
             ) -> QueuedRound:
    return QueuedRound(f"{namespace}/{name}", priority, since, created or since, min_sites,
                       frozenset(sites))


ALL_OPEN = OpenSites(lambda site: True)


def test_queue_order_is_priority_then_fifo_then_creation_then_name() -> None:
    me = _waiting("me", since=T0)
    early, late = _waiting("early", since=T0 - timedelta(minutes=1)), _waiting("late",
                                                                              since=T0 + SEC)
    urgent = _waiting("urgent", priority=5, since=T0 + timedelta(hours=1))
    assert waiting_ahead(me, [late, urgent, early], "a", ALL_OPEN) == [urgent, early]
    assert waiting_ahead(me, [late, urgent, early], "c", ALL_OPEN) == []  # nobody wants c
    # Same priority and queuedSince: the older round first, then the name.
    older = _waiting("zz", created=T0 - timedelta(hours=1))
    twin = _waiting("aa")
    assert waiting_ahead(me, [older, twin], "a", ALL_OPEN) == [older, twin]
    # A site with k free slots goes to the first k rounds that want it.
    assert queued_behind(me, [urgent, early], "a", 2, ALL_OPEN) == urgent
    assert queued_behind(me, [urgent, early], "a", 3, ALL_OPEN) is None
    assert queued_behind(replace(me, priority=6), [urgent, early], "a", 1, ALL_OPEN) is None


def test_a_waiting_round_that_could_not_start_with_a_site_is_not_ahead_there() -> None:
    me = _waiting("me", sites="a")
    # Ahead in the order, but it needs 2 of a, b and c, and only a is open.
    stuck = _waiting("stuck", priority=1000, sites="abc", min_sites=2)
    only_a = OpenSites(lambda site: site == "a")
    assert waiting_ahead(me, [stuck], "a", only_a) == []
    assert queued_behind(me, [stuck], "a", 1, only_a) is None
    # With b open too it could start given a, so it keeps its place there.
    a_and_b = OpenSites(lambda site: site in "ab")
    assert queued_behind(me, [stuck], "a", 1, a_and_b) == stuck
    # Given b (were it free), a would make two: there it could start. Each site is asked
    # once per pass.
    asked: list[str] = []

    def only_a_asked(site: str) -> bool:
        asked.append(site)
        return site == "a"

    counting = OpenSites(only_a_asked)
    assert not counting.could_start(stuck, "a") and counting.could_start(stuck, "b")
    assert sorted(asked) == ["a", "b", "c"]


def test_a_high_priority_round_waiting_for_a_notready_site_leaves_the_shared_site_to_others(
        ) -> None:
    # A study author's round at priority 1000 wants shared site a and site n, which is
    # NotReady; with minSites 2 it cannot start, so a's free slot goes to the round behind.
    author = _waiting("author-r1", priority=1000, since=T0 - timedelta(hours=1), sites="an",
                      min_sites=2, namespace="author")
    world = _world(candidates=[_view("a"), _view("n", ready=False)],
                   queue={"a": [author], "n": [author]})
    decision = _decide(_spec(sites=["a"], minSites=1), FederatedRoundStatus(), world)
    assert decision.status.admitted_sites == 1
    assert {s.site: s.state for s in decision.status.sites or ()} == {"a": SiteState.PENDING}
    # Once n is Ready the author's round could start with a, and keeps its place there.
    ready = replace(world, candidates=[_view("a"), _view("n")])
    behind = _decide(_spec(sites=["a"], minSites=1), FederatedRoundStatus(), ready)
    assert behind.status.state == RoundState.QUEUED
    assert behind.status.waiting_for == "a:QueuedBehind"


def test_a_round_behind_others_in_the_queue_waits_queued_behind_naming_the_round_ahead() -> None:
    ahead = _waiting("other-r1", since=T0 - timedelta(minutes=3), sites="ab")
    world = _world(candidates=[_view("a"), _view("b"), _view("c")], queue={"a": [ahead],
                                                                           "b": [ahead]})
    decision = _decide(_spec(minSites=2), FederatedRoundStatus(), world)
    assert decision.status.state == RoundState.QUEUED
    by_site = {s.site: s for s in decision.status.sites or ()}
    assert (by_site["a"].state, by_site["a"].reason) == (SiteState.WAITING, "QueuedBehind")
    assert by_site["a"].message == (
        "HospitalSite a: its 1 free task slot(s) go first to FederatedRound research/other-r1 "
        "(priority 0, queued since 2030-07-08T08:57:00Z), ahead in the queue")
    assert decision.status.waiting_for == "a:QueuedBehind b:QueuedBehind"
    # With a second slot at each site, both rounds fit: this one is admitted (a, b and c).
    roomy = [_view(n, limits={"maxConcurrentTasks": 2}) for n in "abc"]
    admitted = _decide(_spec(minSites=2), FederatedRoundStatus(), replace(world,
                                                                         candidates=roomy))
    assert admitted.status.admitted_sites == 3
    # A higher priority goes first even though it queued later.
    first = _decide(_spec(minSites=2, priority=1), FederatedRoundStatus(), world)
    assert first.status.admitted_sites == 3


def test_a_round_ahead_in_another_namespace_is_not_named_in_this_rounds_status() -> None:
    ahead = _waiting("secret-trial-r1", priority=7, since=T0 - timedelta(minutes=3),
                     sites="ab", namespace="oncology")
    world = _world(candidates=[_view("a"), _view("b"), _view("c")], queue={"a": [ahead],
                                                                           "b": [ahead]})
    status = _decide(_spec(minSites=2), FederatedRoundStatus(), world).status
    by_site = {s.site: s for s in status.sites or ()}
    assert by_site["a"].message == (
        "HospitalSite a: its 1 free task slot(s) go first to a FederatedRound of another "
        "namespace (priority 7, waiting since 2030-07-08T08:57:00Z), ahead in the queue")
    written = status.model_dump_json()
    assert "secret-trial" not in written and "oncology" not in written


def test_a_queued_sitetask_maps_to_a_queued_site_not_training_and_drops_at_the_deadline() -> None:
    status = _admitted()
    queued = rules.TaskView("r1-a", TaskState.QUEUED, "0/3 nodes are available: 3 Insufficient "
                            "nvidia.com/gpu", reason="Unschedulable")
    decision = _decide(_spec(), status, _world(T0 + timedelta(minutes=5), tasks={
        "a": queued, "b": rules.TaskView("r1-b", TaskState.RUNNING)}))
    by_site = {s.site: s for s in decision.status.sites or ()}
    assert (by_site["a"].state, by_site["a"].reason) == (SiteState.QUEUED, "Unschedulable")
    assert by_site["a"].message == "0/3 nodes are available: 3 Insufficient nvidia.com/gpu"
    assert by_site["b"].state == SiteState.TRAINING
    running = _decide(_spec(), decision.status, _world(T0 + timedelta(minutes=6), tasks={
        "a": rules.TaskView("r1-a", TaskState.RUNNING)}))
    entry = next(s for s in running.status.sites or () if s.site == "a")
    assert (entry.state, entry.message) == (SiteState.TRAINING, None)
    late = _decide(_spec(), decision.status, _world(T0 + timedelta(hours=1), tasks={
        "a": queued}))
    entry = next(s for s in late.status.sites or () if s.site == "a")
    assert (entry.state, entry.reason) == (SiteState.DROPPED, "DeadlineExceeded")
    # The dropped entry keeps the site's last word: why it never trained.
    assert entry.message == ("no report by the round's deadline; the site's last report: "
                             "0/3 nodes are available: 3 Insufficient nvidia.com/gpu")


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


def test_admission_counts_the_slots_other_rounds_take_per_site() -> None:
    def facts(round_uid: str, site: str, state: TaskState | None) -> TaskFacts:
        return TaskFacts(round_uid, site, f"{round_uid}-{site}", f"deeprad-site-{site}", state,
                         None, None, None)

    by_round = {"this": [facts("this", "a", TaskState.RUNNING)],
                "r1": [facts("r1", "a", None), facts("r1", "b", TaskState.SUCCEEDED)],
                "r2": [facts("r2", "a", TaskState.QUEUED), facts("r2", "b", TaskState.FAILED),
                       facts("r2", "c", TaskState.RUNNING)]}
    assert held_slots(by_round, {}, {}, exclude_round="this") == {"a": 2, "c": 1}
    # A round admitted at d before its task exists takes a slot there; r2 counts once at c;
    # a round this operator has just admitted counts before the index shows it.
    claims = {"d": [SiteClaim("r3", holds=True)], "c": [SiteClaim("r2", holds=True)],
              "b": [SiteClaim("r4", holds=False, waiting=_waiting("r4"))]}
    assert held_slots(by_round, claims, {"r5": {"b"}}, exclude_round="this") == {
        "a": 2, "b": 1, "c": 1, "d": 1}


def _round_object(status: dict[str, Any], priority: int | None = None) -> dict[str, Any]:
    return {"name": "r2", "namespace": "research", "uid": "u2",
            "meta": {"creationTimestamp": "2030-07-08T08:00:00Z"},
            "spec": {} if priority is None else {"priority": priority}, "status": status}


def test_the_round_index_shows_what_a_round_holds_and_what_it_waits_for() -> None:
    waiting = {"state": "Queued", "queuedSince": "2030-07-08T08:30:00Z", "sites": [
        {"site": "a", "state": "Waiting", "reason": "Available"},
        {"site": "b", "state": "Waiting", "reason": "AtCapacity"},
        {"site": "c", "state": "Excluded", "reason": "NotFound"}]}
    claims = round_claims(**_round_object(waiting, priority=3))
    queued = QueuedRound("research/r2", 3, T0 - timedelta(minutes=30),
                         T0 - timedelta(hours=1), 2, frozenset("ab"))  # minSites' default
    assert claims == {"a": SiteClaim("u2", False, queued), "b": SiteClaim("u2", False, queued)}
    quorum = _round_object(waiting, priority=3)
    quorum["spec"]["minSites"] = 1
    assert round_claims(**quorum)["a"].waiting == replace(queued, min_sites=1)
    running = {"state": "Training", "startTime": "2030-07-08T09:00:00Z", "sites": [
        {"site": "a", "state": "Training"}, {"site": "b", "state": "Reported"},
        {"site": "c", "state": "Queued"}, {"site": "d", "state": "Excluded"}]}
    assert round_claims(**_round_object(running)) == {"a": SiteClaim("u2", True),
                                                        "c": SiteClaim("u2", True)}
    assert round_claims(**_round_object({**running, "state": "Failed"})) == {}
    assert round_claims(**_round_object({})) == {}


def test_the_admission_gate_remembers_admissions_until_the_index_shows_them() -> None:
    clock = [1000.0]
    gate = AdmissionGate(clock=lambda: clock[0])
    gate.record("u1", ["a", "b"])
    assert gate.recent(indexed={}) == {"u1": frozenset("ab")}
    # The index shows u1 holding a: its admission to b is kept, even when the index lags
    # minutes behind (a second round must not take b's last slot meanwhile).
    assert gate.recent(indexed={"u1": {"a"}}) == {"u1": frozenset("b")}
    clock[0] += 300
    assert gate.recent(indexed={"u1": {"a"}}) == {"u1": frozenset("b")}
    assert gate.recent(indexed={"u1": {"a", "b"}}) == {}
    assert gate.recent(indexed={}) == {}  # forgotten once the index had it
    # A round that let a site go (done there), ended or was deleted frees its admissions.
    gate.record("u2", ["a", "b"])
    gate.settle("u2", holding=["b"])
    assert gate.recent(indexed={}) == {"u2": frozenset("b")}
    gate.settle("u2")
    assert gate.recent(indexed={}) == {}
    # A guard against leaks only: an admission the index never shows goes after 10 minutes.
    gate.record("u3", ["c"])
    clock[0] += AdmissionGate.LEAK_GUARD_SECONDS - 1
    assert gate.recent(indexed={}) == {"u3": frozenset("c")}
    clock[0] += 2
    assert gate.recent(indexed={}) == {}
