"""A round's children in the hub and how a pass reads them: the prepare and aggregator Jobs in
the jobs namespace, the SiteTasks (with presigned URLs) in the sites' namespaces, and the
round's objects in the store.

Every write is idempotent: child names are deterministic and creation is create-or-get, so a
pass repeated after a crash changes nothing that the first pass already did.
"""

from __future__ import annotations

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
    PrepareTask,
    SecAggSpec,
    StrategySpec,
)
from deeprad.core.secagg.relay import StoreRelay
from deeprad.core.secagg.threat import threshold_for
from deeprad.core.store import ObjectStore
from deeprad.core.store.presigned import site_grants
from deeprad.operator.api import API_VERSION
from deeprad.operator.api.common import CheckpointRef, RoundMode
from deeprad.operator.api.federatedround import FederatedRoundSpec
from deeprad.operator.api.names import aggregator_job_name, prepare_job_name, site_namespace
from deeprad.operator.api.sitetask import (
    GrantedObject,
    PublicKeys,
    RoundRef,
    TaskSecureAggregation,
)
from deeprad.operator.client import Kube, job_pod_log
from deeprad.operator.decide import round as rules
from deeprad.operator.decide import tenancy
from deeprad.operator.decide.sites import SiteView
from deeprad.operator.decide.timeutil import now, parse_time, rfc3339
from deeprad.operator.options import HubOptions
from deeprad.operator.render import admission
from deeprad.operator.render import jobs as job_render
from deeprad.operator.render.tasks import site_task

URL_GRACE = timedelta(minutes=5)  # presigned URLs outlive the deadline a little (clock skew)
SECAGG_CLIP = 1.0  # per value of the weighted update; deeprad simulate's default
LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class RoundTarget:
    """The round a pass works on: its identity, its (immutable once started) spec, and the uid
    of the object that owns its store keys (its study's, or its own for a hand-made round)."""

    name: str
    namespace: str
    uid: str
    spec: FederatedRoundSpec
    store_uid: str

    @property
    def study(self) -> str:
        return self.spec.study_ref.name if self.spec.study_ref else self.name

    @property
    def layout(self) -> StudyLayout:
        return StudyLayout(self.namespace, self.study, self.store_uid)

    @property
    def ref(self) -> RoundRef:
        return RoundRef(namespace=self.namespace, name=self.name, uid=self.uid)


@dataclass
class RoundHub:
    """What round passes share (options, the API, the store, the hub's public keys) and the
    calls that read and write a round's children."""

    options: HubOptions
    kube: Kube
    core: kubernetes.client.CoreV1Api
    store: ObjectStore
    hub: PublicIdentity

    # ---- reading the world --------------------------------------------------------------------

    def job_view(self, name: str) -> rules.JobView | None:
        """A hub Job's state; a failure carries its cause in one line (its pod's error)."""
        job = self.kube.get("batch/v1", "Job", name, self.options.jobs_namespace)
        if job is None:
            return None
        status = job.get("status") or {}
        true_conditions = {c["type"]: c for c in status.get("conditions") or ()
                           if c.get("status") == "True"}
        start = api_time(status.get("startTime"))
        done = api_time(status.get("completionTime"))
        if "Complete" in true_conditions:
            return rules.JobView("Succeeded", start_time=start, completion_time=done)
        if "Failed" in true_conditions:
            failed = true_conditions["Failed"]
            return rules.JobView.failed(failed.get("reason", "Failed"),
                                        failed.get("message", ""), self.failure_cause(name),
                                        start_time=start)
        return rules.JobView("Running", start_time=start)

    def failure_cause(self, job: str) -> str:
        """Why a hub Job's last pod failed: its container's termination message (the one line
        `deeprad.core.jobargs` writes there; with FallbackToLogsOnError kubelet puts the log's
        tail there when the process wrote nothing, e.g. when it was killed), else its log's
        tail. `JobView.failed` quotes the last line."""
        try:
            pods = self.kube.list_objects("v1", "Pod", self.options.jobs_namespace,
                                          label_selector=f"batch.kubernetes.io/job-name={job}")
        except kubernetes.client.ApiException:
            pods = []
        failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
        if failed:
            newest = max(failed, key=lambda p: str(p["metadata"].get("creationTimestamp") or ""))
            for status in (newest.get("status") or {}).get("containerStatuses") or ():
                message = ((status.get("state") or {}).get("terminated") or {}).get("message")
                if message and message.strip():
                    return str(message)
        return self.pod_log(job)

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

    # ---- hub Jobs -----------------------------------------------------------------------------

    def job_context(self, name: str, target: RoundTarget) -> job_render.JobContext:
        return job_render.JobContext(name=name, namespace=self.options.jobs_namespace,
                                     study=target.study, round_name=target.name,
                                     image=self.options.job_image,
                                     image_pull_policy=self.options.image_pull_policy)

    def store_access(self) -> job_render.StoreAccess:
        assert self.options.store_url is not None
        return job_render.StoreAccess(self.options.store_url,
                                      self.options.store_credentials_secret)

    def prepare(self, target: RoundTarget, deadline: datetime) -> None:
        """Create the prepare Job that writes round n-1's checkpoint."""
        spec = target.spec
        source = None
        if spec.input_checkpoint is not None:
            source = checkpoint_source(self.store, spec.input_checkpoint)
        task = PrepareTask(namespace=target.namespace, study=target.study,
                           study_uid=target.store_uid, round=spec.round - 1,
                           model=spec.model.core(),
                           seed=spec.training.seed, source=source,
                           registry_json=KeyRegistry.of([self.hub]).to_json())
        job_name = prepare_job_name(target.name, target.uid)
        manifest = job_render.prepare_job(
            self.job_context(job_name, target), task,
            job_render.active_deadline_seconds(deadline, now()), self.store_access(),
            self.options.hub_identity_secret, self.options.aggregator_cpu,
            self.options.aggregator_memory)
        self.kube.create_or_get(manifest)

    def aggregate(self, target: RoundTarget, action: rules.Aggregate,
                  sites: Mapping[str, SiteView], deadline: datetime) -> None:
        """Create the aggregator Job."""
        spec = target.spec
        evaluate = spec.mode == RoundMode.EVALUATE  # pools the sites' scores: no exchange
        secagg = None if evaluate else self.task_secagg(spec, action.roster, sites, deadline)
        registry = KeyRegistry.of([self.hub, *(
            PublicIdentity(name=s, signing_key=sites[s].spec.identity.signing_key,
                           key_agreement_key=sites[s].spec.identity.key_agreement_key)
            for s in action.roster if s in sites)])
        task = AggregationTask(
            namespace=target.namespace, study=target.study, study_uid=target.store_uid,
            round=spec.round,
            strategy=StrategySpec(name=spec.strategy.name.value,
                                  params=dict(spec.strategy.params or {})),
            sites=None if secagg else list(action.sites), min_sites=spec.min_sites,
            registry_json=registry.to_json(), created_by=self.created_by(target),
            secagg=None if secagg is None else SecAggSpec(
                roster=sorted(action.roster), threshold=secagg.threshold, clip=secagg.clip,
                weight_normalizer=secagg.weight_normalizer,
                timeout_s=secagg.timeout_seconds),
            mode="evaluate" if evaluate else "train")
        budget = timedelta(seconds=self.options.aggregation_timeout)
        until = (deadline if secagg else now()) + budget
        job_name = aggregator_job_name(target.name, target.uid)
        manifest = job_render.aggregator_job(
            self.job_context(job_name, target), task,
            job_render.active_deadline_seconds(until, now()), self.store_access(),
            self.options.hub_identity_secret, self.options.aggregator_cpu,
            self.options.aggregator_memory)
        self.kube.create_or_get(manifest)

    def created_by(self, target: RoundTarget) -> str | None:
        """Who created the round's study (or the lone round), for the hub's audit record: the
        annotation the deeprad-study-creator admission policy sets; None unless the hub was
        told that policy guards it (without it, an author could write any name there)."""
        if not self.options.record_study_creator:
            return None
        kind, name = (("FederatedStudy", target.spec.study_ref.name) if target.spec.study_ref
                      else ("FederatedRound", target.name))
        return admission.created_by(self.kube.get(API_VERSION, kind, name, target.namespace))

    def delete_jobs(self, name: str, uid: str) -> None:
        """Delete the round's hub Jobs (the round is being deleted)."""
        for job in (prepare_job_name(name, uid), aggregator_job_name(name, uid)):
            self.kube.delete("batch/v1", "Job", job, self.options.jobs_namespace)

    # ---- SiteTasks ----------------------------------------------------------------------------

    def create_tasks(self, target: RoundTarget, action: rules.CreateTasks,
                     sites: Mapping[str, SiteView], deadline: datetime, body: kopf.Body) -> None:
        """One SiteTask per site, with presigned URLs valid until the deadline."""
        spec, ref = target.spec, target.ref
        secagg = self.task_secagg(spec, action.roster, sites, deadline)
        hub = PublicKeys(name=self.hub.name, signing_key=self.hub.signing_key,
                         key_agreement_key=self.hub.key_agreement_key)
        expires = max(timedelta(seconds=1), deadline - now() + URL_GRACE)
        for site in action.sites:
            grants = site_grants(target.layout, spec.round, site, secagg is not None)
            objects = [GrantedObject(key=key, method=method,
                                     url=self.presign(key, method, expires))
                       for key, method in grants.items()]
            manifest = site_task(ref, target.study, target.store_uid, spec, site,
                                 action.parent_digest, hub, objects, secagg, rfc3339(deadline))
            obj, _ = self.kube.create_or_get(manifest)
            owner = ((obj.get("spec") or {}).get("roundRef") or {}).get("uid")
            if owner != ref.uid:
                where = f"{manifest['metadata']['namespace']}/{manifest['metadata']['name']}"
                kopf.event(body, type="Warning", reason="TaskNameTaken",
                           message=f"SiteTask {where} belongs to another round ({owner}); "
                                   f"site {site} cannot join until it is deleted")

    def presigned_endpoint(self) -> str | None:
        """Where the sites' presigned URLs lead (scheme://HOST:PORT), if the store presigns."""
        endpoint = getattr(self.store, "presigned_endpoint", None)
        return None if endpoint is None else str(endpoint(self.options.public_store_endpoint))

    def presign(self, key: str, method: str, expires: timedelta) -> str:
        presign = getattr(self.store, "presign", None)
        if presign is None:
            raise ConfigError(f"the hub's store {self.store.url} cannot presign URLs; use an "
                              "S3 store (--store s3://...) for rounds with remote sites")
        return str(presign(key, method, expires, self.options.public_store_endpoint))

    def task_secagg(self, spec: FederatedRoundSpec, roster: Sequence[str],
                    sites: Mapping[str, SiteView], deadline: datetime
                    ) -> TaskSecureAggregation | None:
        """The secure-aggregation settings of the round's tasks: the roster's keys, the
        threshold (from the round's threat model), the weight normalizer (the roster's declared
        samples), and the window until the deadline from which each step's timeout is derived
        (deeprad.core.secagg.relay)."""
        if not spec.privacy.secure_aggregation:
            return None
        peers = []
        total = 0
        for name in roster:
            view = sites.get(name)
            if view is None:
                raise ConfigError(f"HospitalSite {name} disappeared after admission; the round "
                                  "cannot set up secure aggregation without its keys")
            identity = view.spec.identity
            peers.append(PublicKeys(name=name, signing_key=identity.signing_key,
                                    key_agreement_key=identity.key_agreement_key))
            total += view.spec.data.sample_count if view.spec.data else 0
        return TaskSecureAggregation(
            roster=peers, clip=SECAGG_CLIP,
            threshold=threshold_for(len(roster), spec.privacy.secure_aggregation_threat_model),
            weight_normalizer=float(max(total, 1)),
            timeout_seconds=max(60.0, (deadline - now()).total_seconds()))

    def mark_gone(self, target: RoundTarget, sites: Sequence[str]) -> None:
        """Tell the aggregator's secure-aggregation relay that these sites send nothing more."""
        relay = StoreRelay(self.store, target.layout, target.spec.round, timeout_s=0, poll_s=0)
        for site in sites:
            relay.mark_gone(site, f"site {site}: no update in this round")

    def delete_tasks(self, tasks: Sequence[tuple[str, str]]) -> None:
        """Delete SiteTasks given as (site, name); the agents then delete their Jobs."""
        for site, task in tasks:
            self.kube.delete(API_VERSION, "SiteTask", task, site_namespace(site))


def checkpoint_source(store: ObjectStore, ref: CheckpointRef) -> CheckpointSource:
    """Where an input checkpoint URI points in the hub's store."""
    layout, number = StudyLayout.parse_global_weights(store.key_of(ref.uri))
    return CheckpointSource(namespace=layout.namespace, study=layout.study, uid=layout.uid,
                            round=number, sha256=ref.digest)


def store_owner_uid(uid: str, spec: FederatedRoundSpec, meta: Mapping[str, Any]) -> str:
    """The uid that keys a round's store objects: its FederatedStudy's (the ownerReference the
    study set) or, for a round made by hand, its own. A round naming a study it is not owned
    by gets keys of its own, never the study's."""
    if spec.study_ref is not None:
        for owner in meta.get("ownerReferences") or ():
            if owner.get("kind") == "FederatedStudy" and owner.get("name") == \
                    spec.study_ref.name and owner.get("uid"):
                return str(owner["uid"])
    return uid


def checkpoint_owners(kube: Kube, source: StudyLayout) -> list[tenancy.CheckpointOwner]:
    """The objects that may own `source`'s keys: the FederatedStudy named like its study, and a
    FederatedRound of that name made by hand (a study's rounds keep their keys under the
    study's name)."""
    found = []
    for kind in ("FederatedStudy", "FederatedRound"):
        obj = kube.get(API_VERSION, kind, source.study, source.namespace)
        spec = (obj or {}).get("spec") or {}
        if obj is None or (kind == "FederatedRound" and spec.get("studyRef")):
            continue
        found.append(tenancy.CheckpointOwner(
            kind, source.study, str(obj["metadata"]["uid"]),
            tuple(spec.get("shareCheckpointsWith") or ())))
    return found


def api_time(value: Any) -> datetime | None:
    """A timestamp from an API object (a string, or a datetime from the client), or None."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value
    return parse_time(str(value))
