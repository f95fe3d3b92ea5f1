"""The hub's *act* layer for FederatedRounds: read the world (the round's SiteTasks from kopf's
index, its hub Jobs, its objects in the store), call `decide.round`, carry out the actions
(prepare Job, SiteTasks with presigned URLs, aggregator Job), post Events and export metrics.

Every action is idempotent: child names are deterministic and creation is create-or-get, so a
pass repeated after a crash changes nothing that the first pass already did.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import kopf
import kubernetes

from deeprad.core.errors import CheckpointError, ConfigError, ObjectNotFound
from deeprad.core.identity import KeyRegistry, PublicIdentity
from deeprad.core.layout import StudyLayout
from deeprad.core.manifests import read_manifest
from deeprad.core.protocol import (
    AggregateReport,
    AggregationTask,
    CheckpointSource,
    ModelSpec,
    PrepareTask,
    SecAggSpec,
    StrategySpec,
)
from deeprad.core.secagg import default_threshold
from deeprad.core.secagg.relay import StoreRelay
from deeprad.core.store import ObjectStore
from deeprad.core.store.presigned import site_grants
from deeprad.operator import metrics
from deeprad.operator.api import API_VERSION
from deeprad.operator.api.common import CheckpointRef
from deeprad.operator.api.federatedround import (
    FederatedRoundSpec,
    FederatedRoundStatus,
    RoundState,
    SiteState,
)
from deeprad.operator.api.names import aggregator_job_name, prepare_job_name, site_namespace
from deeprad.operator.api.sitetask import (
    GrantedObject,
    PublicKeys,
    RoundRef,
    TaskResult,
    TaskSecureAggregation,
    TaskState,
)
from deeprad.operator.client import Kube, job_pod_log
from deeprad.operator.decide import round as rules
from deeprad.operator.decide.sites import SiteView
from deeprad.operator.decide.timeutil import now, parse_time, rfc3339
from deeprad.operator.options import HubOptions
from deeprad.operator.render import jobs as job_render
from deeprad.operator.render.tasks import site_task

URL_GRACE = timedelta(minutes=5)  # presigned URLs outlive the deadline a little (clock skew)
SECAGG_CLIP = 1.0  # per value of the weighted update; deeprad simulate's default
LOG_TAIL_LINES = 20


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


@dataclass
class RoundHub:
    """What round passes share: options, the API, the store and the hub's public keys."""

    options: HubOptions
    kube: Kube
    core: kubernetes.client.CoreV1Api
    store: ObjectStore
    hub: PublicIdentity

    # ---- reading the world --------------------------------------------------------------------

    def job_view(self, name: str) -> rules.JobView | None:
        """A hub Job's state; a failure carries the Job's reason and its pod's log tail."""
        ns = self.options.jobs_namespace
        job = self.kube.get("batch/v1", "Job", name, ns)
        if job is None:
            return None
        status = job.get("status") or {}
        conds = {c["type"]: c for c in status.get("conditions") or ()
                 if c.get("status") == "True"}
        start = _time(status.get("startTime"))
        done = _time(status.get("completionTime"))
        if "Complete" in conds:
            return rules.JobView("Succeeded", start_time=start, completion_time=done)
        if "Failed" in conds:
            c = conds["Failed"]
            why = f"{c.get('reason', 'Failed')}: {c.get('message', '')}".strip(": ")
            return rules.JobView("Failed", f"{why}; log tail:\n{self.pod_log(name)}",
                                 start_time=start)
        return rules.JobView("Running", start_time=start)

    def pod_log(self, job: str) -> str:
        return job_pod_log(self.core, self.options.jobs_namespace, job,
                           tail_lines=LOG_TAIL_LINES)[-3000:]

    def store_view(self, layout: StudyLayout, number: int, aggregating: bool) -> rules.StoreView:
        """Round n-1's manifest, and round n's manifest and report once aggregation ran."""
        try:
            parent = read_manifest(self.store, layout, number - 1)
        except CheckpointError:
            parent = None
        if not aggregating:
            return rules.StoreView(input_manifest=parent)
        try:
            output = read_manifest(self.store, layout, number)
        except CheckpointError:
            output = None
        try:
            report = AggregateReport.model_validate_json(
                self.store.get_bytes(layout.aggregate(number)))
        except (ObjectNotFound, ValueError):
            report = None
        return rules.StoreView(input_manifest=parent, output_manifest=output, aggregate=report)

    # ---- acting -------------------------------------------------------------------------------

    def job_context(self, name: str, study: str, round_name: str) -> job_render.JobContext:
        return job_render.JobContext(name=name, namespace=self.options.jobs_namespace,
                                     study=study, round_name=round_name,
                                     image=self.options.job_image,
                                     image_pull_policy=self.options.image_pull_policy)

    def store_access(self) -> job_render.StoreAccess:
        assert self.options.store_url is not None
        return job_render.StoreAccess(self.options.store_url,
                                      self.options.store_credentials_secret)

    def prepare(self, name: str, uid: str, namespace: str, study: str,
                spec: FederatedRoundSpec, deadline: datetime) -> None:
        """Create the prepare Job that writes round n-1's checkpoint."""
        source = None
        if spec.input_checkpoint is not None:
            source = checkpoint_source(self.store, spec.input_checkpoint)
        task = PrepareTask(namespace=namespace, study=study, round=spec.round - 1,
                           model=ModelSpec(name=spec.model.name,
                                           kwargs=dict(spec.model.kwargs or {})),
                           seed=spec.training.seed, source=source,
                           registry_json=KeyRegistry.of([self.hub]).to_json())
        job_name = prepare_job_name(name, uid)
        manifest = job_render.prepare_job(
            self.job_context(job_name, study, name), task,
            job_render.active_deadline_seconds(deadline, now()), self.store_access(),
            self.options.hub_identity_secret, self.options.aggregator_cpu,
            self.options.aggregator_memory)
        self.kube.create_or_get(manifest)

    def create_tasks(self, ref: RoundRef, study: str, spec: FederatedRoundSpec,
                     action: rules.CreateTasks, sites: Mapping[str, SiteView],
                     deadline: datetime, body: kopf.Body) -> None:
        """One SiteTask per site, with presigned URLs valid until the deadline."""
        layout = StudyLayout(ref.namespace, study)
        secagg = self.task_secagg(spec, action.roster, sites, deadline)
        hub = PublicKeys(name=self.hub.name, signing_key=self.hub.signing_key,
                         key_agreement_key=self.hub.key_agreement_key)
        expires = max(timedelta(seconds=1), deadline - now() + URL_GRACE)
        for site in action.sites:
            grants = site_grants(layout, spec.round, site, secagg is not None)
            objects = [GrantedObject(key=key, method=method,
                                     url=self.presign(key, method, expires))
                       for key, method in grants.items()]
            manifest = site_task(ref, study, spec, site, action.parent_digest, hub, objects,
                                 secagg, rfc3339(deadline))
            obj, _ = self.kube.create_or_get(manifest)
            owner = ((obj.get("spec") or {}).get("roundRef") or {}).get("uid")
            if owner != ref.uid:
                kopf.event(body, type="Warning", reason="TaskNameTaken",
                           message=f"SiteTask {manifest['metadata']['namespace']}/"
                                   f"{manifest['metadata']['name']} belongs to another round "
                                   f"({owner}); site {site} cannot join until it is deleted")

    def presign(self, key: str, method: str, expires: timedelta) -> str:
        presign = getattr(self.store, "presign", None)
        if presign is None:
            raise ConfigError(f"the hub's store {self.store.url} cannot presign URLs; use an "
                              "S3 store (--store s3://...) for rounds with remote sites")
        return str(presign(key, method, expires, self.options.public_store_endpoint))

    def task_secagg(self, spec: FederatedRoundSpec, roster: Sequence[str],
                    sites: Mapping[str, SiteView], deadline: datetime
                    ) -> TaskSecureAggregation | None:
        if not spec.privacy.secure_aggregation:
            return None
        peers = []
        total = 0
        for name in roster:
            view = sites.get(name)
            if view is None:
                raise ConfigError(f"HospitalSite {name} disappeared after admission; the round "
                                  "cannot set up secure aggregation without its keys")
            ident = view.spec.identity
            peers.append(PublicKeys(name=name, signing_key=ident.signing_key,
                                    key_agreement_key=ident.key_agreement_key))
            total += view.spec.data.sample_count if view.spec.data else 0
        return TaskSecureAggregation(
            roster=peers, threshold=default_threshold(len(roster)), clip=SECAGG_CLIP,
            weight_normalizer=float(max(total, 1)),
            timeout_seconds=max(60.0, (deadline - now()).total_seconds()))

    def aggregate(self, name: str, uid: str, namespace: str, study: str,
                  spec: FederatedRoundSpec, action: rules.Aggregate,
                  sites: Mapping[str, SiteView], deadline: datetime) -> None:
        """Create the aggregator Job."""
        secagg = self.task_secagg(spec, action.roster, sites, deadline)
        registry = KeyRegistry.of([self.hub, *(
            PublicIdentity(name=s, signing_key=sites[s].spec.identity.signing_key,
                           key_agreement_key=sites[s].spec.identity.key_agreement_key)
            for s in action.roster if s in sites)])
        task = AggregationTask(
            namespace=namespace, study=study, round=spec.round,
            strategy=StrategySpec(name=spec.strategy.name.value,
                                  params=dict(spec.strategy.params or {})),
            sites=None if secagg else list(action.sites), min_sites=spec.min_sites,
            registry_json=registry.to_json(),
            secagg=None if secagg is None else SecAggSpec(
                roster=sorted(action.roster), threshold=secagg.threshold, clip=secagg.clip,
                weight_normalizer=secagg.weight_normalizer,
                timeout_s=secagg.timeout_seconds))
        budget = timedelta(seconds=self.options.aggregation_timeout)
        until = (deadline if secagg else now()) + budget
        job_name = aggregator_job_name(name, uid)
        manifest = job_render.aggregator_job(
            self.job_context(job_name, study, name), task,
            job_render.active_deadline_seconds(until, now()), self.store_access(),
            self.options.hub_identity_secret, self.options.aggregator_cpu,
            self.options.aggregator_memory)
        self.kube.create_or_get(manifest)

    def delete_tasks(self, tasks: Sequence[tuple[str, str]]) -> None:
        """Delete SiteTasks given as (site, name); the agents then delete their Jobs."""
        for site, task in tasks:
            self.kube.delete(API_VERSION, "SiteTask", task, site_namespace(site))

    def delete_jobs(self, name: str, uid: str) -> None:
        """Delete the round's hub Jobs (the round is being deleted)."""
        for job in (prepare_job_name(name, uid), aggregator_job_name(name, uid)):
            self.kube.delete("batch/v1", "Job", job, self.options.jobs_namespace)


def checkpoint_source(store: ObjectStore, ref: CheckpointRef) -> CheckpointSource:
    """Where an input checkpoint URI points in the hub's store."""
    layout, number = StudyLayout.parse_global_weights(store.key_of(ref.uri))
    return CheckpointSource(namespace=layout.namespace, study=layout.study, round=number,
                            sha256=ref.digest)


def reconcile_round(hub: RoundHub, name: str, namespace: str, uid: str, meta: Mapping[str, Any],
                    spec: FederatedRoundSpec, status: FederatedRoundStatus,
                    tasks: Sequence[TaskFacts], sites: Sequence[SiteView],
                    body: kopf.Body) -> FederatedRoundStatus:
    """One pass over a round: observe, decide, act; returns the status to write."""
    study = spec.study_ref.name if spec.study_ref else name
    layout = StudyLayout(namespace, study)
    t = now()
    mine = {f.site: f for f in tasks if f.round_uid == uid}
    if status.state and status.state.terminal:
        # An ended round keeps finished tasks as records and withdraws the rest, so their
        # Jobs stop and the sites count no task of this round against their capacity.
        hub.delete_tasks([(f.site, f.name) for f in mine.values() if f.state not in
                          (TaskState.SUCCEEDED, TaskState.FAILED)])
        return status
    aggregator = hub.job_view(aggregator_job_name(name, uid)) if status.sites else None
    store = hub.store_view(layout, spec.round, aggregating=aggregator is not None)
    prepare = None if store.input_manifest else hub.job_view(prepare_job_name(name, uid))
    problem = None
    if store.input_manifest is None and spec.input_checkpoint is not None:
        try:
            checkpoint_source(hub.store, spec.input_checkpoint)
        except ConfigError as exc:
            problem = str(exc)
    created = _time(meta.get("creationTimestamp")) or t
    world = rules.RoundWorld(
        now=t, created=created, candidates=sites,
        tasks={s: rules.TaskView(f.name, f.state, f.message, f.result, f.completion_time)
               for s, f in mine.items()},
        prepare=prepare, aggregator=aggregator, store=store, input_problem=problem)
    decision = rules.decide_round(name, meta.get("generation"), spec, status, world)
    st = decision.status
    deadline = parse_time(st.deadline_time) if st.deadline_time else t
    ref = RoundRef(namespace=namespace, name=name, uid=uid)
    by_name = {v.name: v for v in sites}
    for action in decision.actions:
        if isinstance(action, rules.PrepareInput):
            hub.prepare(name, uid, namespace, study, spec, deadline)
        elif isinstance(action, rules.CreateTasks):
            hub.create_tasks(ref, study, spec, action, by_name, deadline, body)
        elif isinstance(action, rules.DeleteTasks):
            hub.delete_tasks(action.names)
        elif isinstance(action, rules.Aggregate):
            hub.aggregate(name, uid, namespace, study, spec, action, by_name, deadline)
        elif isinstance(action, rules.MarkGone):
            relay = StoreRelay(hub.store, layout, spec.round, timeout_s=0, poll_s=0)
            for site in action.sites:
                relay.mark_gone(site, f"site {site}: no update in this round")
    for event in decision.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
    if st.state == RoundState.SUCCEEDED and st.output_checkpoint is None \
            and store.output_manifest is not None:
        st.output_checkpoint = CheckpointRef(
            uri=hub.store.uri(layout.global_weights(spec.round)),
            digest=store.output_manifest.payload_sha256, round=spec.round)
    export(namespace, study, spec, st, mine, decision)
    if decision.finished and store.aggregate is not None:
        for c in store.aggregate.contributors:
            with contextlib.suppress(ObjectNotFound):  # a rejected or purged update
                metrics.UPDATE_BYTES.labels(namespace=namespace, study=study).observe(
                    hub.store.size(layout.update_payload(spec.round, c.site)))
    return st


def export(namespace: str, study: str, spec: FederatedRoundSpec, st: FederatedRoundStatus,
           tasks: Mapping[str, TaskFacts], decision: rules.RoundDecision) -> None:
    """Round gauges on every pass; counters and histograms once, when the round ends."""
    labels = {"namespace": namespace, "study": study}
    sites = st.sites or []
    count = {state: sum(1 for s in sites if s.state == state) for state in SiteState}
    metrics.ROUND_NUMBER.labels(**labels).set(spec.round)
    metrics.ROUND_SITES.labels(**labels, state="admitted").set(st.admitted_sites or 0)
    metrics.ROUND_SITES.labels(**labels, state="reported").set(count[SiteState.REPORTED])
    metrics.ROUND_SITES.labels(**labels, state="dropped").set(
        count[SiteState.DROPPED] + count[SiteState.FAILED])
    running = not (st.state and st.state.terminal) and st.deadline_time is not None
    metrics.ROUND_DEADLINE.labels(**labels).set(
        parse_time(st.deadline_time).timestamp() if running and st.deadline_time else 0)
    for site, facts in tasks.items():
        if facts.result is not None and facts.result.duration_seconds is not None:
            metrics.SITE_ROUND_DURATION.labels(**labels, site=site).set(
                facts.result.duration_seconds)
    if not decision.finished:
        return
    outcome = "succeeded" if st.state == RoundState.SUCCEEDED else "failed"
    metrics.ROUNDS.labels(**labels, outcome=outcome).inc()
    timings = st.timings
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
    for s in sites:
        if s.state in (SiteState.DROPPED, SiteState.FAILED):
            metrics.SITES_DROPPED.labels(**labels, site=s.site).inc()
    if st.rejected_sites:
        metrics.UPDATES_REJECTED.labels(**labels).inc(st.rejected_sites)
    if st.input_metrics is not None:
        if st.input_metrics.auroc is not None:
            metrics.GLOBAL_AUROC.labels(**labels).set(st.input_metrics.auroc)
        if st.input_metrics.loss is not None:
            metrics.GLOBAL_LOSS.labels(**labels).set(st.input_metrics.loss)


def _time(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value
    return parse_time(str(value))
