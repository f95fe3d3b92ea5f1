"""FederatedRound: a timer runs one pass at a time over each round (`round_pass`); on delete,
the round's SiteTasks and hub Jobs, which ownerReferences cannot reach, are deleted. Rounds are
indexed by the sites they hold and the sites they wait for, so each admission pass sees every
site's taken slots and the queue (`decide.queue`)."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any, cast

import kopf
from pydantic import ValidationError

from deeprad.operator.api import API_VERSION
from deeprad.operator.api.federatedround import (
    FederatedRoundSpec,
    FederatedRoundStatus,
    SiteState,
)
from deeprad.operator.api.hospitalsite import HospitalSiteSpec, HospitalSiteStatus
from deeprad.operator.api.sitetask import SiteTaskStatus
from deeprad.operator.client import Kube, parse, reconciling
from deeprad.operator.decide import round as round_rules
from deeprad.operator.decide.queue import QueuedRound
from deeprad.operator.decide.sites import SiteView
from deeprad.operator.decide.timeutil import now, parse_time
from deeprad.operator.hub.cleanup import deleted
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


@dataclass(frozen=True)
class SiteClaim:
    """Index entry of a round for one site: it holds one of the site's task slots (admitted,
    not done there), or it waits for the site at its place in the queue."""

    round_uid: str
    holds: bool
    waiting: QueuedRound | None = None


# Site states of a started round that take one of the site's task slots.
HOLDING = (SiteState.PENDING, SiteState.QUEUED, SiteState.TRAINING)
MIN_SITES_DEFAULT = int(FederatedRoundSpec.model_fields["min_sites"].default)


def round_claims(name: str, namespace: str | None, uid: str, meta: Mapping[str, Any],
                 spec: Mapping[str, Any], status: Mapping[str, Any], **_: Any
                 ) -> dict[str, SiteClaim]:
    """Index of FederatedRounds by site: the sites a running round holds, and the sites a
    Queued round waits for (an ended round claims nothing)."""
    try:
        observed = parse(FederatedRoundStatus, status)
    except ValidationError:
        return {}
    if observed.state and observed.state.terminal:
        return {}
    entries = observed.sites or []
    if observed.start_time is not None:
        return {e.site: SiteClaim(uid, holds=True) for e in entries if e.state in HOLDING}
    if observed.queued_since is None:
        return {}
    created = meta.get("creationTimestamp")
    since = parse_time(observed.queued_since)
    wanted = frozenset(e.site for e in entries if e.state == SiteState.WAITING)
    waiting = QueuedRound(f"{namespace}/{name}", int(spec.get("priority") or 0), since,
                          parse_time(created) if created else since,
                          int(spec.get("minSites") or MIN_SITES_DEFAULT), wanted)
    return {site: SiteClaim(uid, holds=False, waiting=waiting) for site in wanted}


class AdmissionGate:
    """One admission pass at a time in this operator, and the admissions it made that kopf's
    index may not show yet: two rounds deciding at once, or one deciding on an index that has
    not seen the other's status write, would both take a site's last slot. An admission to a
    site is kept until the index shows the round holding it, or the round lets the site go
    (done there, ended, deleted); LEAK_GUARD_SECONDS only bounds what a lost event would
    leave behind, far beyond any lag of the index."""

    LEAK_GUARD_SECONDS = 600.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.lock = threading.Lock()
        self._clock = clock
        self._mutex = threading.Lock()  # passes of started rounds settle outside `lock`
        self._recent: dict[str, tuple[frozenset[str], float]] = {}

    def record(self, round_uid: str, sites: Collection[str]) -> None:
        """Round `round_uid` was just admitted to `sites`."""
        with self._mutex:
            self._recent[round_uid] = (frozenset(sites), self._clock())

    def settle(self, round_uid: str, holding: Collection[str] = ()) -> None:
        """Round `round_uid`, by its own latest status, now holds only `holding` (nothing once
        it ended or was deleted): the admissions to the other sites are over."""
        with self._mutex:
            if round_uid in self._recent:
                sites, at = self._recent[round_uid]
                self._keep(round_uid, sites & frozenset(holding), at)

    def recent(self, indexed: Mapping[str, Collection[str]]) -> dict[str, frozenset[str]]:
        """Sites per round of the admissions the index lacks; `indexed`: the sites the index
        shows each round (by uid) holding."""
        cutoff = self._clock() - self.LEAK_GUARD_SECONDS
        with self._mutex:
            for uid, (sites, at) in list(self._recent.items()):
                self._keep(uid, frozenset() if at < cutoff
                           else sites - frozenset(indexed.get(uid, ())), at)
            return {uid: sites for uid, (sites, _) in self._recent.items()}

    def _keep(self, round_uid: str, sites: frozenset[str], at: float) -> None:
        if sites:
            self._recent[round_uid] = (sites, at)
        else:
            del self._recent[round_uid]


def reconcile(name: str, namespace: str, uid: str, meta: kopf.Meta, spec: kopf.Spec,
              status: kopf.Status, body: kopf.Body, memo: HubMemo,
              site_views: kopf.Index[None, SiteView], round_tasks: kopf.Index[str, TaskFacts],
              round_claims: kopf.Index[str, SiteClaim], gate: AdmissionGate, **_: Any
              ) -> None:
    """On a timer: one pass over the round; a hub without the store or its keys says so.
    Passes of rounds not admitted yet run one at a time (`AdmissionGate`)."""
    admitting = not (status.get("startTime") and status.get("sites"))
    with reconciling("FederatedRound", f"{namespace}/{name}"), \
            (gate.lock if admitting else contextlib.nullcontext()):
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
            queue: dict[str, list[QueuedRound]] = {}
            if old.start_time and old.sites:
                sites = list(site_views.get(None, ()))
            else:
                # Admission decides on the sites as the API has them now: the index can lag
                # far behind the sites' Ready conditions at scale. One LIST per pass.
                claims = {site: list(round_claims.get(site, ())) for site in round_claims}
                indexed: dict[str, set[str]] = {}
                for site, site_claims in claims.items():
                    for claim in site_claims:
                        if claim.holds:
                            indexed.setdefault(claim.round_uid, set()).add(site)
                taken = held_slots(round_tasks, claims, gate.recent(indexed), uid)
                queue = {site: [c.waiting for c in cs if c.waiting and c.round_uid != uid]
                         for site, cs in claims.items()}
                sites = [replace(v, running_tasks=taken.get(v.name, 0))
                         for v in listed_sites(memo.kube)]
            new = reconcile_round(memo.rounds, name, namespace, uid, meta,
                                  parse(FederatedRoundSpec, spec), old,
                                  list(round_tasks.get(uid, ())), sites, body, queue)
        write_status(memo.kube, "FederatedRound", name, namespace, old, new)
        holding = [] if new.state and new.state.terminal else [
            e.site for e in new.sites or () if e.state in HOLDING]
        if not (old.start_time and old.sites) and new.start_time and new.sites:
            gate.record(uid, holding)
        elif old.start_time:
            gate.settle(uid, holding)


def listed_sites(kube: Kube) -> list[SiteView]:
    """Every HospitalSite as the API lists it now, as admission sees it."""
    views = (site_view((item.get("metadata") or {}).get("name", ""), item.get("spec") or {},
                       item.get("status") or {})
             for item in kube.list_objects(API_VERSION, "HospitalSite"))
    return [v for v in views if v is not None]


def cleanup(name: str, namespace: str | None, uid: str, memo: HubMemo,
            round_tasks: kopf.Index[str, TaskFacts], gate: AdmissionGate, **_: Any) -> None:
    """On delete: SiteTasks live in the sites' namespaces and hub Jobs in the jobs namespace,
    out of reach of ownerReferences, so delete them here. The store keeps the study's data."""
    gate.settle(uid)  # its sites' slots are free
    with reconciling("FederatedRound", f"{namespace}/{name}"):
        if memo.rounds is not None:
            memo.rounds.delete_tasks([(f.site, f.name) for f in round_tasks.get(uid, ())])
            memo.rounds.delete_jobs(name, uid)


def register(registry: kopf.OperatorRegistry, options: HubOptions) -> None:
    """Add the FederatedRound handlers, and the indices they read, to `registry`."""
    kopf.index(*HOSPITAL_SITES, id="site_views", registry=registry)(site_views)
    kopf.index(*SITE_TASKS, id="round_tasks", registry=registry)(round_tasks)
    kopf.index(*FEDERATED_ROUNDS, id="round_claims", registry=registry)(round_claims)
    # Rounds are driven by the timer alone: kopf runs one object's timer passes one after
    # another, so two passes never race to set status.startTime (which CEL freezes once set).
    # It fires at once for a new object and at resume, then every round_interval.
    gate = AdmissionGate()
    kopf.timer(*FEDERATED_ROUNDS, id="round-timer", interval=options.round_interval,
               registry=registry)(reads_indices(functools.partial(reconcile, gate=gate)))
    # On the DELETED event, not on.delete: that would need a finalizer (see hub/cleanup.py).
    kopf.on.event(*FEDERATED_ROUNDS, id="round-cleanup", when=deleted,
                  registry=registry)(reads_indices(functools.partial(cleanup, gate=gate)))


# ---- admission's view of the sites ------------------------------------------------------------


def held_slots(tasks_by_round: Mapping[str, Collection[TaskFacts]],
               claims_by_site: Mapping[str, Collection[SiteClaim]],
               recent: Mapping[str, Collection[str]], exclude_round: str) -> dict[str, int]:
    """Task slots taken per site by rounds other than `exclude_round` (by uid): a round takes
    one when it has an unfinished SiteTask there, when it was admitted there and has not
    finished with it (before its task exists: its input checkpoint is prepared first), or
    when this operator has just admitted it there."""
    holders: dict[str, set[str]] = {}
    for round_uid, tasks in tasks_by_round.items():
        for task in tasks:
            if not (task.state and task.state.terminal):
                holders.setdefault(task.site, set()).add(round_uid)
    for site, claims in claims_by_site.items():
        holders.setdefault(site, set()).update(c.round_uid for c in claims if c.holds)
    for round_uid, sites in recent.items():
        for site in sites:
            holders.setdefault(site, set()).add(round_uid)
    return {site: len(uids - {exclude_round}) for site, uids in holders.items()
            if uids - {exclude_round}}
