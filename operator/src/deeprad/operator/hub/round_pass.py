"""One pass over a FederatedRound: observe (its SiteTasks from kopf's index, its hub Jobs, its
objects in the store), decide (`decide.round`), act (carry out the actions through
`round_children`, post the Events), export metrics."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import kopf

from deeprad.core.errors import ConfigError, ObjectNotFound
from deeprad.core.layout import StudyLayout
from deeprad.core.protocol import AggregateReport
from deeprad.operator import metrics
from deeprad.operator.api.common import CheckpointRef
from deeprad.operator.api.federatedround import (
    FederatedRoundSpec,
    FederatedRoundStatus,
    RoundState,
    SiteState,
)
from deeprad.operator.api.names import aggregator_job_name, prepare_job_name
from deeprad.operator.api.sitetask import TaskResult, TaskState
from deeprad.operator.decide import round as rules
from deeprad.operator.decide import tenancy
from deeprad.operator.decide.queue import QueuedRound
from deeprad.operator.decide.sites import SiteView
from deeprad.operator.decide.timeutil import now, parse_time
from deeprad.operator.hub.round_children import (
    RoundHub,
    RoundTarget,
    api_time,
    checkpoint_owners,
    store_owner_uid,
)


@dataclass(frozen=True)
class TaskFacts:
    """Index entry of one SiteTask: enough for the round to follow it."""

    round_uid: str
    site: str
    name: str
    namespace: str
    state: TaskState | None
    message: str | None
    result: TaskResult | None
    completion_time: str | None
    reason: str | None = None


def reconcile_round(hub: RoundHub, name: str, namespace: str, uid: str, meta: Mapping[str, Any],
                    spec: FederatedRoundSpec, status: FederatedRoundStatus,
                    tasks: Sequence[TaskFacts], sites: Sequence[SiteView],
                    body: kopf.Body, queue: Mapping[str, Sequence[QueuedRound]] | None = None
                    ) -> FederatedRoundStatus:
    """One pass over a round: observe, decide, act; returns the status to write. `queue`:
    the other rounds waiting for sites, by site (read while this one is not admitted)."""
    target = RoundTarget(name, namespace, uid, spec, store_owner_uid(uid, spec, meta))
    mine = {f.site: f for f in tasks if f.round_uid == uid}
    if status.state and status.state.terminal:
        # An ended round keeps finished tasks as records and withdraws the rest, so their
        # Jobs stop and the sites count no task of this round against their capacity.
        hub.delete_tasks([(f.site, f.name) for f in mine.values()
                          if not (f.state and f.state.terminal)])
        return status
    world = observe(hub, target, meta, status, mine, sites, queue or {})
    decision = rules.decide_round(name, meta.get("generation"), spec, status, world)
    act(hub, target, decision, sites, world.now, body)
    new = decision.status
    record_output(hub, target, new, world.store)
    export_round(target, new, mine, decision)
    if decision.finished and world.store.aggregate is not None:
        observe_update_sizes(hub, target, world.store.aggregate)
    return new


def observe(hub: RoundHub, target: RoundTarget, meta: Mapping[str, Any],
            status: FederatedRoundStatus, tasks: Mapping[str, TaskFacts],
            sites: Sequence[SiteView], queue: Mapping[str, Sequence[QueuedRound]]
            ) -> rules.RoundWorld:
    """What the pass decides on: the candidate sites and the queue, the round's tasks, its
    hub Jobs (none before admission: a waiting round runs no Job) and its objects in the
    store."""
    observed_at = now()
    started = status.start_time is not None and bool(status.sites)
    aggregator = (hub.job_view(aggregator_job_name(target.name, target.uid)) if started
                  else None)
    store = hub.store_view(target.layout, target.spec.round, aggregating=aggregator is not None)
    prepare = (None if store.input_manifest or not started
               else hub.job_view(prepare_job_name(target.name, target.uid)))
    return rules.RoundWorld(
        now=observed_at, created=api_time(meta.get("creationTimestamp")) or observed_at,
        candidates=sites, namespace=target.namespace, queue=queue,
        tasks={site: rules.TaskView(f.name, f.state, f.message, f.result, f.completion_time,
                                    f.reason)
               for site, f in tasks.items()},
        prepare=prepare, aggregator=aggregator, store=store,
        input_problem=input_problem(hub, target, store))


def input_problem(hub: RoundHub, target: RoundTarget, store: rules.StoreView) -> str | None:
    """Why spec.inputCheckpoint cannot be imported, while round n-1's checkpoint is missing:
    a URI outside the store's checkpoint keys, or another namespace's checkpoint that its
    owner does not share with this round's namespace (`decide.tenancy`)."""
    ref = target.spec.input_checkpoint
    if store.input_manifest is not None or ref is None:
        return None
    try:
        source, _ = StudyLayout.parse_global_weights(hub.store.key_of(ref.uri))
    except ConfigError as exc:
        return str(exc)
    owners = (checkpoint_owners(hub.kube, source) if source.namespace != target.namespace
              else [])
    return tenancy.checkpoint_refusal(target.namespace, ref.uri, source, owners)


def act(hub: RoundHub, target: RoundTarget, decision: rules.RoundDecision,
        sites: Sequence[SiteView], observed_at: datetime, body: kopf.Body) -> None:
    """Carry out the decision's actions, in order, and post its Events."""
    deadline_time = decision.status.deadline_time
    deadline = parse_time(deadline_time) if deadline_time else observed_at
    by_name = {v.name: v for v in sites}
    for action in decision.actions:
        if isinstance(action, rules.PrepareInput):
            hub.prepare(target, deadline)
        elif isinstance(action, rules.CreateTasks):
            hub.create_tasks(target, action, by_name, deadline, body)
        elif isinstance(action, rules.DeleteTasks):
            hub.delete_tasks(action.names)
        elif isinstance(action, rules.Aggregate):
            hub.aggregate(target, action, by_name, deadline)
        elif isinstance(action, rules.MarkGone):
            hub.mark_gone(target, action.sites)
    for event in decision.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def record_output(hub: RoundHub, target: RoundTarget, status: FederatedRoundStatus,
                  store: rules.StoreView) -> None:
    """A succeeded round's status names its output checkpoint (URI and digest)."""
    if status.state == RoundState.SUCCEEDED and status.output_checkpoint is None \
            and store.output_manifest is not None:
        status.output_checkpoint = CheckpointRef(
            uri=hub.store.uri(target.layout.global_weights(target.spec.round)),
            digest=store.output_manifest.payload_sha256, round=target.spec.round)


# ---- metrics ----------------------------------------------------------------------------------


def export_round(target: RoundTarget, status: FederatedRoundStatus,
                 tasks: Mapping[str, TaskFacts], decision: rules.RoundDecision) -> None:
    """Round gauges on every pass; counters and histograms once, when the round ends."""
    labels = {"namespace": target.namespace, "study": target.study}
    export_round_gauges(labels, target.spec.round, status, tasks)
    if decision.finished:
        count_finished_round(labels, status)


def export_round_gauges(labels: dict[str, str], number: int, status: FederatedRoundStatus,
                        tasks: Mapping[str, TaskFacts]) -> None:
    """The round's number, its sites by state, its deadline, each site's training time."""
    sites = status.sites or []
    count = {state: sum(1 for s in sites if s.state == state) for state in SiteState}
    metrics.ROUND_NUMBER.labels(**labels).set(number)
    metrics.ROUND_SITES.labels(**labels, state="admitted").set(status.admitted_sites or 0)
    metrics.ROUND_SITES.labels(**labels, state="reported").set(count[SiteState.REPORTED])
    metrics.ROUND_SITES.labels(**labels, state="dropped").set(
        count[SiteState.DROPPED] + count[SiteState.FAILED])
    running = not (status.state and status.state.terminal) and status.deadline_time is not None
    metrics.ROUND_DEADLINE.labels(**labels).set(
        parse_time(status.deadline_time).timestamp()
        if running and status.deadline_time else 0)
    for site, facts in tasks.items():
        if facts.result is not None and facts.result.duration_seconds is not None:
            metrics.SITE_ROUND_DURATION.labels(**labels, site=site).set(
                facts.result.duration_seconds)


def count_finished_round(labels: dict[str, str], status: FederatedRoundStatus) -> None:
    """The outcome, the durations, dropped sites and rejected updates of an ended round."""
    outcome = "succeeded" if status.state == RoundState.SUCCEEDED else "failed"
    metrics.ROUNDS.labels(**labels, outcome=outcome).inc()
    timings = status.timings
    if timings is not None:
        if timings.total_seconds is not None:
            metrics.ROUND_DURATION.labels(**labels).observe(timings.total_seconds)
        for phase, value in (("scheduling", timings.scheduling_seconds),
                             ("training", timings.training_seconds),
                             ("aggregation", timings.aggregation_seconds)):
            if value is not None:
                metrics.PHASE_DURATION.labels(phase=phase).observe(value)
        if timings.aggregation_seconds is not None and outcome == "succeeded":
            metrics.AGGREGATION_DURATION.labels(**labels).observe(timings.aggregation_seconds)
    for entry in status.sites or []:
        if entry.state in (SiteState.DROPPED, SiteState.FAILED):
            metrics.SITES_DROPPED.labels(**labels, site=entry.site).inc()
    if status.rejected_sites:
        metrics.UPDATES_REJECTED.labels(**labels).inc(status.rejected_sites)
    if status.input_metrics is not None:
        if status.input_metrics.auroc is not None:
            metrics.GLOBAL_AUROC.labels(**labels).set(status.input_metrics.auroc)
        if status.input_metrics.dice is not None:
            metrics.GLOBAL_DICE.labels(**labels).set(status.input_metrics.dice)
        if status.input_metrics.loss is not None:
            metrics.GLOBAL_LOSS.labels(**labels).set(status.input_metrics.loss)


def observe_update_sizes(hub: RoundHub, target: RoundTarget, report: AggregateReport) -> None:
    """The size of each contributor's uploaded update, once the round ended."""
    labels = {"namespace": target.namespace, "study": target.study}
    for contribution in report.contributors:
        with contextlib.suppress(ObjectNotFound):  # a rejected or purged update
            metrics.UPDATE_BYTES.labels(**labels).observe(hub.store.size(
                target.layout.update_payload(target.spec.round, contribution.site)))
