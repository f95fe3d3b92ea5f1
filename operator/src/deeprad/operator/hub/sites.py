"""HospitalSite: reserve the site's hub namespace and its agent's RBAC and Lease, derive
Reachable and Ready from that Lease, count the site's participation from the rounds' status,
and run a push-mode site's agent inside the hub.

The agents' Leases are watched (one watch, selected by name and labels on the server) into the
`agent_leases` index, so a heartbeat pass reads no Lease from the API: the Lease reads per
heartbeat interval do not grow with the number of sites. A pass writes status only when
something changed (see `decide.sites.recorded_heartbeat`)."""

from __future__ import annotations

import time
from typing import Any

import kopf
import kubernetes

from deeprad.core.errors import ConfigError
from deeprad.operator import metrics
from deeprad.operator.api.hospitalsite import HospitalSiteSpec, HospitalSiteStatus
from deeprad.operator.api.names import SITE_NAMESPACE_PREFIX
from deeprad.operator.client import Kube, parse, reconciling
from deeprad.operator.decide import conditions as cond
from deeprad.operator.decide import participation as part_rules
from deeprad.operator.decide import sites as site_rules
from deeprad.operator.decide.timeutil import now
from deeprad.operator.hub.cleanup import sweep_if_due
from deeprad.operator.hub.memo import HubMemo
from deeprad.operator.hub.push import push_agent
from deeprad.operator.hub.resources import (
    FEDERATED_ROUNDS,
    HOSPITAL_SITES,
    reads_indices,
    write_status,
)
from deeprad.operator.options import HubOptions
from deeprad.operator.render import site as site_render
from deeprad.operator.settings import AGENT_LEASES
from deeprad.operator.site.agent import SiteAgent

PUSH_RELOAD_SECONDS = 60.0


# ---- handlers ---------------------------------------------------------------------------------


def reserve(name: str, uid: str, meta: kopf.Meta, spec: kopf.Spec, status: kopf.Status,
            memo: HubMemo, agent_leases: kopf.Index[str, site_rules.AgentReport],
            site_rounds: kopf.Index[str, part_rules.RoundPart], **_: Any) -> None:
    """On create, update and resume: apply the site's objects, then refresh its status."""
    with reconciling("HospitalSite", name):
        for manifest in site_render.site_objects(name, uid):
            memo.kube.apply(manifest)
        refresh_status(memo.kube, name, meta, spec, status, agent_leases, site_rounds)


def heartbeat(name: str, meta: kopf.Meta, spec: kopf.Spec, status: kopf.Status, memo: HubMemo,
              agent_leases: kopf.Index[str, site_rules.AgentReport],
              site_rounds: kopf.Index[str, part_rules.RoundPart], **indices: Any) -> None:
    """On a timer: Reachable and Ready from the heartbeat Lease, participation from the
    rounds; then the hub's garbage sweep, when due (`cleanup`)."""
    with reconciling("HospitalSite", name):
        refresh_status(memo.kube, name, meta, spec, status, agent_leases, site_rounds)
    sweep_if_due(memo, indices)


def agent_lease(name: str, namespace: str | None, body: kopf.Body, **_: Any
                ) -> dict[str, site_rules.AgentReport]:
    """Index of the agents' heartbeat Leases by site: what each agent reported."""
    if name != site_render.AGENT or not namespace or \
            not namespace.startswith(SITE_NAMESPACE_PREFIX):
        return {}
    site = namespace[len(SITE_NAMESPACE_PREFIX):]
    return {site: site_rules.read_lease(site, body)}


def round_parts(name: str, namespace: str | None, spec: kopf.Spec, status: kopf.Status,
                **_: Any) -> dict[str, part_rules.RoundPart]:
    """Index of FederatedRounds by site: the part each admitted site had in the round."""
    return part_rules.round_parts(namespace or "", name, spec, status)


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
    """Add the HospitalSite handlers, and the indices they read, to `registry`."""
    kopf.index(*AGENT_LEASES, id="agent_leases", registry=registry)(agent_lease)
    kopf.index(*FEDERATED_ROUNDS, id="site_rounds", registry=registry)(round_parts)
    for on in (kopf.on.update, kopf.on.create, kopf.on.resume):
        on(*HOSPITAL_SITES, id="site-reserve", registry=registry)(reads_indices(reserve))
    kopf.timer(*HOSPITAL_SITES, id="site-heartbeat", interval=options.site_interval,
               registry=registry)(reads_indices(heartbeat))
    kopf.daemon(*HOSPITAL_SITES, id="push-agent", registry=registry, cancellation_timeout=10,
                when=is_push)(push_daemon)


# ---- the pass ---------------------------------------------------------------------------------


def refresh_status(kube: Kube, name: str, meta: kopf.Meta, spec: kopf.Spec,
                   status: kopf.Status, leases: kopf.Index[str, site_rules.AgentReport],
                   rounds: kopf.Index[str, part_rules.RoundPart]) -> None:
    """Derive the site's status from its Lease and its rounds; write what changed."""
    old = parse(HospitalSiteStatus, status)
    report = next(iter(leases.get(name, ())), site_rules.AgentReport())
    new = site_status(name, meta.get("generation"), parse(HospitalSiteSpec, spec), old, report)
    new.participation = part_rules.participation(rounds.get(name, ()))
    write_status(kube, "HospitalSite", name, None, old, new)


def site_status(name: str, generation: int | None, spec: HospitalSiteSpec,
                status: HospitalSiteStatus, report: site_rules.AgentReport
                ) -> HospitalSiteStatus:
    """The site's status from its agent's report: heartbeat, agent report, Reachable, Ready."""
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
