"""What a FederatedRound should do next: pure functions from (spec, status, observed world) to
(status, actions, events). No I/O; the act layer reads the world and carries out the actions.

The round moves through phases, each derived again on every pass from what the API server and
the object store hold (never from memory), so a restarted operator picks up where it was:

1. start: `status.startTime` and `deadlineTime` are fixed (from then on the spec is immutable);
2. input: the input checkpoint (round n-1 of the study's store) must exist; a prepare Job in
   the hub writes it (a fresh model, or an imported checkpoint re-signed by the hub);
3. admission: each candidate HospitalSite is admitted or excluded once, with the reason, and
   the result is kept in `status.sites` (fewer than `minSites` admitted fails the round);
4. training: one SiteTask per admitted site; each site's state follows its task; at the
   deadline an unfinished site is Dropped;
5. aggregation: when every admitted site finished, or at the deadline with `minSites` reports,
   the aggregator Job runs (with secure aggregation it runs from the start, since it relays
   the key exchange); fewer than `minSites` reports fail the round; a failed aggregator Job
   fails the round at once, with its cause in one line, whatever the sites are doing;
6. outcome: the aggregator's report and the new checkpoint's manifest fill the status; with
   secure aggregation the round ends as soon as the report exists and its contributors
   reported, so a site that dropped out of the exchange does not hold it to the deadline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final, Literal

from deeprad.core.protocol import AggregateReport, CheckpointManifest, ClinicalMetrics
from deeprad.operator.api.common import Metrics
from deeprad.operator.api.federatedround import (
    FederatedRoundSpec,
    FederatedRoundStatus,
    RoundState,
    RoundTimings,
    SiteRoundStatus,
    SiteState,
)
from deeprad.operator.api.names import MAX_SECAGG_SITES
from deeprad.operator.api.sitetask import TaskResult, TaskState
from deeprad.operator.decide.conditions import Desired, merge
from deeprad.operator.decide.sites import SiteView, admit
from deeprad.operator.decide.tenancy import (
    NAMESPACE_NOT_ALLOWED,
    namespace_allowed,
    namespace_refusal,
)
from deeprad.operator.decide.timeutil import parse_duration, parse_time, rfc3339

SITES_SCHEDULED: Final = "SitesScheduled"
TRAINING: Final = "Training"
AGGREGATING: Final = "Aggregating"
SUCCEEDED: Final = "Succeeded"
FAILED: Final = "Failed"
SITE_DONE: Final = (SiteState.REPORTED, SiteState.FAILED, SiteState.DROPPED,
                    SiteState.REJECTED, SiteState.EXCLUDED)
MESSAGE_LIMIT: Final = 1000  # a failed Job's cause, as one line of a condition


# ---- the observed world -----------------------------------------------------------------------


@dataclass(frozen=True)
class JobView:
    """A hub Job (prepare or aggregator) as observed; `message` explains a failure."""

    state: Literal["Running", "Succeeded", "Failed"]
    message: str = ""
    start_time: datetime | None = None
    completion_time: datetime | None = None

    @classmethod
    def failed(cls, reason: str, message: str, log_tail: str,
               start_time: datetime | None = None) -> JobView:
        """A failed Job whose `message` is its cause in one line: the last line its pod wrote
        (a Deep-Rad Job prints its error last, a crash its exception) and the Job's reason;
        the Job's own message when it ran out of time or its pod wrote nothing."""
        lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
        if lines and reason != "DeadlineExceeded":
            cause = f"{lines[-1]} ({reason})"
        else:
            cause = f"{reason}: {message}".strip(": ")
        return cls("Failed", cause[:MESSAGE_LIMIT], start_time=start_time)


@dataclass(frozen=True)
class TaskView:
    """A site's SiteTask for this round, as the site agent last reported it."""

    name: str
    state: TaskState | None = None
    message: str | None = None
    result: TaskResult | None = None
    completion_time: str | None = None
    reason: str | None = None  # the agent's CamelCase reason, e.g. PolicyViolation


@dataclass(frozen=True)
class StoreView:
    """What the object store holds for this round."""

    input_manifest: CheckpointManifest | None = None  # round n-1's global.json
    output_manifest: CheckpointManifest | None = None  # round n's global.json
    aggregate: AggregateReport | None = None  # round n's aggregate.json


@dataclass(frozen=True)
class RoundWorld:
    """Everything a pass looks at."""

    now: datetime
    created: datetime
    candidates: Sequence[SiteView]  # the HospitalSites this round may use
    namespace: str  # the round's: a site admits it only if its spec.studyNamespaces allows it
    tasks: Mapping[str, TaskView] = field(default_factory=dict)  # by site
    prepare: JobView | None = None
    aggregator: JobView | None = None
    store: StoreView = field(default_factory=StoreView)
    input_problem: str | None = None  # why spec.inputCheckpoint cannot be used, if it cannot


# ---- actions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrepareInput:
    """Run the hub Job that writes round n-1's checkpoint (fresh or imported)."""


@dataclass(frozen=True)
class CreateTasks:
    """Create SiteTasks for these admitted sites (they have none yet)."""

    sites: tuple[str, ...]
    parent_digest: str
    roster: tuple[str, ...]  # every admitted site (the secure-aggregation roster)


@dataclass(frozen=True)
class DeleteTasks:
    """Delete SiteTasks of sites that are not (or no longer) in the round."""

    names: tuple[tuple[str, str], ...]  # (site, task name)


@dataclass(frozen=True)
class Aggregate:
    """Run the aggregator Job over the reported sites (or the whole roster with secure
    aggregation, which finds its survivors itself)."""

    sites: tuple[str, ...]
    roster: tuple[str, ...]


@dataclass(frozen=True)
class MarkGone:
    """Secure aggregation: tell the aggregator these sites will send nothing more (their Job
    failed or they missed the deadline), so it stops waiting for them."""

    sites: tuple[str, ...]


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


Action = PrepareInput | CreateTasks | DeleteTasks | Aggregate | MarkGone


@dataclass
class RoundDecision:
    status: FederatedRoundStatus
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    finished: bool = False  # the round reached Succeeded or Failed in this pass


# ---- the decision -----------------------------------------------------------------------------


def decide_round(name: str, generation: int | None, spec: FederatedRoundSpec,
                 status: FederatedRoundStatus, world: RoundWorld) -> RoundDecision:
    """This pass's status, actions and events for round `name`: the phases in order, each
    either ending the pass or handing on to the next."""
    decision = RoundDecision(status.model_copy(deep=True))
    if decision.status.state and decision.status.state.terminal:
        return decision
    current = _start(name, generation, spec, world, decision)
    parent = world.store.input_manifest
    if parent is None:
        return _await_input(current)
    if not current.status.sites:
        refused = _admit_sites(current)
        if refused is not None:
            return refused
    progress = _follow_sites(current, parent.payload_sha256)
    aggregator = world.aggregator
    if aggregator is None:
        return _await_sites(current, progress)
    if current.secure and aggregator.state == "Running" and not (
            progress.all_done or current.past_deadline):
        return _training(current, f"{progress.summary}; the aggregator relays the "
                                  "secure-aggregation exchange")
    if current.secure and aggregator.state == "Succeeded" and not current.past_deadline \
            and _contributors_pending(progress, world.store.aggregate):
        return _training(current, f"{progress.summary}; aggregated, waiting for the "
                                  "contributors' reports")
    return _await_aggregate(current, progress, aggregator)


def hub_not_configured(status: FederatedRoundStatus, missing: Sequence[str],
                       generation: int | None, now: datetime) -> FederatedRoundStatus:
    """The status of a round this hub cannot run, naming the flags it was started without."""
    new = status.model_copy(deep=True)
    new.conditions = merge(status.conditions, [Desired.false(
        SITES_SCHEDULED, "HubNotConfigured",
        f"the hub operator runs without {', '.join(missing)}; it cannot run rounds")],
        generation, now)
    return new


@dataclass
class _Pass:
    """One pass over round `name`: what it looks at and the decision it builds."""

    name: str
    generation: int | None
    spec: FederatedRoundSpec
    world: RoundWorld
    decision: RoundDecision
    past_deadline: bool
    secure: bool  # secure aggregation: the aggregator runs from the start and relays

    @property
    def status(self) -> FederatedRoundStatus:
        return self.decision.status

    @property
    def now(self) -> datetime:
        return self.world.now

    def act(self, action: Action) -> None:
        self.decision.actions.append(action)

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.decision.events.append(Event(type_, reason, message))

    def set_conditions(self, *desired: Desired) -> None:
        self.status.conditions = merge(self.status.conditions, desired, self.generation,
                                       self.now)

    def fail(self, reason: str, message: str) -> RoundDecision:
        """End the round Failed for `reason`; `message` names the cause and the fix."""
        status = self.status
        status.state = RoundState.FAILED
        status.completion_time = rfc3339(self.now)
        self.set_conditions(
            Desired.false(TRAINING, reason, ""), Desired.false(AGGREGATING, reason, ""),
            Desired.false(SUCCEEDED, reason, ""), Desired.true(FAILED, reason, message))
        _finish_timings(status, self.world.created, self.now)
        self.event("Warning", reason, message)
        self.decision.finished = True
        return self.decision


@dataclass(frozen=True)
class _Progress:
    """Where the admitted sites stand once each has followed its task."""

    by_site: dict[str, SiteRoundStatus]  # every site of status.sites, admitted or not
    roster: tuple[str, ...]  # the admitted sites, sorted
    missing: tuple[str, ...]  # admitted sites that have no task yet
    reported: tuple[str, ...]
    all_done: bool  # every admitted site is in a final state

    @property
    def summary(self) -> str:
        return f"{len(self.reported)} of {len(self.roster)} site(s) reported"


def _start(name: str, generation: int | None, spec: FederatedRoundSpec, world: RoundWorld,
           decision: RoundDecision) -> _Pass:
    """Phase 1: the first pass fixes startTime and deadlineTime (the spec is immutable from
    then on)."""
    status = decision.status
    if status.start_time is None:
        status.start_time = rfc3339(world.now)
        status.deadline_time = rfc3339(world.now + parse_duration(
            spec.deadline, f"FederatedRound {name}: spec.deadline"))
    deadline = parse_time(status.deadline_time or status.start_time)
    return _Pass(name, generation, spec, world, decision, past_deadline=world.now >= deadline,
                 secure=spec.privacy.secure_aggregation)


def _await_input(current: _Pass) -> RoundDecision:
    """Phase 2: round n-1's checkpoint is not in the store yet. Run the prepare Job once; fail
    when the input cannot be used, the Job failed or the deadline passed."""
    world, name = current.world, current.name
    if world.input_problem:
        return current.fail("InvalidInputCheckpoint",
                            f"FederatedRound {name}: spec.inputCheckpoint: {world.input_problem}")
    if world.prepare is not None and world.prepare.state == "Failed":
        return current.fail("InputCheckpointFailed",
                            f"FederatedRound {name}: preparing the input checkpoint failed: "
                            f"{world.prepare.message}")
    if current.past_deadline:
        return current.fail("DeadlineExceeded", f"FederatedRound {name}: the input checkpoint "
                                                 "was not ready by the deadline")
    if world.prepare is None:
        current.act(PrepareInput())
    current.status.state = RoundState.SCHEDULING
    current.set_conditions(Desired.false(SITES_SCHEDULED, "PreparingInput",
                                         "writing the input checkpoint"))
    return current.decision


def _admit_sites(current: _Pass) -> RoundDecision | None:
    """Phase 3, once: admit or exclude each candidate, with the reason. The failed round when
    too few (or, with secure aggregation, too many) sites were admitted; else None."""
    admitted, excluded = _admit(current.spec, current.world)
    status, name, spec = current.status, current.name, current.spec
    status.sites = [SiteRoundStatus(site=s, state=SiteState.PENDING, reason="Admitted")
                    for s in admitted] + excluded
    status.admitted_sites = len(admitted)
    status.timings = RoundTimings(scheduling_seconds=_seconds(current.world.created,
                                                              current.now))
    if len(admitted) < spec.min_sites:
        why = "; ".join(f"{e.site}: {e.reason}" for e in excluded) or (
            f"no HospitalSite allows namespace {current.world.namespace} in its "
            "spec.studyNamespaces" if not spec.sites and current.world.candidates
            else "no candidate sites")
        return current.fail(
            "InsufficientSites",
            f"FederatedRound {name}: {len(admitted)} site(s) admitted, spec.minSites is "
            f"{spec.min_sites} ({why}); make more sites Ready or lower minSites")
    if current.secure and len(admitted) > MAX_SECAGG_SITES:
        return current.fail("TooManySites",
                            f"FederatedRound {name}: secure aggregation supports at most "
                            f"{MAX_SECAGG_SITES} sites, {len(admitted)} were admitted; list "
                            "fewer sites or turn it off")
    current.set_conditions(Desired.true(
        SITES_SCHEDULED, "SitesAdmitted",
        f"{len(admitted)} site(s) admitted, {len(excluded)} excluded"))
    current.event("Normal", "SitesScheduled",
                  f"admitted {', '.join(admitted)}"
                  + (f"; excluded {', '.join(e.site for e in excluded)}" if excluded else ""))
    return None


def _follow_sites(current: _Pass, parent_digest: str) -> _Progress:
    """Phase 4: exactly one task per admitted site (missing ones created before the deadline,
    strays deleted), each site's entry following its task; with secure aggregation the
    aggregator is told which sites just failed or dropped out."""
    status, tasks = current.status, current.world.tasks
    sites = status.sites or []
    by_site = {s.site: s for s in sites}
    roster = tuple(sorted(s.site for s in sites if s.state != SiteState.EXCLUDED))
    missing = tuple(s for s in roster if s not in tasks)
    if missing and not current.past_deadline:
        current.act(CreateTasks(missing, parent_digest, roster))
    stray = tuple((site, task.name) for site, task in sorted(tasks.items())
                  if site not in roster)
    if stray:
        current.act(DeleteTasks(stray))
    before = {site: by_site[site].state for site in roster}
    for site in roster:
        _follow_task(current, by_site[site], tasks.get(site))
    gone = tuple(s for s in roster if by_site[s].state in (SiteState.FAILED, SiteState.DROPPED)
                 and before[s] != by_site[s].state)
    if current.secure and gone:
        current.act(MarkGone(gone))
    status.sites = [by_site[s.site] for s in sites]
    reported = tuple(s for s in roster if by_site[s].state == SiteState.REPORTED)
    status.reported_sites = len(reported)
    return _Progress(by_site, roster, missing, reported,
                     all_done=all(by_site[s].state in SITE_DONE for s in roster))


def _follow_task(current: _Pass, entry: SiteRoundStatus, task: TaskView | None) -> None:
    """Update one admitted site's entry from its task; Dropped at the deadline."""
    if entry.state in (SiteState.REPORTED, SiteState.FAILED, SiteState.DROPPED,
                       SiteState.REJECTED):
        return
    if task is not None:
        entry.task = task.name
        if task.state == TaskState.SUCCEEDED and task.result is not None:
            result = task.result
            entry.state, entry.reason = SiteState.REPORTED, "UpdateUploaded"
            entry.samples, entry.update_digest = result.samples, result.update_digest
            entry.metrics, entry.epsilon = result.local_metrics, result.epsilon
            entry.report_time = task.completion_time or rfc3339(current.now)
            entry.message = None
            return
        if task.state == TaskState.FAILED:
            entry.state, entry.reason = SiteState.FAILED, task.reason or "TaskFailed"
            entry.message = (task.message or "the site's training Job failed")[:4000]
            current.event("Warning", "SiteFailed", f"site {entry.site}: {entry.message[:500]}")
            return
        if task.state in (TaskState.ACCEPTED, TaskState.RUNNING):
            entry.state, entry.reason = SiteState.TRAINING, "JobRunning"
    if current.past_deadline:
        entry.state, entry.reason = SiteState.DROPPED, "DeadlineExceeded"
        entry.message = "no report by the round's deadline"
        current.event("Warning", "SiteDropped",
                      f"site {entry.site} did not report by the deadline")


def _await_sites(current: _Pass, progress: _Progress) -> RoundDecision:
    """Phase 5, no aggregator yet: start it when every site finished or at the deadline (with
    secure aggregation as soon as every task exists, since it relays the key exchange); fail
    when fewer than minSites reported."""
    reported, roster = progress.reported, progress.roster
    if current.secure and not progress.missing:
        current.act(Aggregate(roster, roster))
    elif not current.secure and (progress.all_done or current.past_deadline):
        if len(reported) < current.spec.min_sites:
            return current.fail("QuorumNotMet", _quorum_message(
                current.name, current.spec, progress.by_site, roster))
        current.act(Aggregate(reported, roster))
        current.status.aggregation_start_time = rfc3339(current.now)
        current.event("Normal", "AggregationStarted", f"aggregating {len(reported)} update(s)")
    return _training(current, progress.summary)


def _training(current: _Pass, message: str) -> RoundDecision:
    """The round trains: Training is True with `message`, Aggregating waits for the sites."""
    current.status.state = RoundState.TRAINING
    current.set_conditions(Desired.true(TRAINING, "SitesTraining", message),
                           Desired.false(AGGREGATING, "WaitingForSites", ""))
    return current.decision


def _contributors_pending(progress: _Progress, report: AggregateReport | None) -> bool:
    """Whether a contributor of the secure aggregate has yet to report its task's result (its
    samples, metrics and ε), which the round's status keeps per site."""
    if report is None:
        return False
    return any(progress.by_site[c.site].state not in SITE_DONE
               for c in report.contributors if c.site in progress.by_site)


def _await_aggregate(current: _Pass, progress: _Progress, aggregator: JobView
                     ) -> RoundDecision:
    """Phase 5, the aggregator running: wait for its report and checkpoint; fail when the Job
    failed or succeeded without writing them."""
    status, name = current.status, current.name
    if status.aggregation_start_time is None:
        status.aggregation_start_time = rfc3339(current.now)
    if aggregator.state == "Failed":
        return current.fail("AggregationFailed", f"FederatedRound {name}: the aggregator Job "
                                                  f"failed: {aggregator.message}")
    report, output = current.world.store.aggregate, current.world.store.output_manifest
    if aggregator.state == "Succeeded" and report is not None and output is not None:
        return _succeed(current, progress.by_site, report, output)
    if aggregator.state == "Succeeded":
        return current.fail("AggregationFailed", f"FederatedRound {name}: the aggregator Job "
                                                  "succeeded but wrote no "
                                                  "aggregate.json/global.json")
    status.state = RoundState.AGGREGATING
    current.set_conditions(Desired.false(TRAINING, "SitesDone", progress.summary),
                           Desired.true(AGGREGATING, "AggregatorRunning",
                                        "the aggregator Job runs"))
    return current.decision


def _admit(spec: FederatedRoundSpec, world: RoundWorld
           ) -> tuple[list[str], list[SiteRoundStatus]]:
    """Admitted site names (sorted) and the excluded sites with their reasons. A site named in
    spec.sites that does not exist, or does not allow the round's namespace, is excluded too;
    without spec.sites, only the sites that allow the namespace are candidates at all."""
    views = {v.name: v for v in world.candidates}
    names = sorted(spec.sites) if spec.sites else sorted(
        name for name, view in views.items()
        if namespace_allowed(view.spec.study_namespaces, world.namespace))
    admitted: list[str] = []
    excluded: list[SiteRoundStatus] = []
    for site in names:
        view = views.get(site)
        if view is None:
            excluded.append(SiteRoundStatus(
                site=site, state=SiteState.EXCLUDED, reason="NotFound",
                message=f"HospitalSite {site} does not exist"))
            continue
        if not namespace_allowed(view.spec.study_namespaces, world.namespace):
            excluded.append(SiteRoundStatus(
                site=site, state=SiteState.EXCLUDED, reason=NAMESPACE_NOT_ALLOWED,
                message=namespace_refusal(site, view.spec.study_namespaces, world.namespace)))
            continue
        verdict = admit(view, spec.data, world.now)
        if verdict.admitted and spec.privacy.secure_aggregation and view.spec.data is None:
            excluded.append(SiteRoundStatus(
                site=site, state=SiteState.EXCLUDED, reason="SampleCountUnknown",
                message=f"HospitalSite {site}: secure aggregation weights each site by its "
                        "declared spec.data.sampleCount, which is not set; declare it"))
        elif verdict.admitted:
            admitted.append(site)
        else:
            excluded.append(SiteRoundStatus(site=site, state=SiteState.EXCLUDED,
                                            reason=verdict.reason, message=verdict.message))
    return admitted, excluded


def _quorum_message(name: str, spec: FederatedRoundSpec, by_site: Mapping[str, SiteRoundStatus],
                    roster: Sequence[str]) -> str:
    parts = [f"{s}: {by_site[s].state.value}" + (f" ({by_site[s].message})"
                                                  if by_site[s].message else "")
             for s in roster if by_site[s].state != SiteState.REPORTED]
    reported = sum(1 for s in roster if by_site[s].state == SiteState.REPORTED)
    return (f"FederatedRound {name}: {reported} site(s) reported, spec.minSites is "
            f"{spec.min_sites}; " + "; ".join(parts))[:4000]


def _succeed(current: _Pass, by_site: dict[str, SiteRoundStatus], report: AggregateReport,
             output: CheckpointManifest) -> RoundDecision:
    """Phase 6: the aggregator's report and the new checkpoint's manifest fill the status."""
    status, now = current.status, current.now
    contributors = _apply_report(current, by_site, report)
    status.sites = list(by_site.values())
    status.reported_sites = len(contributors)
    status.rejected_sites = len(report.rejected)
    status.input_metrics = to_metrics(report.federated_metrics)
    status.epsilon = (report.privacy.epsilon_round if report.privacy
                      else _max_epsilon(status.sites))
    status.state = RoundState.SUCCEEDED
    status.completion_time = rfc3339(now)
    _finish_timings(status, current.world.created, now)
    message = (f"{len(contributors)} update(s) aggregated by {report.strategy.name}; "
               f"checkpoint {output.payload_sha256[:12]}")
    current.set_conditions(
        Desired.false(TRAINING, "RoundSucceeded", ""),
        Desired.false(AGGREGATING, "RoundSucceeded", ""),
        Desired.true(SUCCEEDED, "RoundSucceeded", message),
        Desired.false(FAILED, "RoundSucceeded", ""))
    current.event("Normal", "RoundSucceeded", message)
    current.decision.finished = True
    return current.decision


def _apply_report(current: _Pass, by_site: dict[str, SiteRoundStatus], report: AggregateReport
                  ) -> set[str]:
    """Each site's entry from the aggregator's verdict: rejected updates, secure-aggregation
    dropouts, contributors. Returns the contributors."""
    for rejection in report.rejected:
        entry = by_site.get(rejection.site)
        if entry is not None:
            entry.state, entry.reason = SiteState.REJECTED, "UpdateRejected"
            entry.message = rejection.reason[:4000]
            current.event("Warning", "UpdateRejected",
                          f"site {rejection.site}: {rejection.reason[:500]}")
    if report.secagg is not None:
        for site, why in [*((s, "shared its keys, then sent no masked update in the "
                                "secure-aggregation exchange") for s in report.secagg.dropped),
                          *((s, "did not take part in the secure-aggregation exchange")
                            for s in report.secagg.not_joined)]:
            entry = by_site.get(site)
            if entry is not None and entry.state not in (SiteState.FAILED, SiteState.REJECTED,
                                                         SiteState.DROPPED):
                entry.state, entry.reason = SiteState.DROPPED, "SecureAggregationDropout"
                entry.message = why
    contributors = {c.site for c in report.contributors}
    for site in contributors:
        entry = by_site.get(site)
        if entry is not None and entry.state != SiteState.REPORTED:
            entry.state, entry.reason = SiteState.REPORTED, "UpdateAggregated"
    return contributors


def to_metrics(measured: ClinicalMetrics | None) -> Metrics | None:
    """The core's metrics as the API's (fractions clamped into [0, 1] against rounding)."""
    if measured is None:
        return None

    def frac(value: float | None) -> float | None:
        return None if value is None else min(1.0, max(0.0, float(value)))

    return Metrics(n=measured.n, positives=measured.positives, loss=measured.loss,
                   auroc=frac(measured.auroc), sensitivity=frac(measured.sensitivity),
                   specificity=frac(measured.specificity), accuracy=frac(measured.accuracy))


def _max_epsilon(sites: Sequence[SiteRoundStatus] | None) -> float | None:
    values = [s.epsilon for s in sites or () if s.epsilon is not None]
    return max(values) if values else None


def _seconds(start: datetime, end: datetime) -> float:
    return max(0.0, (end - start).total_seconds())


def _finish_timings(status: FederatedRoundStatus, created: datetime, now: datetime) -> None:
    timings = status.timings or RoundTimings()
    if status.aggregation_start_time:
        aggregation_start = parse_time(status.aggregation_start_time)
        timings.aggregation_seconds = _seconds(aggregation_start, now)
        scheduled = created + timedelta(seconds=timings.scheduling_seconds or 0.0)
        timings.training_seconds = _seconds(scheduled, aggregation_start)
    timings.total_seconds = _seconds(created, now)
    status.timings = timings
