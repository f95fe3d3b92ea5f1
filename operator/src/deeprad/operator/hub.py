"""The hub operator's *act* layer: thin kopf handlers that read the world, call `decide`,
render manifests and apply them.

- HospitalSite: on create/resume/update the site's hub namespace, agent ServiceAccount, Role,
  RoleBinding and heartbeat Lease are applied (server-side apply, field manager
  `deeprad-operator`); a timer re-reads the Lease and sets Reachable and Ready; for push-mode
  sites a daemon runs the site agent inside the hub (`push.py`).
- FederatedStudy: on create/resume/update and on a timer, the study is re-derived from the
  FederatedRounds it owns (`decide.study`), and the next round is created when due
  (deterministic name, create-or-get, so a restart never duplicates one).
- FederatedRound: a timer (one pass at a time per round) runs `hub_rounds.reconcile_round`
  (prepare Job, admission, SiteTasks, aggregator Job, outcome); on delete, its SiteTasks and
  hub Jobs, which ownerReferences cannot reach, are deleted.

Nothing lives only in memory: the indices below are caches of the API that kopf rebuilds at
start, and every write is idempotent. API errors become kopf.TemporaryError (retried, counted
in deeprad_reconcile_errors_total); what a user must fix becomes a condition.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import kopf
import kubernetes
from pydantic import BaseModel, ValidationError

from deeprad.core.errors import ConfigError
from deeprad.core.identity import PublicIdentity
from deeprad.core.store import open_store
from deeprad.operator import metrics
from deeprad.operator.api import API_VERSION, GROUP, VERSION
from deeprad.operator.api.common import Metrics
from deeprad.operator.api.federatedround import FederatedRoundSpec, FederatedRoundStatus
from deeprad.operator.api.federatedstudy import FederatedStudySpec, FederatedStudyStatus
from deeprad.operator.api.hospitalsite import HospitalSiteSpec, HospitalSiteStatus
from deeprad.operator.api.names import round_name, site_namespace
from deeprad.operator.api.sitetask import SiteTaskStatus, TaskState
from deeprad.operator.client import (
    Kube,
    connection_info,
    load_configuration,
    parse,
    reconciling,
)
from deeprad.operator.decide import conditions as cond
from deeprad.operator.decide import round as round_rules
from deeprad.operator.decide import sites as site_rules
from deeprad.operator.decide import study as study_rules
from deeprad.operator.decide.sites import SiteView
from deeprad.operator.decide.timeutil import now
from deeprad.operator.hub_rounds import RoundHub, TaskFacts, reconcile_round
from deeprad.operator.options import HubOptions
from deeprad.operator.push import push_agent
from deeprad.operator.render import rounds as round_render
from deeprad.operator.render import site as site_render

HOSPITAL_SITES = (GROUP, VERSION, "hospitalsites")
FEDERATED_STUDIES = (GROUP, VERSION, "federatedstudies")
FEDERATED_ROUNDS = (GROUP, VERSION, "federatedrounds")
SITE_TASKS = (GROUP, VERSION, "sitetasks")
PUSH_RELOAD_SECONDS = 60.0


@dataclass
class HubMemo:
    """What every handler shares: the options and the API client (kopf's `memo`)."""

    options: HubOptions
    configuration: kubernetes.client.Configuration
    kube: Kube
    rounds: RoundHub | None = None  # None until the hub is configured for rounds


# ---- HospitalSite -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteFacts:
    """Index entry of one HospitalSite: what studies select and account by."""

    name: str
    labels: dict[str, str]
    sample_count: int | None


def reserve_site(kube: Kube, name: str, uid: str) -> None:
    """Apply the site's namespace, ServiceAccount, Role, RoleBinding and Lease."""
    for manifest in site_render.site_objects(name, uid):
        kube.apply(manifest)


def site_status(kube: Kube, name: str, generation: int | None, spec: HospitalSiteSpec,
                status: HospitalSiteStatus) -> HospitalSiteStatus:
    """The site's status from its Lease: heartbeat, agent report, Reachable and Ready."""
    lease = kube.get("coordination.k8s.io/v1", "Lease", site_render.AGENT, site_namespace(name))
    report = site_rules.read_lease(name, lease)
    observed = site_rules.observed_status(status, report)
    t = now()
    desired = site_rules.site_conditions(name, spec, observed, report, t)
    observed.conditions = cond.merge(status.conditions, desired, generation, t)
    observed.observed_generation = generation
    for d, gauge in zip(desired, (metrics.SITE_REACHABLE, metrics.SITE_READY), strict=True):
        gauge.labels(site=name).set(1 if d.status == "True" else 0)
    if report.heartbeat is not None:
        metrics.SITE_HEARTBEAT.labels(site=name).set(report.heartbeat.timestamp())
    gpus = observed.observed_gpus
    if gpus is not None and gpus.allocatable is not None:
        metrics.SITE_GPUS.labels(site=name).set(gpus.allocatable)
    return observed


# ---- FederatedStudy ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OwnedRound:
    """Index entry of one FederatedRound that belongs to a study."""

    owner_uid: str | None
    view: study_rules.RoundView


def round_view(spec: FederatedRoundSpec, status: FederatedRoundStatus) -> study_rules.RoundView:
    """What decide.study needs from a round."""
    failed = cond.find(status.conditions, study_rules.FAILED)
    return study_rules.RoundView(
        number=spec.round, state=status.state, output_checkpoint=status.output_checkpoint,
        metrics=status.aggregate_metrics, input_metrics=status.input_metrics,
        epsilon=status.epsilon,
        failure=failed.message if failed and failed.status == "True" else None,
        sites={s.site: s.state for s in status.sites or ()},
        training=spec.training, data=spec.data, dp=spec.privacy.differential_privacy)


def candidates(spec: FederatedStudySpec, sites: list[SiteFacts]) -> list[study_rules.Candidate]:
    """The HospitalSites the study draws from."""
    if spec.sites:
        chosen = [s for s in sites if s.name in set(spec.sites)]
    else:
        chosen = [s for s in sites if site_rules.matches_selector(s.labels, spec.site_selector)]
    return [study_rules.Candidate(s.name, s.sample_count) for s in sorted(chosen,
                                                                           key=lambda s: s.name)]


def export_study(namespace: str, name: str, spec: FederatedStudySpec,
                 status: FederatedStudyStatus, latest: Metrics | None) -> None:
    """Study progress gauges."""
    labels = {"namespace": namespace, "study": name}
    metrics.STUDY_ROUNDS_COMPLETED.labels(**labels).set(status.completed_rounds or 0)
    metrics.STUDY_ROUNDS_PLANNED.labels(**labels).set(spec.rounds)
    if status.epsilon_spent is not None:
        metrics.STUDY_EPSILON_SPENT.labels(**labels).set(status.epsilon_spent)
    if latest is not None and latest.auroc is not None:
        metrics.GLOBAL_AUROC.labels(**labels).set(latest.auroc)
    if latest is not None and latest.loss is not None:
        metrics.GLOBAL_LOSS.labels(**labels).set(latest.loss)


def reconcile_study(kube: Kube, namespace: str, name: str, uid: str, generation: int | None,
                    spec: FederatedStudySpec, status: FederatedStudyStatus,
                    rounds: list[study_rules.RoundView], sites: list[SiteFacts],
                    body: kopf.Body) -> FederatedStudyStatus:
    """One pass over a study: decide, create the next round if due, return the status."""
    t = now()
    decision = study_rules.decide_study(name, generation, spec, status, rounds,
                                        candidates(spec, sites), t)
    action = decision.action
    new = decision.status
    if isinstance(action, study_rules.CreateRound):
        manifest = round_render.federated_round(name, namespace, uid, spec, action)
        obj, created = kube.create_or_get(manifest)
        owners = [o.get("uid") for o in obj.get("metadata", {}).get("ownerReferences") or ()]
        rn = round_name(name, action.number)
        if uid not in owners:
            new.conditions = cond.merge(new.conditions, [cond.Desired.false(
                study_rules.PROGRESSING, "RoundNameTaken",
                f"FederatedRound {namespace}/{rn} exists but does not belong to this study; "
                "delete or rename it so the study can create its round")], generation, t)
        elif created:
            metrics.ROUNDS_CREATED.labels(namespace=namespace, study=name).inc()
            kopf.event(body, type="Normal", reason="RoundCreated",
                      message=f"created FederatedRound {rn}"
                              + (f" from checkpoint {action.input_checkpoint.uri}"
                                 if action.input_checkpoint else " from a fresh model"))
    elif isinstance(action, study_rules.Stop) and status.completion_time is None:
        kind = "Normal" if action.outcome == study_rules.SUCCEEDED else "Warning"
        kopf.event(body, type=kind, reason=action.reason, message=action.message)
    succeeded = [r for r in sorted(rounds, key=lambda r: r.number)
                 if r.state == "Succeeded"]
    export_study(namespace, name, spec, new, succeeded[-1].metrics if succeeded else None)
    return new


# ---- registration -----------------------------------------------------------------------------


def build_registry(options: HubOptions) -> kopf.OperatorRegistry:
    """A registry with every hub handler; `kopf.run(registry=...)` runs them."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(memo: Any, **_: Any) -> kopf.ConnectionInfo:
        return connection_info(memo.configuration)

    @kopf.index(*HOSPITAL_SITES, id="site_facts", registry=registry)
    def site_facts(name: str, labels: kopf.Labels, spec: kopf.Spec, **_: Any
                   ) -> dict[None, SiteFacts]:
        count = (spec.get("data") or {}).get("sampleCount")
        return {None: SiteFacts(name, dict(labels), count)}

    @kopf.index(*FEDERATED_ROUNDS, id="study_rounds", registry=registry)
    def study_rounds(namespace: str | None, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta,
                     **_: Any) -> dict[tuple[str, str], OwnedRound]:
        study = (spec.get("studyRef") or {}).get("name")
        if not study or namespace is None:
            return {}
        owner = next((o.get("uid") for o in meta.get("ownerReferences") or ()
                      if o.get("kind") == "FederatedStudy" and o.get("name") == study), None)
        view = round_view(parse(FederatedRoundSpec, spec), parse(FederatedRoundStatus, status))
        return {(namespace, study): OwnedRound(owner, view)}

    @kopf.on.resume(*HOSPITAL_SITES, id="site-reserve", registry=registry)
    @kopf.on.create(*HOSPITAL_SITES, id="site-reserve", registry=registry)
    @kopf.on.update(*HOSPITAL_SITES, id="site-reserve", registry=registry)
    def site_reserve(name: str, uid: str, meta: kopf.Meta, spec: kopf.Spec,
                     status: kopf.Status, memo: Any, **_: Any) -> None:
        with reconciling("HospitalSite", name):
            reserve_site(memo.kube, name, uid)
            old = parse(HospitalSiteStatus, status)
            write_status(memo.kube, "HospitalSite", name, None, old,
                         site_status(memo.kube, name, meta.get("generation"),
                                     parse(HospitalSiteSpec, spec), old))

    @kopf.timer(*HOSPITAL_SITES, id="site-heartbeat", interval=options.site_interval,
                registry=registry)
    def site_heartbeat(name: str, meta: kopf.Meta, spec: kopf.Spec, status: kopf.Status,
                       memo: Any, **_: Any) -> None:
        with reconciling("HospitalSite", name):
            old = parse(HospitalSiteStatus, status)
            write_status(memo.kube, "HospitalSite", name, None, old,
                         site_status(memo.kube, name, meta.get("generation"),
                                     parse(HospitalSiteSpec, spec), old))

    @kopf.daemon(*HOSPITAL_SITES, id="push-agent", registry=registry, cancellation_timeout=10,
                 when=lambda spec, **_: (spec.get("connection") or {}).get("mode") == "push")
    def push_site(name: str, spec: kopf.Spec, body: kopf.Body, memo: Any,
                  stopped: kopf.DaemonStopped, **_: Any) -> None:
        """Run the site agent of a push-mode site inside the hub until the site changes mode
        or goes away. The Secret is re-read every minute, so a fixed kubeconfig is picked up."""
        hub_client = kubernetes.client.ApiClient(memo.configuration)
        agent, built, problem = None, 0.0, ""
        while not stopped:
            if agent is None or time.monotonic() - built > PUSH_RELOAD_SECONDS:
                try:
                    agent = push_agent(name, parse(HospitalSiteSpec, spec), hub_client)
                    built, problem = time.monotonic(), ""
                except ConfigError as exc:
                    agent = None
                    if str(exc) != problem:
                        problem = str(exc)
                        kopf.event(body, type="Warning", reason="PushConfigInvalid",
                                   message=problem)
            if agent is not None:
                agent.step()
            stopped.wait(agent.config.poll_seconds if agent else PUSH_RELOAD_SECONDS / 6)

    def study_pass(name: str, namespace: str, uid: str, meta: kopf.Meta, spec: kopf.Spec,
                   status: kopf.Status, body: kopf.Body, memo: Any,
                   site_facts: kopf.Index[None, SiteFacts],
                   study_rounds: kopf.Index[tuple[str, str], OwnedRound]) -> None:
        with reconciling("FederatedStudy", f"{namespace}/{name}"):
            owned = [r.view for r in study_rounds.get((namespace, name), ())
                     if r.owner_uid == uid]
            new = reconcile_study(memo.kube, namespace, name, uid, meta.get("generation"),
                                  parse(FederatedStudySpec, spec),
                                  parse(FederatedStudyStatus, status), owned,
                                  list(site_facts.get(None, ())), body)
            write_status(memo.kube, "FederatedStudy", name, namespace,
                         parse(FederatedStudyStatus, status), new)
            for number, measured in study_rules.metrics_to_backfill(owned):
                memo.kube.patch_status(API_VERSION, "FederatedRound", round_name(name, number),
                                       namespace, {"aggregateMetrics": measured.model_dump(
                                           mode="json", exclude_none=True)})

    @kopf.on.resume(*FEDERATED_STUDIES, id="study", registry=registry)
    @kopf.on.create(*FEDERATED_STUDIES, id="study", registry=registry)
    @kopf.on.update(*FEDERATED_STUDIES, id="study", registry=registry)
    def study_changed(**kwargs: Any) -> None:
        study_pass(**_study_kwargs(kwargs))

    @kopf.timer(*FEDERATED_STUDIES, id="study-timer", interval=options.study_interval,
                registry=registry)
    def study_timer(**kwargs: Any) -> None:
        study_pass(**_study_kwargs(kwargs))

    @kopf.index(*HOSPITAL_SITES, id="site_views", registry=registry)
    def site_views(name: str, spec: kopf.Spec, status: kopf.Status, **_: Any
                   ) -> dict[None, SiteView]:
        try:
            site_spec = parse(HospitalSiteSpec, spec)
            site_status = parse(HospitalSiteStatus, status)
        except ValidationError:
            return {}  # admission refuses such objects; an old one is simply not a candidate
        return {None: SiteView(name, site_spec, tuple(site_status.conditions or ()),
                               site_status)}

    @kopf.index(*SITE_TASKS, id="round_tasks", registry=registry)
    def round_tasks(name: str, namespace: str | None, spec: kopf.Spec, status: kopf.Status,
                    **_: Any) -> dict[str, TaskFacts]:
        uid = (spec.get("roundRef") or {}).get("uid")
        if not uid or namespace is None:
            return {}
        try:
            st = parse(SiteTaskStatus, status)
        except ValidationError:
            st = SiteTaskStatus()
        return {uid: TaskFacts(uid, str(spec.get("site")), name, namespace, st.state,
                               st.message, st.result, st.completion_time)}

    def round_pass(name: str, namespace: str, uid: str, meta: kopf.Meta, spec: kopf.Spec,
                   status: kopf.Status, body: kopf.Body, memo: Any,
                   site_views: kopf.Index[None, SiteView],
                   round_tasks: kopf.Index[str, TaskFacts]) -> None:
        with reconciling("FederatedRound", f"{namespace}/{name}"):
            old = parse(FederatedRoundStatus, status)
            hub: RoundHub | None = memo.rounds
            if hub is None:
                missing = ", ".join(memo.options.missing_for_rounds())
                new = old.model_copy(deep=True)
                new.conditions = cond.merge(old.conditions, [cond.Desired.false(
                    round_rules.SITES_SCHEDULED, "HubNotConfigured",
                    f"the hub operator runs without {missing}; it cannot run rounds")],
                    meta.get("generation"), now())
                write_status(memo.kube, "FederatedRound", name, namespace, old, new)
                return
            sites = list(site_views.get(None, ()))
            if not old.sites:  # admission, once per round, is all that counts running tasks
                running = _running_tasks(round_tasks, uid)
                sites = [replace(v, running_tasks=running.get(v.name, 0)) for v in sites]
            new = reconcile_round(hub, name, namespace, uid, meta,
                                  parse(FederatedRoundSpec, spec), old,
                                  list(round_tasks.get(uid, ())), sites, body)
            write_status(memo.kube, "FederatedRound", name, namespace, old, new)

    # Rounds are driven by the timer alone: kopf runs one object's timer passes one after
    # another, so two passes never race to set status.startTime (which CEL freezes once set).
    # It fires at once for a new object and at resume, then every round_interval.
    @kopf.timer(*FEDERATED_ROUNDS, id="round-timer", interval=options.round_interval,
                registry=registry)
    def round_timer(**kwargs: Any) -> None:
        round_pass(**{k: kwargs[k] for k in _ROUND_KWARGS})

    @kopf.on.delete(*FEDERATED_ROUNDS, id="round-cleanup", registry=registry)
    def round_deleted(name: str, namespace: str | None, uid: str, memo: Any,
                      **kwargs: Any) -> None:
        """SiteTasks live in the sites' namespaces and hub Jobs in the jobs namespace, out of
        reach of ownerReferences: delete them explicitly. The store keeps the study's data."""
        with reconciling("FederatedRound", f"{namespace}/{name}"):
            hub: RoundHub | None = memo.rounds
            if hub is not None:
                tasks: kopf.Index[str, TaskFacts] = kwargs["round_tasks"]
                hub.delete_tasks([(f.site, f.name) for f in tasks.get(uid, ())])
                hub.delete_jobs(name, uid)

    return registry


_ROUND_KWARGS = ("name", "namespace", "uid", "meta", "spec", "status", "body", "memo",
                 "site_views", "round_tasks")


def _running_tasks(index: kopf.Index[str, TaskFacts], exclude_round: str) -> dict[str, int]:
    """Unfinished SiteTasks per site, of rounds other than `exclude_round`."""
    out: dict[str, int] = {}
    for uid in index:
        if uid == exclude_round:
            continue
        for f in index.get(uid, ()):
            if f.state not in (TaskState.SUCCEEDED, TaskState.FAILED):
                out[f.site] = out.get(f.site, 0) + 1
    return out


def write_status(kube: Kube, kind: str, name: str, namespace: str | None, old: BaseModel,
                 new: BaseModel) -> None:
    """Merge-patch the status fields that changed (an idle pass sends nothing). Written here
    rather than through kopf's patch: a refused kopf patch ends a timer for good, while an
    ApiException here becomes a TemporaryError and the next pass tries again."""
    before = old.model_dump(mode="json", exclude_none=True)
    after = new.model_dump(mode="json", exclude_none=True)
    changed = {k: v for k, v in after.items() if before.get(k) != v}
    if changed:
        kube.patch_status(API_VERSION, kind, name, namespace, changed)


_STUDY_KWARGS = ("name", "namespace", "uid", "meta", "spec", "status", "body", "memo",
                 "site_facts", "study_rounds")


def _study_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: kwargs[k] for k in _STUDY_KWARGS}


def make_memo(options: HubOptions, kubeconfig: str | None, context: str | None) -> HubMemo:
    """The shared memo: options, the chosen client configuration, its API client, and (when
    the store and the hub's keys are configured) what round passes need."""
    cfg = load_configuration(kubeconfig, context)
    kube = Kube(cfg)
    rounds = None
    if not options.missing_for_rounds():
        assert options.store_url is not None and options.hub_keys_dir is not None
        hub = PublicIdentity.load(Path(options.hub_keys_dir))
        if hub.role != "hub":
            raise ConfigError(f"--hub-keys {options.hub_keys_dir}: role is {hub.role!r}, "
                              "expected 'hub' (pass the hub's public key folder)")
        rounds = RoundHub(options=options, kube=kube,
                          core=kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(cfg)),
                          store=open_store(options.store_url), hub=hub)
    return HubMemo(options=options, configuration=cfg, kube=kube, rounds=rounds)


__all__ = ["HubMemo", "Kube", "build_registry", "make_memo"]
