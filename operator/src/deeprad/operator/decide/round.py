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
   the key exchange); fewer than `minSites` reports fail the round;
6. outcome: the aggregator's report and the new checkpoint's manifest fill the status.
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
from deeprad.operator.decide.timeutil import parse_duration, parse_time, rfc3339

SITES_SCHEDULED: Final = "SitesScheduled"
TRAINING: Final = "Training"
AGGREGATING: Final = "Aggregating"
SUCCEEDED: Final = "Succeeded"
FAILED: Final = "Failed"
SITE_DONE: Final = (SiteState.REPORTED, SiteState.FAILED, SiteState.DROPPED,
                    SiteState.REJECTED, SiteState.EXCLUDED)


# ---- the observed world -----------------------------------------------------------------------


@dataclass(frozen=True)
class JobView:
    """A hub Job (prepare or aggregator) as observed; `message` explains a failure."""

    state: Literal["Running", "Succeeded", "Failed"]
    message: str = ""
    start_time: datetime | None = None
    completion_time: datetime | None = None


@dataclass(frozen=True)
class TaskView:
    """A site's SiteTask for this round, as the site agent last reported it."""

    name: str
    state: TaskState | None = None
    message: str | None = None
    result: TaskResult | None = None
    completion_time: str | None = None


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
    """This pass's status, actions and events for round `name`."""
    st = status.model_copy(deep=True)
    out = RoundDecision(st)
    if st.state and st.state.terminal:
        return out
    now = world.now
    if st.start_time is None:
        st.start_time = rfc3339(now)
        st.deadline_time = rfc3339(now + parse_duration(
            spec.deadline, f"FederatedRound {name}: spec.deadline"))
    deadline = parse_time(st.deadline_time or st.start_time)
    past_deadline = now >= deadline
    secagg = spec.privacy.secure_aggregation

    def fail(reason: str, message: str) -> RoundDecision:
        st.state = RoundState.FAILED
        st.completion_time = rfc3339(now)
        st.conditions = merge(st.conditions, [
            Desired.false(TRAINING, reason, ""), Desired.false(AGGREGATING, reason, ""),
            Desired.false(SUCCEEDED, reason, ""), Desired.true(FAILED, reason, message)],
            generation, now)
        _finish_timings(st, world.created, now)
        out.events.append(Event("Warning", reason, message))
        out.finished = True
        return out

    # 2. input checkpoint
    parent = world.store.input_manifest
    if parent is None:
        if world.input_problem:
            return fail("InvalidInputCheckpoint", f"FederatedRound {name}: "
                                                  f"spec.inputCheckpoint: {world.input_problem}")
        if world.prepare is not None and world.prepare.state == "Failed":
            return fail("InputCheckpointFailed", f"FederatedRound {name}: preparing the input "
                                                 f"checkpoint failed: {world.prepare.message}")
        if past_deadline:
            return fail("DeadlineExceeded", f"FederatedRound {name}: the input checkpoint was "
                                            "not ready by the deadline")
        if world.prepare is None:
            out.actions.append(PrepareInput())
        st.state = RoundState.SCHEDULING
        st.conditions = merge(st.conditions, [Desired.false(
            SITES_SCHEDULED, "PreparingInput", "writing the input checkpoint")], generation, now)
        return out

    # 3. admission, once
    if not st.sites:
        admitted, excluded = _admit(spec, world)
        st.sites = [SiteRoundStatus(site=s, state=SiteState.PENDING, reason="Admitted")
                    for s in admitted] + excluded
        st.admitted_sites = len(admitted)
        st.timings = RoundTimings(scheduling_seconds=_seconds(world.created, now))
        if len(admitted) < spec.min_sites:
            why = "; ".join(f"{e.site}: {e.reason}" for e in excluded) or "no candidate sites"
            return fail("InsufficientSites",
                        f"FederatedRound {name}: {len(admitted)} site(s) admitted, spec.minSites "
                        f"is {spec.min_sites} ({why}); make more sites Ready or lower minSites")
        if secagg and len(admitted) > MAX_SECAGG_SITES:
            return fail("TooManySites", f"FederatedRound {name}: secure aggregation supports at "
                                        f"most {MAX_SECAGG_SITES} sites, {len(admitted)} were "
                                        "admitted; list fewer sites or turn it off")
        st.conditions = merge(st.conditions, [Desired.true(
            SITES_SCHEDULED, "SitesAdmitted",
            f"{len(admitted)} site(s) admitted, {len(excluded)} excluded")], generation, now)
        out.events.append(Event("Normal", "SitesScheduled",
                                f"admitted {', '.join(admitted)}" + (
                                    f"; excluded {', '.join(e.site for e in excluded)}"
                                    if excluded else "")))
    by_site = {s.site: s for s in st.sites}
    roster = tuple(sorted(s.site for s in st.sites if s.state != SiteState.EXCLUDED))

    # 4. tasks: exactly one per admitted site
    missing = tuple(s for s in roster if s not in world.tasks)
    if missing and not past_deadline:
        out.actions.append(CreateTasks(missing, parent.payload_sha256, roster))
    stray = tuple((site, t.name) for site, t in sorted(world.tasks.items())
                  if site not in roster)
    if stray:
        out.actions.append(DeleteTasks(stray))
    before = {site: by_site[site].state for site in roster}
    for site in roster:
        _follow_task(by_site[site], world.tasks.get(site), past_deadline, now, out)
    gone = tuple(s for s in roster if by_site[s].state in (SiteState.FAILED, SiteState.DROPPED)
                 and before[s] != by_site[s].state)
    if secagg and gone:
        out.actions.append(MarkGone(gone))
    st.sites = [by_site[s.site] for s in st.sites]
    reported = tuple(s for s in roster if by_site[s].state == SiteState.REPORTED)
    st.reported_sites = len(reported)
    all_done = all(by_site[s].state in SITE_DONE for s in roster)

    # 5. aggregation
    agg = world.aggregator
    if agg is None:
        if secagg and not missing:
            out.actions.append(Aggregate(roster, roster))
        elif not secagg and (all_done or past_deadline):
            if len(reported) < spec.min_sites:
                return fail("QuorumNotMet", _quorum_message(name, spec, by_site, roster))
            out.actions.append(Aggregate(reported, roster))
            st.aggregation_start_time = rfc3339(now)
            out.events.append(Event("Normal", "AggregationStarted",
                                    f"aggregating {len(reported)} update(s)"))
        st.state = RoundState.TRAINING
        st.conditions = merge(st.conditions, [
            Desired.true(TRAINING, "SitesTraining",
                         f"{len(reported)} of {len(roster)} site(s) reported"),
            Desired.false(AGGREGATING, "WaitingForSites", "")], generation, now)
        return out
    if secagg and not (all_done or past_deadline):
        st.state = RoundState.TRAINING
        st.conditions = merge(st.conditions, [
            Desired.true(TRAINING, "SitesTraining",
                         f"{len(reported)} of {len(roster)} site(s) reported; the aggregator "
                         "relays the secure-aggregation exchange"),
            Desired.false(AGGREGATING, "WaitingForSites", "")], generation, now)
        return out
    if st.aggregation_start_time is None:
        st.aggregation_start_time = rfc3339(now)
    if agg.state == "Failed":
        return fail("AggregationFailed", f"FederatedRound {name}: the aggregator Job failed: "
                                         f"{agg.message}")
    report, output = world.store.aggregate, world.store.output_manifest
    if agg.state == "Running" or report is None or output is None:
        if agg.state == "Succeeded":
            return fail("AggregationFailed", f"FederatedRound {name}: the aggregator Job "
                                             "succeeded but wrote no aggregate.json/global.json")
        st.state = RoundState.AGGREGATING
        st.conditions = merge(st.conditions, [
            Desired.false(TRAINING, "SitesDone",
                          f"{len(reported)} of {len(roster)} site(s) reported"),
            Desired.true(AGGREGATING, "AggregatorRunning", "the aggregator Job runs")],
            generation, now)
        return out
    return _succeed(name, generation, spec, st, report, output, by_site, world, out)


def _admit(spec: FederatedRoundSpec, world: RoundWorld
           ) -> tuple[list[str], list[SiteRoundStatus]]:
    """Admitted site names (sorted) and the excluded sites with their reasons. A site named in
    spec.sites that does not exist is excluded too."""
    views = {v.name: v for v in world.candidates}
    names = sorted(spec.sites) if spec.sites else sorted(views)
    admitted: list[str] = []
    excluded: list[SiteRoundStatus] = []
    for site in names:
        view = views.get(site)
        if view is None:
            excluded.append(SiteRoundStatus(
                site=site, state=SiteState.EXCLUDED, reason="NotFound",
                message=f"HospitalSite {site} does not exist"))
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


def _follow_task(entry: SiteRoundStatus, task: TaskView | None, past_deadline: bool,
                 now: datetime, out: RoundDecision) -> None:
    """Update one admitted site's entry from its task; Dropped at the deadline."""
    if entry.state in (SiteState.REPORTED, SiteState.FAILED, SiteState.DROPPED,
                       SiteState.REJECTED):
        return
    if task is not None:
        entry.task = task.name
        if task.state == TaskState.SUCCEEDED and task.result is not None:
            r = task.result
            entry.state, entry.reason = SiteState.REPORTED, "UpdateUploaded"
            entry.samples, entry.update_digest = r.samples, r.update_digest
            entry.metrics, entry.epsilon = r.local_metrics, r.epsilon
            entry.report_time = task.completion_time or rfc3339(now)
            entry.message = None
            return
        if task.state == TaskState.FAILED:
            entry.state, entry.reason = SiteState.FAILED, "TaskFailed"
            entry.message = (task.message or "the site's training Job failed")[:4000]
            out.events.append(Event("Warning", "SiteFailed",
                                    f"site {entry.site}: {entry.message[:500]}"))
            return
        if task.state in (TaskState.ACCEPTED, TaskState.RUNNING):
            entry.state, entry.reason = SiteState.TRAINING, "JobRunning"
    if past_deadline:
        entry.state, entry.reason = SiteState.DROPPED, "DeadlineExceeded"
        entry.message = "no report by the round's deadline"
        out.events.append(Event("Warning", "SiteDropped",
                                f"site {entry.site} did not report by the deadline"))


def _quorum_message(name: str, spec: FederatedRoundSpec, by_site: Mapping[str, SiteRoundStatus],
                    roster: Sequence[str]) -> str:
    parts = [f"{s}: {by_site[s].state.value}" + (f" ({by_site[s].message})"
                                                  if by_site[s].message else "")
             for s in roster if by_site[s].state != SiteState.REPORTED]
    reported = sum(1 for s in roster if by_site[s].state == SiteState.REPORTED)
    return (f"FederatedRound {name}: {reported} site(s) reported, spec.minSites is "
            f"{spec.min_sites}; " + "; ".join(parts))[:4000]


def _succeed(name: str, generation: int | None, spec: FederatedRoundSpec,
             st: FederatedRoundStatus, report: AggregateReport, output: CheckpointManifest,
             by_site: dict[str, SiteRoundStatus], world: RoundWorld,
             out: RoundDecision) -> RoundDecision:
    now = world.now
    contributors = {c.site for c in report.contributors}
    for rej in report.rejected:
        entry = by_site.get(rej.site)
        if entry is not None:
            entry.state, entry.reason = SiteState.REJECTED, "UpdateRejected"
            entry.message = rej.reason[:4000]
            out.events.append(Event("Warning", "UpdateRejected",
                                    f"site {rej.site}: {rej.reason[:500]}"))
    if report.secagg is not None:
        for site in report.secagg.dropped + report.secagg.not_joined:
            entry = by_site.get(site)
            if entry is not None and entry.state not in (SiteState.FAILED, SiteState.REJECTED):
                entry.state, entry.reason = SiteState.DROPPED, "SecureAggregationDropout"
                entry.message = "no masked update in the secure-aggregation exchange"
    for site in contributors:
        entry = by_site.get(site)
        if entry is not None and entry.state != SiteState.REPORTED:
            entry.state, entry.reason = SiteState.REPORTED, "UpdateAggregated"
    st.sites = list(by_site.values())
    st.reported_sites = len(contributors)
    st.rejected_sites = len(report.rejected)
    st.input_metrics = to_metrics(report.federated_metrics)
    st.epsilon = report.privacy.epsilon_round if report.privacy else _max_epsilon(st.sites)
    st.state = RoundState.SUCCEEDED
    st.completion_time = rfc3339(now)
    _finish_timings(st, world.created, now)
    message = (f"{len(contributors)} update(s) aggregated by {report.strategy.name}; "
               f"checkpoint {output.payload_sha256[:12]}")
    st.conditions = merge(st.conditions, [
        Desired.false(TRAINING, "RoundSucceeded", ""),
        Desired.false(AGGREGATING, "RoundSucceeded", ""),
        Desired.true(SUCCEEDED, "RoundSucceeded", message),
        Desired.false(FAILED, "RoundSucceeded", "")], generation, now)
    out.events.append(Event("Normal", "RoundSucceeded", message))
    out.finished = True
    return out


def to_metrics(m: ClinicalMetrics | None) -> Metrics | None:
    """The core's metrics as the API's (fractions clamped into [0, 1] against rounding)."""
    if m is None:
        return None

    def frac(v: float | None) -> float | None:
        return None if v is None else min(1.0, max(0.0, float(v)))

    return Metrics(n=m.n, positives=m.positives, loss=m.loss, auroc=frac(m.auroc),
                   sensitivity=frac(m.sensitivity), specificity=frac(m.specificity),
                   accuracy=frac(m.accuracy))


def _max_epsilon(sites: Sequence[SiteRoundStatus] | None) -> float | None:
    values = [s.epsilon for s in sites or () if s.epsilon is not None]
    return max(values) if values else None


def _seconds(start: datetime, end: datetime) -> float:
    return max(0.0, (end - start).total_seconds())


def _finish_timings(st: FederatedRoundStatus, created: datetime, now: datetime) -> None:
    t = st.timings or RoundTimings()
    if st.aggregation_start_time:
        agg_start = parse_time(st.aggregation_start_time)
        t.aggregation_seconds = _seconds(agg_start, now)
        sched = created + timedelta(seconds=t.scheduling_seconds or 0.0)
        t.training_seconds = _seconds(sched, agg_start)
    t.total_seconds = _seconds(created, now)
    st.timings = t
