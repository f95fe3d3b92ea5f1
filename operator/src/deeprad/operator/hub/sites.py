"""HospitalSite: reserve the site's hub namespace and its agent's RBAC and Lease, derive
Reachable and Ready from that Lease, and run a push-mode site's agent inside the hub."""

from __future__ import annotations

import time
from typing import Any

import kopf
import kubernetes

from deeprad.core.errors import ConfigError
from deeprad.operator import metrics
from deeprad.operator.api.hospitalsite import HospitalSiteSpec, HospitalSiteStatus
from deeprad.operator.api.names import site_namespace
from deeprad.operator.client import Kube, parse, reconciling
from deeprad.operator.decide import conditions as cond
from deeprad.operator.decide import sites as site_rules
from deeprad.operator.decide.timeutil import now
from deeprad.operator.hub.memo import HubMemo
from deeprad.operator.hub.push import push_agent
from deeprad.operator.hub.resources import HOSPITAL_SITES, write_status
from deeprad.operator.options import HubOptions
from deeprad.operator.render import site as site_render
from deeprad.operator.site.agent import SiteAgent

PUSH_RELOAD_SECONDS = 60.0


# ---- handlers ---------------------------------------------------------------------------------


def reserve(name: str, uid: str, meta: kopf.Meta, spec: kopf.Spec, status: kopf.Status,
            memo: HubMemo, **_: Any) -> None:
    """On create, update and resume: apply the site's objects, then refresh its status."""
    with reconciling("HospitalSite", name):
        for manifest in site_render.site_objects(name, uid):
            memo.kube.apply(manifest)
        refresh_status(memo.kube, name, meta, spec, status)


def heartbeat(name: str, meta: kopf.Meta, spec: kopf.Spec, status: kopf.Status, memo: HubMemo,
              **_: Any) -> None:
    """On a timer: Reachable and Ready from the heartbeat Lease."""
    with reconciling("HospitalSite", name):
        refresh_status(memo.kube, name, meta, spec, status)


def is_push(spec: kopf.Spec, **_: Any) -> bool:
    """Whether the site is in push mode (the hub runs its agent)."""
    return bool((spec.get("connection") or {}).get("mode") == "push")


def push_daemon(name: str, spec: kopf.Spec, body: kopf.Body, memo: HubMemo,
                stopped: kopf.DaemonStopped, **_: Any) -> None:
    """Run the site agent of a push-mode site inside the hub until the site changes mode or
    goes away. The Secret is re-read every minute, so a fixed kubeconfig is picked up."""
    hub_client = kubernetes.client.ApiClient(memo.configuration)
    agent: SiteAgent | None = None
    built, problem = 0.0, ""
    while not stopped:
        if agent is None or time.monotonic() - built > PUSH_RELOAD_SECONDS:
            try:
                endpoint = memo.rounds.presigned_endpoint() if memo.rounds else None
                agent = push_agent(name, parse(HospitalSiteSpec, spec), hub_client, endpoint)
                built, problem = time.monotonic(), ""
            except ConfigError as exc:
                agent = None
                if str(exc) != problem:  # one Event per distinct problem
                    problem = str(exc)
                    kopf.event(body, type="Warning", reason="PushConfigInvalid",
                               message=problem)
        if agent is not None:
            agent.step()
        stopped.wait(agent.config.poll_seconds if agent else PUSH_RELOAD_SECONDS / 6)


def register(registry: kopf.OperatorRegistry, options: HubOptions) -> None:
    """Add the HospitalSite handlers to `registry`."""
    for on in (kopf.on.update, kopf.on.create, kopf.on.resume):
        on(*HOSPITAL_SITES, id="site-reserve", registry=registry)(reserve)
    kopf.timer(*HOSPITAL_SITES, id="site-heartbeat", interval=options.site_interval,
               registry=registry)(heartbeat)
    kopf.daemon(*HOSPITAL_SITES, id="push-agent", registry=registry, cancellation_timeout=10,
                when=is_push)(push_daemon)


# ---- the pass ---------------------------------------------------------------------------------


def refresh_status(kube: Kube, name: str, meta: kopf.Meta, spec: kopf.Spec,
                   status: kopf.Status) -> None:
    """Derive the site's status from its Lease and write what changed."""
    old = parse(HospitalSiteStatus, status)
    new = site_status(kube, name, meta.get("generation"), parse(HospitalSiteSpec, spec), old)
    write_status(kube, "HospitalSite", name, None, old, new)


def site_status(kube: Kube, name: str, generation: int | None, spec: HospitalSiteSpec,
                status: HospitalSiteStatus) -> HospitalSiteStatus:
    """The site's status from its Lease: heartbeat, agent report, Reachable and Ready."""
    lease = kube.get("coordination.k8s.io/v1", "Lease", site_render.AGENT, site_namespace(name))
    report = site_rules.read_lease(name, lease)
    observed = site_rules.observed_status(status, report)
    checked = now()
    desired = site_rules.site_conditions(name, spec, observed, report, checked)
    observed.conditions = cond.merge(status.conditions, desired, generation, checked)
    observed.observed_generation = generation
    export_site(name, desired, observed, report)
    return observed


def export_site(name: str, desired: list[cond.Desired], observed: HospitalSiteStatus,
                report: site_rules.AgentReport) -> None:
    """Site gauges: Reachable and Ready, the last heartbeat, the GPUs the agent reported."""
    for condition, gauge in zip(desired, (metrics.SITE_REACHABLE, metrics.SITE_READY),
                                strict=True):
        gauge.labels(site=name).set(1 if condition.status == "True" else 0)
    if report.heartbeat is not None:
        metrics.SITE_HEARTBEAT.labels(site=name).set(report.heartbeat.timestamp())
    gpus = observed.observed_gpus
    if gpus is not None and gpus.allocatable is not None:
        metrics.SITE_GPUS.labels(site=name).set(gpus.allocatable)
