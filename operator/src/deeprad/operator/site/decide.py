"""What the site agent should do next: pure functions from (config, observed state, now) to
typed actions. No I/O; `site.observe` reads the world and `site.agent` applies the actions.

For each SiteTask in its hub namespace, with the trainer Job of the same name (if any):

- a finished task (Succeeded or Failed) is left alone;
- a task whose spec this agent cannot read fails, saying so;
- a Job labelled with another task's uid (an earlier task of that name) is deleted first;
- a task without a Job gets one (name = task name, labelled with the task's uid), unless the
  round's deadline passed, its Job existed and is gone (never train twice: an update may be
  uploaded already), the task asks for something the site refuses (another site, another
  hub key: reason Refused) or breaks the site's policy (a study or model it does not allow,
  too many local epochs, no DP or secure aggregation where required, a study whose ε at this
  site reached the ceiling, a presigned URL that leads anywhere but the site's store endpoint:
  reason PolicyViolation, the one-line message naming the rule) or would take the site's
  dataset past its ε ceiling (reason PrivacyCeiling). A DP task's run is reserved in the site's
  privacy ledger (its planned upper bound) before its Job is created, checked once more
  against the ledger the write is based on (`check_reservation`): a reservation that no
  longer fits (another task of the pass, another hub's agent) fails the task, and its Job is
  never created. A DP task's Job is never retried (`trainer_job`). The Job gets the policy,
  the trainer image, the study's and the dataset's privacy ledger and the reservation, so the
  trainer checks the task again;
- a Job that cannot run yet reports Queued: Kueue holds it (suspended; reason QueuedByKueue,
  with its Workload's message) or the scheduler has no node for its pod (reason Unschedulable,
  with the scheduler's message); a Job still queued at the round's deadline, or still running
  `DEADLINE_GRACE_SECONDS` after it, is deleted and its task fails (DeadlineExceeded);
- a running Job reports Running; a finished Job reports Succeeded with the trainer's result
  (the last JSON line of its log), after replacing the reservation with the DP-SGD steps the
  trainer reported, or Failed with the log's tail (its reservation stays: the run may have
  trained before it failed); a long Job's task gets a heartbeat every
  `TASK_HEARTBEAT_SECONDS`.

A Job whose task is gone (round deleted) is deleted. Every `heartbeatSeconds` the agent renews
its Lease on the hub with its version, the GPUs its cluster offers and its policy's digest.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import ValidationError

from deeprad.core import __version__
from deeprad.core.errors import DeepRadError, PolicyViolation
from deeprad.core.protocol import SiteResult, TrainingTask
from deeprad.core.site_policy import (
    DATASET_LEDGER_ENV,
    LEDGER_ENV,
    POLICY_ENV,
    RESERVATION_ENV,
    TRAINER_IMAGE_ENV,
    LedgerEntry,
    PrivacyCeiling,
    entry_json,
    ledger_json,
    planned_steps,
    policy_digest,
    policy_json,
    steps_json,
)
from deeprad.operator.api.common import RoundMode
from deeprad.operator.api.hospitalsite import GpuCapacity
from deeprad.operator.api.sitetask import SiteTaskSpec, SiteTaskStatus, TaskState
from deeprad.operator.decide.sites import (
    AGENT_VERSION_ANNOTATION,
    OBSERVED_GPUS_ANNOTATION,
    POLICY_DIGEST_ANNOTATION,
)
from deeprad.operator.decide.timeutil import parse_time, rfc3339
from deeprad.operator.render.jobs import (
    JobContext,
    StoreAccess,
    active_deadline_seconds,
    trainer_job,
)
from deeprad.operator.render.meta import Manifest
from deeprad.operator.site.config import AgentConfig
from deeprad.operator.site.ledger import Ledger, ledger_key
from deeprad.operator.site.training import presigned_env, task_result, training_task

LABEL_TASK_UID = "deeprad.io/task-uid"
PRESIGNED_STORE = "presigned:"
TASK_HEARTBEAT_SECONDS = 30.0
# A Job still running this long after its round's deadline is deleted: one that waited in
# Kueue started its activeDeadlineSeconds late (suspended time does not count), and its
# presigned URLs have expired, so nothing it does can reach the round any more.
DEADLINE_GRACE_SECONDS = 30.0
LOG_TAIL_SHOWN = 15  # lines of a trainer's log quoted in a task's message
MESSAGE_LIMIT = 4000  # characters of a task's message (its end is kept)


# ---- the observed world -----------------------------------------------------------------------


@dataclass(frozen=True)
class TaskView:
    """A SiteTask on the hub: its spec (None with `spec_error` when this agent cannot read it)
    and the status the agent last reported."""

    name: str
    uid: str
    status: SiteTaskStatus
    spec: SiteTaskSpec | None = None
    spec_error: str | None = None


@dataclass(frozen=True)
class JobView:
    """A trainer Job on the site's cluster. `outcome` is its true Complete or Failed condition,
    `failure` that Failed condition's message; `log` is its pod's log tail, read only when the
    outcome is to be reported (see `needs_log`). `suspended`: spec.suspend (Kueue holds it;
    `queue` is its LocalQueue label, `queue_message` why Kueue has not admitted it, from its
    Workload); `unschedulable`: the scheduler's message for its pending pod, `unplaced`: none
    of its pods is on a node yet (both read only for a Job whose pods are active, none
    ready)."""

    name: str
    task_uid: str | None
    active: int = 0
    succeeded: int = 0
    failed: int = 0
    outcome: Literal["Complete", "Failed"] | None = None
    failure: str = "failed"
    log: str | None = None
    ready: int = 0
    suspended: bool = False
    queue: str | None = None
    queue_message: str | None = None
    unschedulable: str | None = None
    unplaced: bool = False  # no pod of it is on a node yet (the scheduler has not answered)
    # A pod of it may have trained already: a start time, pods that ended or are ending, or a
    # Workload that Kueue evicted (preempted) once. A suspended DP Job with this set must not
    # run again: a second run would spend ε its reservation does not cover.
    ran: bool = False

    @property
    def starting(self) -> bool:
        """Running pods, none ready yet: the pods may wait for the scheduler."""
        return self.outcome is None and not self.suspended and self.active > 0 \
            and self.ready == 0


@dataclass(frozen=True)
class NodeView:
    """A node of the site's cluster, as far as the GPU report goes (the configured resource)."""

    ready: bool
    gpus: int
    allocatable_gpus: int
    product: str | None = None


# ---- actions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateJob:
    """Create the task's trainer Job; a Job of that name that exists already is adopted."""

    name: str
    namespace: str
    manifest: Manifest


@dataclass(frozen=True)
class DeleteJob:
    """Delete a trainer Job (its pods in the background); `reason` is for the agent's log."""

    name: str
    reason: str


@dataclass(frozen=True)
class ReportTask:
    """Merge-patch the task's status with `status` (state, message, heartbeat and the rest)."""

    name: str
    status: SiteTaskStatus


@dataclass(frozen=True)
class RecordPrivacy:
    """Write a task's DP-SGD run into the site's privacy ledger (under `key`, replacing the
    task's earlier entry): its reservation before the Job is created, the trainer's report
    before the task is reported Succeeded. A run is never left out of the ε spent here.
    `task`: the task a reservation is for, checked again (`check_reservation`) against the
    ledger the write is based on; when it no longer fits, nothing is written and the actions
    after this one (its CreateJob) are not carried out."""

    key: str
    entry: LedgerEntry
    task: TaskView | None = None


@dataclass(frozen=True)
class RenewLease:
    """Write the agent's Lease back whole (the site's Role grants `update`, not `patch`)."""

    lease: Manifest


Action = CreateJob | DeleteJob | RecordPrivacy | ReportTask
# SiteTask status.reason of the agent's refusals: the hospital's policy, its ε ceiling per
# dataset, or a task this agent cannot do at all (another site's, another hub's).
POLICY_VIOLATION = "PolicyViolation"
PRIVACY_CEILING = "PrivacyCeiling"
REFUSED = "Refused"
# SiteTask status.reason while state is Queued: Kueue holds the Job (its LocalQueue has no
# quota left), or the scheduler cannot place its pod (the message is the scheduler's).
QUEUED_BY_KUEUE = "QueuedByKueue"
PREEMPTED = "Preempted"  # a DP Job suspended by the hospital's queue after it started
UNSCHEDULABLE = "Unschedulable"
SUSPENDED = "Suspended"  # suspended by someone else than Kueue
QUEUED_REASONS = (QUEUED_BY_KUEUE, UNSCHEDULABLE, SUSPENDED)


# ---- tasks ------------------------------------------------------------------------------------


def decide_task(config: AgentConfig, task: TaskView, job: JobView | None, now: datetime,
                ledger: Ledger) -> list[Action]:
    """The actions for one task and its Job, in order; act stops at the first API error.
    `ledger` is the site's privacy ledger as read this pass: there is no default, since a
    decision on an empty ledger would admit what the real one refuses."""
    if task.status.state and task.status.state.terminal:
        return []
    if task.spec is None:
        return [report(task.name, task.status, TaskState.FAILED, "the task's spec is invalid "
                       f"for agent {__version__}: {task.spec_error}", now, terminal=True,
                       reason="InvalidSpec")]
    if job is not None and job.task_uid != task.uid:
        return [DeleteJob(job.name, "it belongs to an earlier task of that name")]
    if job is None:
        return _start(config, task, task.spec, now, ledger)
    return _follow(config, task, task.spec, job, now, ledger)


def needs_log(task: TaskView, job: JobView) -> bool:
    """Whether `decide_task` reports this Job's outcome, and so needs its pod's log."""
    return (job.outcome is not None and job.task_uid == task.uid and task.spec is not None
            and not (task.status.state and task.status.state.terminal))


def orphan_jobs(tasks: Iterable[TaskView], jobs: Mapping[str, JobView]) -> list[DeleteJob]:
    """Jobs whose task is gone (the round was deleted)."""
    uids = {t.uid for t in tasks}
    return [DeleteJob(name, "its task is gone") for name, job in jobs.items()
            if job.task_uid not in uids]


def agent_failure(task: TaskView, exc: Exception, now: datetime) -> ReportTask:
    """The report when handling a task raised something other than an API error: retrying
    cannot help, so the task fails and says why."""
    return report(task.name, task.status, TaskState.FAILED, f"site agent {__version__} failed "
                  f"on this task: {type(exc).__name__}: {exc}", now, terminal=True,
                  reason="AgentError")


def ledger_refusal(task: TaskView, job: JobView | None, problem: str, now: datetime
                   ) -> list[Action]:
    """While the privacy ledger cannot be read, no task starts: a task without a Job fails
    (reason LedgerUnreadable) naming the problem; running and finished tasks are left alone
    until the hospital admin repairs or restores the ConfigMap."""
    if job is not None or (task.status.state and task.status.state.terminal):
        return []
    return [report(task.name, task.status, TaskState.FAILED, f"refused: this site's privacy "
                   f"ledger cannot be read ({problem}); the hospital admin must restore it "
                   "before any study trains here", now, terminal=True,
                   reason="LedgerUnreadable")]


def report(name: str, status: SiteTaskStatus, state: TaskState, message: str, now: datetime,
           terminal: bool = False, reason: str | None = None) -> ReportTask:
    """The task's new status: `status` with state, message, heartbeat, agent version, the
    CamelCase `reason` of a failure (the hub shows it per site) and, for a terminal state,
    the completion time."""
    t = rfc3339(now)
    new = status.model_copy(deep=True, update={
        "state": state, "message": message[-MESSAGE_LIMIT:], "heartbeat_time": t,
        "agent_version": __version__, "reason": reason or status.reason})
    if terminal:
        new.completion_time = new.completion_time or t
    return ReportTask(name, new)


def _start(config: AgentConfig, task: TaskView, spec: SiteTaskSpec, now: datetime,
           ledger: Ledger) -> list[Action]:
    """Create the trainer Job for a task, or refuse the task with a reason."""
    name, status = task.name, task.status
    deadline = parse_time(spec.deadline)
    if now >= deadline:
        return [report(name, status, TaskState.FAILED, "the round's deadline passed before "
                       "the site could start training", now, terminal=True,
                       reason="DeadlineExceeded")]
    if status.state in (TaskState.ACCEPTED, TaskState.RUNNING) and status.job_name:
        # The Job existed and is gone (deleted by hand or collected): never run it twice,
        # an update may already be uploaded.
        return [report(name, status, TaskState.FAILED, f"training Job {status.job_name} "
                       "disappeared before it finished", now, terminal=True,
                       reason="JobDisappeared")]
    namespace = spec.round_ref.namespace
    # This task's own entry (a reservation written by a pass that stopped before the Job) is
    # replaced below, so it counts neither towards the study nor towards the dataset.
    spent = ledger.others(namespace, spec.study, task.uid)
    on_dataset = ledger.dataset(config.dataset, task.uid)
    reservation: LedgerEntry | None = None
    try:
        training = training_task(spec, config)
        # The hospital's policy, before anything is created: the Job would check it again.
        config.policy.check(training, spent=[e.steps for e in spent])
        # An evaluation trains nothing: it spends no ε, so it reserves none.
        if training.privacy is not None and training.mode == "train":
            reservation = LedgerEntry(
                task=task.uid, round=spec.round, dataset=config.dataset, reserved=True,
                steps=planned_steps(training, config.training.dataset_records,
                                    config.policy.delta))
            _check_ceilings(config, training, reservation, ledger)
    except PolicyViolation as exc:
        return [_refusal(task, exc, now)]
    except (DeepRadError, ValidationError) as exc:
        return [report(name, status, TaskState.FAILED, f"refused by site {config.site}: {exc}",
                       now, terminal=True, reason=REFUSED)]
    try:
        urls = presigned_env(spec, config)  # only the store endpoint the site allows
    except DeepRadError as exc:
        return [report(name, status, TaskState.FAILED, f"refused by site {config.site}: {exc}",
                       now, terminal=True,
                       reason=POLICY_VIOLATION if isinstance(exc, PolicyViolation) else REFUSED)]
    placement = config.training
    env = {**urls, POLICY_ENV: policy_json(config.policy), TRAINER_IMAGE_ENV: placement.image,
           LEDGER_ENV: ledger_json(spent), DATASET_LEDGER_ENV: steps_json(on_dataset)}
    if reservation is not None:
        env[RESERVATION_ENV] = entry_json(reservation)
    ctx = JobContext(name=name, namespace=placement.namespace, study=spec.study,
                     round_name=spec.round_ref.name, image=placement.image,
                     image_pull_policy=placement.image_pull_policy)
    manifest = trainer_job(ctx, config.site, placement, training,
                           active_deadline_seconds(deadline, now),
                           store=StoreAccess(PRESIGNED_STORE), extra_env=env,
                           retries=training.privacy is None or training.mode == "evaluate")
    manifest["metadata"]["labels"][LABEL_TASK_UID] = task.uid
    accepted = status.model_copy(update={"job_name": name,
                                         "start_time": status.start_time or rfc3339(now)})
    actions: list[Action] = []
    if reservation is not None and ledger.entry(namespace, spec.study, task.uid) != reservation:
        actions.append(RecordPrivacy(ledger_key(namespace, spec.study), reservation, task))
    return [*actions, CreateJob(name, placement.namespace, manifest),
            report(name, accepted, TaskState.ACCEPTED,
                   f"training Job {placement.namespace}/{name} created", now)]


def check_reservation(config: AgentConfig, action: RecordPrivacy, ledger: Ledger,
                      now: datetime) -> ReportTask | None:
    """The task's refusal when its reservation no longer fits the ceilings of `ledger`, the
    ledger as read for the write (the replace at its resourceVersion makes check and write
    one step); None when it fits, or when `action` is no reservation of a task."""
    task = action.task
    if task is None or task.spec is None or not action.entry.reserved:
        return None
    try:
        training = training_task(task.spec, config)
        spent = ledger.others(task.spec.round_ref.namespace, task.spec.study, task.uid)
        config.policy.check_epsilon(training, [e.steps for e in spent])
        _check_ceilings(config, training, action.entry, ledger)
    except PolicyViolation as exc:
        return _refusal(task, exc, now)
    return None


def _check_ceilings(config: AgentConfig, training: TrainingTask, reservation: LedgerEntry,
                    ledger: Ledger) -> None:
    """The dataset's ε ceiling with `reservation` composed with every other run on it."""
    config.policy.check_dataset(training, config.dataset,
                                ledger.dataset(config.dataset, reservation.task),
                                reservation.steps, config.training.dataset_records)


def _refusal(task: TaskView, exc: PolicyViolation, now: datetime) -> ReportTask:
    """The task failed under the site's policy: PrivacyCeiling or PolicyViolation."""
    reason = PRIVACY_CEILING if isinstance(exc, PrivacyCeiling) else POLICY_VIOLATION
    return report(task.name, task.status, TaskState.FAILED, str(exc), now, terminal=True,
                  reason=reason)


def _follow(config: AgentConfig, task: TaskView, spec: SiteTaskSpec, job: JobView,
            now: datetime, ledger: Ledger) -> list[Action]:
    """Report a Job's progress and outcome; a DP run goes into the ledger first: the trainer's
    report on success, else the reservation (written again only where none is recorded)."""
    name = task.name
    status = task.status.model_copy(update={
        "job_name": name, "attempts": job.active + job.succeeded + job.failed})
    if job.suspended and job.outcome is None and spec.privacy.differential_privacy is not None \
            and spec.mode == RoundMode.TRAIN and (job.ran or status.state == TaskState.RUNNING):
        return [*_keep_reserved(config, task, spec, ledger),
                DeleteJob(name, "a DP run suspended after it started must not run again"),
                report(name, status, TaskState.FAILED, "the hospital's queue suspended the DP "
                       "training Job after it started (Kueue preemption or eviction); a second "
                       "run would spend ε again, so the task fails and its reservation stays "
                       "in the site's privacy ledger", now, terminal=True, reason=PREEMPTED)]
    waiting = _waiting(job)
    if waiting is None and status.reason in QUEUED_REASONS:
        status.reason = None  # a Queued state's reason ends with it (the patch removes it)
    if job.outcome == "Complete":
        text = job.log or ""
        result = last_result(text)
        if result is None:
            return [*_keep_reserved(config, task, spec, ledger),
                    report(name, status, TaskState.FAILED, "the trainer finished but printed "
                           f"no result: {cause_line(text)}", now, terminal=True,
                           reason="NoResult")]
        status.result = task_result(result, spec)
        what = (f"model evaluated on its {result.test_split or 'held-out'} split"
                if spec.mode == RoundMode.EVALUATE else "update uploaded")
        done = report(name, status, TaskState.SUCCEEDED, f"{what} "
                      f"({result.num_samples} samples, {result.duration_s:.0f}s)", now,
                      terminal=True)
        namespace = spec.round_ref.namespace
        if result.privacy is None:
            return [*_keep_reserved(config, task, spec, ledger), done]
        entry = LedgerEntry(task=task.uid, round=spec.round, steps=result.privacy,
                            dataset=config.dataset)
        if ledger.entry(namespace, spec.study, task.uid) == entry:
            return [done]
        return [RecordPrivacy(ledger_key(namespace, spec.study), entry), done]
    if job.outcome == "Failed":
        return [*_keep_reserved(config, task, spec, ledger),
                report(name, status, TaskState.FAILED, f"training Job failed ({job.failure}): "
                       f"{cause_line(job.log or '')}", now, terminal=True,
                       reason=_failure_reason(job.log or ""))]
    deadline = parse_time(spec.deadline)
    if waiting is not None or job.active:
        overdue = (now - deadline).total_seconds()
        if overdue >= (0.0 if waiting is not None else DEADLINE_GRACE_SECONDS):
            where = (f"with the Job still queued ({waiting[1]})" if waiting is not None
                     else "with the Job still running")
            return [*_keep_reserved(config, task, spec, ledger),
                    DeleteJob(name, "its round's deadline passed"),
                    report(name, status, TaskState.FAILED, f"the round's deadline passed "
                           f"{where}; training Job deleted", now, terminal=True,
                           reason="DeadlineExceeded")]
    if waiting is not None:
        reason, message = waiting
        if (status.state, status.reason, status.message) != (TaskState.QUEUED, reason, message):
            return [report(name, status, TaskState.QUEUED, message, now, reason=reason)]
    elif job.active and not job.unplaced and status.state != TaskState.RUNNING:
        return [report(name, status, TaskState.RUNNING, "training", now)]
    if _age(status.heartbeat_time, now) > TASK_HEARTBEAT_SECONDS:
        # The task's heartbeat tells the hub the agent still follows a long Job.
        return [report(name, status, status.state or TaskState.ACCEPTED,
                       status.message or "training", now)]
    return []


def _waiting(job: JobView) -> tuple[str, str] | None:
    """(reason, message) while a Job that has not finished cannot run yet: Kueue holds it
    (suspended), or the scheduler has no node for its pod; None otherwise."""
    if job.outcome is not None:
        return None
    if job.suspended:
        if not job.queue:
            return SUSPENDED, "training Job suspended (not by Kueue: it has no queue label)"
        detail = f": {job.queue_message}" if job.queue_message else ""
        return QUEUED_BY_KUEUE, f"waiting in Kueue LocalQueue {job.queue}{detail}"
    if job.unschedulable is not None:
        return UNSCHEDULABLE, f"trainer pod unschedulable: {job.unschedulable}"
    return None


def _keep_reserved(config: AgentConfig, task: TaskView, spec: SiteTaskSpec, ledger: Ledger
                   ) -> list[Action]:
    """A DP run that ended without a report stays in the ledger at its planned upper bound:
    it may have trained before it failed. Its reservation is there already, unless the Job was
    created before this agent reserved runs; then it is recorded now."""
    if spec.privacy.differential_privacy is None or spec.mode == RoundMode.EVALUATE or \
            ledger.has(spec.round_ref.namespace, spec.study, task.uid):
        return []
    try:
        training = training_task(spec, config)
    except (DeepRadError, ValidationError):
        return []  # a task this agent would refuse never had a Job of its making
    if training.privacy is None:
        return []
    entry = LedgerEntry(task=task.uid, round=spec.round, dataset=config.dataset, reserved=True,
                        steps=planned_steps(training, config.training.dataset_records,
                                            config.policy.delta))
    return [RecordPrivacy(ledger_key(spec.round_ref.namespace, spec.study), entry)]


def _failure_reason(log: str) -> str:
    """PrivacyCeiling or PolicyViolation when the trainer refused the task under the site's
    policy (its last words name the rule), StoreUnavailable when it gave up on a store outage
    (deeprad.core.store.retry), JobFailed otherwise."""
    last = tail(log, 3)
    if "PrivacyCeiling: policy." in last:
        return PRIVACY_CEILING
    if "PolicyViolation: policy." in last:
        return POLICY_VIOLATION
    return "StoreUnavailable" if ": the store was unreachable for " in last else "JobFailed"


def last_result(text: str) -> SiteResult | None:
    """The trainer's result: the last line of its log that parses as a SiteResult."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return SiteResult.model_validate_json(line)
            except ValidationError:
                continue
    return None


def cause_line(log: str) -> str:
    """A failed trainer's cause in one line: the last line of its log, which the trainer
    writes as its one-line cause (deeprad.core.jobargs); the hub never sees a traceback tail,
    which the hospital reads in its own cluster (kubectl logs)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return lines[-1][:500] if lines else "no log"


def tail(text: str, lines: int = LOG_TAIL_SHOWN) -> str:
    """The last `lines` lines of a log."""
    return "\n".join(text.splitlines()[-lines:])


def _age(stamp: str | None, now: datetime) -> float:
    """Seconds since an RFC 3339 time (infinite when unset)."""
    return float("inf") if not stamp else (now - parse_time(stamp)).total_seconds()


# ---- heartbeat --------------------------------------------------------------------------------


def heartbeat_due(config: AgentConfig, seconds_since_last: float) -> bool:
    """Whether the Lease is to be renewed now."""
    return seconds_since_last >= config.heartbeat_seconds


def gpu_capacity(resource: str, nodes: Sequence[NodeView]) -> GpuCapacity:
    """The GPUs (of `resource`) on Ready nodes that have any."""
    counted = [n for n in nodes if n.ready and n.gpus]
    products = sorted({n.product for n in counted if n.product})
    return GpuCapacity(resource_name=resource, capacity=sum(n.gpus for n in counted),
                       allocatable=sum(n.allocatable_gpus for n in counted), nodes=len(counted),
                       product=",".join(products)[:256] or None)


def renew_lease(config: AgentConfig, lease: Manifest | None, gpus: GpuCapacity | None,
                now: datetime) -> RenewLease | None:
    """The Lease renewed by this agent: holder, duration (three heartbeats), renew time, and
    annotations with its version, policy digest and GPU report (left out when nodes may not
    be read). None when there is no Lease yet: the hub creates it when it registers the
    site."""
    if lease is None:
        return None
    body = copy.deepcopy(lease)
    notes = {AGENT_VERSION_ANNOTATION: __version__,
             POLICY_DIGEST_ANNOTATION: policy_digest(config.policy)}
    if gpus is not None:
        notes[OBSERVED_GPUS_ANNOTATION] = gpus.model_dump_json(exclude_none=True)
    meta = body.setdefault("metadata", {})
    meta["annotations"] = {**(meta.get("annotations") or {}), **notes}
    body["spec"] = {**(body.get("spec") or {}),
                    "holderIdentity": f"{config.site}-agent",
                    "leaseDurationSeconds": max(1, round(3 * config.heartbeat_seconds)),
                    "renewTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
    return RenewLease(body)
