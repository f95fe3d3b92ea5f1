"""What a FederatedRound should do next: pure functions from (spec, status, observed world) to
(status, actions, events). No I/O; the act layer reads the world and carries out the actions.

The round moves through phases, each derived again on every pass from what the API server and
the object store hold (never from memory), so a restarted operator picks up where it was:

1. admission: each candidate HospitalSite is admissible, waiting (a reason that can clear by
   itself, or other rounds ahead of this one in `decide.queue`'s order) or excluded. With
   fewer than `minSites` admissible the round is Queued, each site's reason in `status.sites`,
   up to spec.admissionTimeout from `status.queuedSince`; it fails InsufficientSites at that
   timeout, or at once when the sites that could ever be admitted are too few;
2. start: at admission `status.startTime` and `deadlineTime` are fixed (from then on the spec
   is immutable), so time spent Queued does not eat into the deadline;
3. input: the input checkpoint (round n-1 of the study's store) must exist; a prepare Job in
   the hub writes it (a fresh model, or an imported checkpoint re-signed by the hub). It runs
   after admission: it reads a spec that is still editable while the round waits, and a queue
   of waiting rounds then costs the hub no Jobs;
4. training: one SiteTask per admitted site; each site's state follows its task; at the
   deadline an unfinished site is Dropped;
5. aggregation: when every admitted site finished, or at the deadline with `minSites` reports,
   the aggregator Job runs (with secure aggregation it runs from the start, since it relays
   the key exchange); fewer than `minSites` reports fail the round; a failed aggregator Job
   fails the round at once, with its cause in one line, whatever the sites are doing;
6. outcome: the aggregator's report and the new checkpoint's manifest fill the status; with
   secure aggregation the round ends as soon as the report exists and its contributors
   reported, so a site that dropped out of the exchange does not hold it to the deadline.

An evaluation round (spec.mode: evaluate, a study's last) runs the same phases, but its sites
only score the input checkpoint on held-out data and upload nothing: there is no exchange, and
the aggregator Job, started once the sites reported, pools their scores (exact pooling needs
the metrics code, which lives beside torch and so never in the operator) and writes no
checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Final, Literal

from deeprad.core.protocol import AggregateReport, CheckpointManifest, ClinicalMetrics
from deeprad.operator.api.common import FP_PER_SCAN, DataSelector, Metrics, RoundMode
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
from deeprad.operator.decide.queue import (
    AVAILABLE,
    QUEUED_BEHIND,
    TRANSIENT,
    OpenSites,
    QueuedRound,
    queued_behind,
    waiting_summary,
)
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
ANY_DATA: Final = DataSelector()  # a site open to any round (each round's data is its own)


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
    # Other rounds waiting for sites, by the site they want (`decide.queue` orders them).
    queue: Mapping[str, Sequence[QueuedRound]] = field(default_factory=dict)


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
    current = _pass(name, generation, spec, world, decision)
    if current.status.start_time is None or not current.status.sites:
        waiting = _admit_sites(current)
        if waiting is not None:
            return waiting
    parent = world.store.input_manifest
    if parent is None:
        return _await_input(current)
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


def _pass(name: str, generation: int | None, spec: FederatedRoundSpec, world: RoundWorld,
          decision: RoundDecision) -> _Pass:
    """This pass over the round; its deadline passes only once the round has started."""
    status = decision.status
    started = status.deadline_time or status.start_time
    # An evaluation round exchanges nothing: its sites upload no update, so the aggregator
    # runs only once they reported, to pool their scores.
    return _Pass(name, generation, spec, world, decision,
                 past_deadline=started is not None and world.now >= parse_time(started),
                 secure=spec.privacy.secure_aggregation and spec.mode == RoundMode.TRAIN)


def _start(current: _Pass) -> None:
    """Phase 2, at admission: fix startTime and deadlineTime (the spec is immutable from then
    on); a round that started before it was admitted keeps its times."""
    status = current.status
    if status.start_time is None:
        status.start_time = rfc3339(current.now)
        status.deadline_time = rfc3339(current.now + parse_duration(
            current.spec.deadline, f"FederatedRound {current.name}: spec.deadline"))
    current.past_deadline = current.now >= parse_time(status.deadline_time
                                                      or status.start_time)


def _await_input(current: _Pass) -> RoundDecision:
    """Phase 3: round n-1's checkpoint is not in the store yet. Run the prepare Job once; fail
    when the input cannot be used, the Job failed or the deadline passed. The sites are
    admitted already (SitesScheduled stays True): training waits for the input."""
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
    current.set_conditions(Desired.false(TRAINING, "PreparingInput",
                                         "writing the input checkpoint"))
    return current.decision


def _admit_sites(current: _Pass) -> RoundDecision | None:
    """Phase 1: admit the round once minSites sites are admissible (None: go on), or keep it
    Queued saying why each site is not, or fail it: at once when waiting cannot help, at
    spec.admissionTimeout otherwise, or with too many sites for secure aggregation."""
    world, status, name, spec = current.world, current.status, current.name, current.spec
    if world.input_problem:
        return current.fail("InvalidInputCheckpoint",
                            f"FederatedRound {name}: spec.inputCheckpoint: {world.input_problem}")
    since = parse_time(status.queued_since) if status.queued_since else current.now
    me = QueuedRound(f"{world.namespace}/{name}", spec.priority, since, world.created,
                     spec.min_sites)
    available, waiting, excluded = _admit(spec, world, me)
    refused = [*waiting, *excluded]
    if len(available) >= spec.min_sites:
        return _admitted(current, available, refused)
    why = "; ".join(f"{e.site}: {e.reason}" for e in refused) or (
        f"no HospitalSite allows namespace {world.namespace} in its spec.studyNamespaces"
        if not spec.sites and world.candidates else "no candidate sites")
    shortfall = (f"FederatedRound {name}: {len(available)} site(s) admissible, spec.minSites "
                 f"is {spec.min_sites} ({why})")
    if len(available) + len(waiting) < spec.min_sites:
        status.sites = _entries(available, refused, SiteState.EXCLUDED)
        return current.fail("InsufficientSites", f"{shortfall}; waiting cannot help: fix the "
                                                 "sites' reasons or lower minSites")
    timeout = parse_duration(spec.admission_timeout,
                             f"FederatedRound {name}: spec.admissionTimeout")
    if current.now >= since + timeout:
        status.sites = _entries(available, refused, SiteState.EXCLUDED)
        return current.fail("InsufficientSites", f"{shortfall}; still short after "
                                                 f"spec.admissionTimeout {spec.admission_timeout}"
                                                 "; make more sites Ready or lower minSites")
    return _queued(current, since, timeout, available, waiting, excluded)


def _entries(available: Sequence[str], refused: Sequence[SiteRoundStatus], state: SiteState
             ) -> list[SiteRoundStatus]:
    """status.sites of a round not admitted: the available sites in `state` (with the refused
    ones as they are), or every site Excluded once the round failed."""
    entries = [SiteRoundStatus(site=s, state=state, reason=AVAILABLE,
                               message=f"HospitalSite {s}: admissible") for s in available]
    for entry in refused:
        if state == SiteState.EXCLUDED and entry.state == SiteState.WAITING:
            entry = entry.model_copy(update={"state": SiteState.EXCLUDED})
        entries.append(entry)
    return sorted(entries, key=lambda e: e.site)


def _queued(current: _Pass, since: datetime, timeout: timedelta, available: Sequence[str],
            waiting: Sequence[SiteRoundStatus], excluded: Sequence[SiteRoundStatus]
            ) -> RoundDecision:
    """The round waits for sites: Queued, each site's reason in status.sites and the refused
    ones summed up in status.waitingFor."""
    status, spec = current.status, current.spec
    refused = [*waiting, *excluded]
    if status.state != RoundState.QUEUED:
        current.event("Normal", "Queued",
                      f"{len(available)} of spec.minSites {spec.min_sites} site(s) "
                      f"admissible; waiting up to spec.admissionTimeout "
                      f"{spec.admission_timeout}")
    status.state = RoundState.QUEUED
    status.queued_since = rfc3339(since)
    status.sites = _entries(available, refused, SiteState.WAITING)
    status.waiting_for = waiting_summary(sorted((e.site, e.reason or "") for e in refused))
    reasons = "; ".join(f"{e.site}: {e.reason}" for e in refused)
    current.set_conditions(Desired.false(
        SITES_SCHEDULED, "WaitingForSites",
        f"{len(available)} site(s) admissible, spec.minSites is {spec.min_sites} ({reasons}); "
        f"waiting until {rfc3339(since + timeout)} (spec.admissionTimeout "
        f"{spec.admission_timeout})"[:MESSAGE_LIMIT]))
    return current.decision


def _admitted(current: _Pass, admitted: Sequence[str], refused: Sequence[SiteRoundStatus]
              ) -> RoundDecision | None:
    """The round is admitted with these sites (the refused ones are excluded, with their
    reasons) and starts; None, or the failed round with too many sites for secure
    aggregation."""
    status, name = current.status, current.name
    if current.secure and len(admitted) > MAX_SECAGG_SITES:
        status.sites = _entries(admitted, refused, SiteState.EXCLUDED)
        return current.fail("TooManySites",
                            f"FederatedRound {name}: secure aggregation supports at most "
                            f"{MAX_SECAGG_SITES} sites, {len(admitted)} were admitted; list "
                            "fewer sites or turn it off")
    excluded = [e.model_copy(update={"state": SiteState.EXCLUDED}) for e in refused]
    status.sites = sorted([SiteRoundStatus(site=s, state=SiteState.PENDING, reason="Admitted")
                           for s in admitted] + excluded, key=lambda e: e.site)
    status.admitted_sites = len(admitted)
    if status.waiting_for is not None:
        status.waiting_for = ""  # a status patch cannot drop the field; empty clears the column
    status.timings = RoundTimings(scheduling_seconds=_seconds(current.world.created,
                                                              current.now))
    _start(current)
    current.status.state = RoundState.SCHEDULING
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
    """Update one admitted site's entry from its task (Queued while its Job waits at the
    hospital, Training while it runs); Dropped at the deadline."""
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
            if current.spec.mode == RoundMode.EVALUATE:
                entry.reason, entry.metrics = "ModelEvaluated", result.global_metrics
                entry.test_metrics, entry.test_split = result.test_metrics, result.test_split
            entry.report_time = task.completion_time or rfc3339(current.now)
            entry.message = None
            return
        if task.state == TaskState.FAILED:
            entry.state, entry.reason = SiteState.FAILED, task.reason or "TaskFailed"
            entry.message = (task.message or "the site's training Job failed")[:4000]
            current.event("Warning", "SiteFailed", f"site {entry.site}: {entry.message[:500]}")
            return
        if task.state == TaskState.QUEUED:
            # The Job waits at the hospital (its Kueue LocalQueue, or a pod the scheduler
            # cannot place); the deadline still applies, as below.
            entry.state, entry.reason = SiteState.QUEUED, task.reason or "JobQueued"
            entry.message = (task.message or "the site's training Job waits to run")[:4000]
        elif task.state in (TaskState.ACCEPTED, TaskState.RUNNING):
            entry.state, entry.reason = SiteState.TRAINING, "JobRunning"
            entry.message = None
    if current.past_deadline:
        entry.state, entry.reason = SiteState.DROPPED, "DeadlineExceeded"
        last = (task.message or "").strip().splitlines() if task is not None else []
        # The site's last word names the cause where the agent could still say it (e.g. its
        # cluster's API unreachable, a Job still queued at the hospital).
        entry.message = "no report by the round's deadline" + (
            f"; the site's last report: {last[0][:300]}" if last else "")
        current.event("Warning", "SiteDropped",
                      f"site {entry.site} did not report by the deadline"
                      + (f" ({last[0][:300]})" if last else ""))


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
    if current.spec.mode == RoundMode.EVALUATE and aggregator.state == "Succeeded" \
            and report is not None:
        return _succeed_evaluation(current, progress, report)
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


def _admit(spec: FederatedRoundSpec, world: RoundWorld, me: QueuedRound
           ) -> tuple[list[str], list[SiteRoundStatus], list[SiteRoundStatus]]:
    """The admissible site names (sorted), the sites worth waiting for (Waiting, with a reason
    in `decide.queue.TRANSIENT`) and the excluded ones. A site named in spec.sites that does
    not exist, or does not allow the round's namespace, is excluded; without spec.sites, only
    the sites that allow the namespace are candidates at all. An admissible site whose free
    slots go to rounds ahead of this one in the queue is Waiting with reason QueuedBehind; the
    round ahead is named only when it is in this round's namespace."""
    views = {v.name: v for v in world.candidates}
    # A waiting round counts as ahead at a site only if its other open sites reach minSites
    # (a site its data does not fit is Excluded in its status, so it does not wait for it).
    open_sites = OpenSites(lambda s: s in views and admit(views[s], ANY_DATA,
                                                          world.now).admitted)
    names = sorted(spec.sites) if spec.sites else sorted(
        name for name, view in views.items()
        if namespace_allowed(view.spec.study_namespaces, world.namespace))
    available: list[str] = []
    waiting: list[SiteRoundStatus] = []
    excluded: list[SiteRoundStatus] = []

    def refuse(site: str, reason: str, message: str) -> None:
        state = SiteState.WAITING if reason in TRANSIENT else SiteState.EXCLUDED
        (waiting if state == SiteState.WAITING else excluded).append(
            SiteRoundStatus(site=site, state=state, reason=reason, message=message[:4000]))

    me = replace(me, sites=frozenset(names))
    for site in names:
        view = views.get(site)
        if view is None:
            refuse(site, "NotFound", f"HospitalSite {site} does not exist")
            continue
        if not namespace_allowed(view.spec.study_namespaces, world.namespace):
            refuse(site, NAMESPACE_NOT_ALLOWED,
                   namespace_refusal(site, view.spec.study_namespaces, world.namespace))
            continue
        verdict = admit(view, spec.data, world.now, spec.model.task.value)
        free = view.spec.limits.max_concurrent_tasks - view.running_tasks
        ahead = (queued_behind(me, world.queue.get(site, ()), site, free, open_sites)
                 if verdict.admitted else None)
        if verdict.admitted and spec.privacy.secure_aggregation and view.spec.data is None:
            refuse(site, "SampleCountUnknown",
                   f"HospitalSite {site}: secure aggregation weights each site by its "
                   "declared spec.data.sampleCount, which is not set; declare it")
        elif ahead is not None:
            refuse(site, QUEUED_BEHIND,
                   f"HospitalSite {site}: its {free} free task slot(s) go first to "
                   f"{ahead.describe(world.namespace)}, ahead in the queue")
        elif verdict.admitted:
            available.append(site)
        else:
            refuse(site, verdict.reason, verdict.message)
    return available, waiting, excluded


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
    status = current.status
    contributors = _apply_report(current, by_site, report)
    status.sites = list(by_site.values())
    status.reported_sites = len(contributors)
    status.rejected_sites = len(report.rejected)
    status.input_metrics = to_metrics(report.federated_metrics)
    status.epsilon = (report.privacy.epsilon_round if report.privacy
                      else _max_epsilon(status.sites))
    return _mark_succeeded(current, f"{len(contributors)} update(s) aggregated by "
                                    f"{report.strategy.name}; checkpoint "
                                    f"{output.payload_sha256[:12]}")


def _mark_succeeded(current: _Pass, message: str) -> RoundDecision:
    """The round's end state, timings, conditions and event once its outcome is recorded."""
    status, now = current.status, current.now
    status.state = RoundState.SUCCEEDED
    status.completion_time = rfc3339(now)
    _finish_timings(status, current.world.created, now)
    current.set_conditions(
        Desired.false(TRAINING, "RoundSucceeded", ""),
        Desired.false(AGGREGATING, "RoundSucceeded", ""),
        Desired.true(SUCCEEDED, "RoundSucceeded", message),
        Desired.false(FAILED, "RoundSucceeded", ""))
    current.event("Normal", "RoundSucceeded", message)
    current.decision.finished = True
    return current.decision


def _succeed_evaluation(current: _Pass, progress: _Progress, report: AggregateReport
                        ) -> RoundDecision:
    """An evaluation round's outcome: the sites' scores of the input model, pooled by the
    aggregator Job (validation as inputMetrics, held-out data as testMetrics)."""
    status = current.status
    status.sites = list(progress.by_site.values())
    status.reported_sites = len(report.evaluated_sites)
    status.rejected_sites = 0
    status.input_metrics = to_metrics(report.federated_metrics)
    status.test_metrics = to_metrics(report.test_metrics)
    return _mark_succeeded(current, f"{len(report.evaluated_sites)} site(s) scored checkpoint "
                                    f"{report.checkpoint_sha256[:12]} on held-out data")


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

    hd95 = measured.hd95
    lesions = measured.lesion_sensitivity
    return Metrics(n=measured.n, positives=measured.positives, loss=measured.loss,
                   auroc=frac(measured.auroc), sensitivity=frac(measured.sensitivity),
                   specificity=frac(measured.specificity), accuracy=frac(measured.accuracy),
                   dice=frac(measured.dice),
                   hd95=max(0.0, float(hd95)) if hd95 is not None and math.isfinite(hd95)
                   else None,
                   lesion_sensitivity={k: frac(v) or 0.0 for k, v in sorted(lesions.items())
                                       if k in FP_PER_SCAN} if lesions else None)


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
