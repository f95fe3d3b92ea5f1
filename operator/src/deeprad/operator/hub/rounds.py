"""FederatedRound: a timer runs one pass at a time over each round (`round_pass`); on delete,
the round's SiteTasks and hub Jobs, which ownerReferences cannot reach, are deleted."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import Any, cast

import kopf
from pydantic import ValidationError

from deeprad.operator.api import API_VERSION
from deeprad.operator.api.federatedround import FederatedRoundSpec, FederatedRoundStatus
from deeprad.operator.api.hospitalsite import HospitalSiteSpec, HospitalSiteStatus
from deeprad.operator.api.sitetask import SiteTaskStatus
from deeprad.operator.client import Kube, parse, reconciling
from deeprad.operator.decide import round as round_rules
from deeprad.operator.decide.sites import SiteView
from deeprad.operator.decide.timeutil import now
from deeprad.operator.hub.memo import HubMemo
from deeprad.operator.hub.resources import (
    FEDERATED_ROUNDS,
    HOSPITAL_SITES,
    SITE_TASKS,
    reads_indices,
    write_status,
)
from deeprad.operator.hub.round_pass import TaskFacts, reconcile_round
from deeprad.operator.options import HubOptions

# ---- handlers ---------------------------------------------------------------------------------


def site_views(name: str, spec: kopf.Spec, status: kopf.Status, **_: Any
               ) -> dict[None, SiteView]:
    """Index of HospitalSites as admission sees them."""
    view = site_view(name, spec, status)
    return {} if view is None else {None: view}


def site_view(name: str, spec: Mapping[str, Any], status: Mapping[str, Any]) -> SiteView | None:
    """A HospitalSite as admission sees it; None for one the schema no longer admits (the API
    server refuses such objects; an old one is simply not a candidate)."""
    try:
        site_spec = parse(HospitalSiteSpec, spec)
        site_status = parse(HospitalSiteStatus, status)
    except ValidationError:
        return None
    return SiteView(name, site_spec, tuple(site_status.conditions or ()), site_status)


def round_tasks(name: str, namespace: str | None, spec: kopf.Spec, status: kopf.Status,
                **_: Any) -> dict[str, TaskFacts]:
    """Index of SiteTasks by the uid of their round."""
    uid = (spec.get("roundRef") or {}).get("uid")
    if not uid or namespace is None:
        return {}
    try:
        task_status = parse(SiteTaskStatus, status)
    except ValidationError:
        task_status = SiteTaskStatus()
    return {uid: TaskFacts(uid, str(spec.get("site")), name, namespace, task_status.state,
                           task_status.message, task_status.result,
                           task_status.completion_time, task_status.reason)}


def reconcile(name: str, namespace: str, uid: str, meta: kopf.Meta, spec: kopf.Spec,
              status: kopf.Status, body: kopf.Body, memo: HubMemo,
              site_views: kopf.Index[None, SiteView], round_tasks: kopf.Index[str, TaskFacts],
              **_: Any) -> None:
    """On a timer: one pass over the round; a hub without the store or its keys says so."""
    with reconciling("FederatedRound", f"{namespace}/{name}"):
        if memo.rounds is not None:
            # The body a timer gets can lag the API by many seconds when thousands of
            # HospitalSites update at once: a pass on a stale body would write status fields
            # again (startTime, which CEL freezes once set, is refused). One GET per pass.
            fresh = memo.kube.get(API_VERSION, "FederatedRound", name, namespace)
            if fresh is None or (fresh.get("metadata") or {}).get("uid") != uid:
                return  # deleted (or replaced) since the event that scheduled this pass
            latest = kopf.Body(cast(kopf.RawBody, fresh))
            spec, status, meta = latest.spec, latest.status, latest.meta
        old = parse(FederatedRoundStatus, status)
        if memo.rounds is None:
            new = round_rules.hub_not_configured(old, memo.options.missing_for_rounds(),
                                                 meta.get("generation"), now())
        else:
            if old.sites:
                sites = list(site_views.get(None, ()))
            else:
                # Admission happens once per round, on the sites as the API has them now: the
                # index can lag far behind the sites' Ready conditions at scale. One LIST.
                running = running_tasks(round_tasks, uid)
                sites = [replace(v, running_tasks=running.get(v.name, 0))
                         for v in listed_sites(memo.kube)]
            new = reconcile_round(memo.rounds, name, namespace, uid, meta,
                                  parse(FederatedRoundSpec, spec), old,
                                  list(round_tasks.get(uid, ())), sites, body)
        write_status(memo.kube, "FederatedRound", name, namespace, old, new)


def listed_sites(kube: Kube) -> list[SiteView]:
    """Every HospitalSite as the API lists it now, as admission sees it."""
    views = (site_view((item.get("metadata") or {}).get("name", ""), item.get("spec") or {},
                       item.get("status") or {})
             for item in kube.list_objects(API_VERSION, "HospitalSite"))
    return [v for v in views if v is not None]


def cleanup(name: str, namespace: str | None, uid: str, memo: HubMemo,
            round_tasks: kopf.Index[str, TaskFacts], **_: Any) -> None:
    """On delete: SiteTasks live in the sites' namespaces and hub Jobs in the jobs namespace,
    out of reach of ownerReferences, so delete them here. The store keeps the study's data."""
    with reconciling("FederatedRound", f"{namespace}/{name}"):
        if memo.rounds is not None:
            memo.rounds.delete_tasks([(f.site, f.name) for f in round_tasks.get(uid, ())])
            memo.rounds.delete_jobs(name, uid)


def register(registry: kopf.OperatorRegistry, options: HubOptions) -> None:
    """Add the FederatedRound handlers, and the indices they read, to `registry`."""
    kopf.index(*HOSPITAL_SITES, id="site_views", registry=registry)(site_views)
    kopf.index(*SITE_TASKS, id="round_tasks", registry=registry)(round_tasks)
    # Rounds are driven by the timer alone: kopf runs one object's timer passes one after
    # another, so two passes never race to set status.startTime (which CEL freezes once set).
    # It fires at once for a new object and at resume, then every round_interval.
    kopf.timer(*FEDERATED_ROUNDS, id="round-timer", interval=options.round_interval,
               registry=registry)(reads_indices(reconcile))
    kopf.on.delete(*FEDERATED_ROUNDS, id="round-cleanup", registry=registry)(reads_indices(cleanup))


# ---- admission's view of the sites ------------------------------------------------------------


def running_tasks(tasks_by_round: Mapping[str, Collection[TaskFacts]], exclude_round: str
                  ) -> dict[str, int]:
    """Unfinished SiteTasks per site, of rounds other than `exclude_round` (by uid)."""
    counts: dict[str, int] = {}
    for round_uid, tasks in tasks_by_round.items():
        if round_uid == exclude_round:
            continue
        for task in tasks:
            if not (task.state and task.state.terminal):
                counts[task.site] = counts.get(task.site, 0) + 1
    return counts
