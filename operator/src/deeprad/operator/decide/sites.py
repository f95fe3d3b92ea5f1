"""A HospitalSite's health and its admission to a round, from plain observed data.

Reachable: the site agent renewed its heartbeat Lease within spec.connection.heartbeatTimeout.
Ready: Reachable, not suspended, the agent reported, and its GPUs can hold one training pod.
Admission to a round adds what changes from round to round: maintenance windows (weekly, in
the window's IANA time zone), free task slots, and whether the site's data fits the study.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import ValidationError

from deeprad.operator.api.common import Condition, DataSelector, LabelSelector
from deeprad.operator.api.hospitalsite import (
    TASK_DATA_KIND,
    ConnectionMode,
    DataKind,
    GpuCapacity,
    HospitalSiteSpec,
    HospitalSiteStatus,
    MaintenanceWindow,
)
from deeprad.operator.api.names import site_namespace
from deeprad.operator.decide.conditions import Desired, find, is_true
from deeprad.operator.decide.timeutil import format_duration, parse_duration, parse_time, rfc3339

READY = "Ready"
REACHABLE = "Reachable"
# The agent reports through its heartbeat Lease, the one object it may write besides task
# status: renewTime is the heartbeat, these annotations its version and observed GPUs.
AGENT_VERSION_ANNOTATION = "deeprad.io/agent-version"
OBSERVED_GPUS_ANNOTATION = "deeprad.io/observed-gpus"  # GpuCapacity as JSON
POLICY_DIGEST_ANNOTATION = "deeprad.io/policy-digest"  # sha256:<hex> of the site's policy
_POLICY_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# How stale status.lastHeartbeat may get behind the Lease before it is written again.
HEARTBEAT_RECORD_EVERY = timedelta(minutes=5)
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


# ---- the agent's report -----------------------------------------------------------------------


@dataclass(frozen=True)
class AgentReport:
    """What the site agent's Lease says: last heartbeat, version, GPUs, the digest of the
    site policy in force, or what is malformed."""

    heartbeat: datetime | None = None
    agent_version: str | None = None
    gpus: GpuCapacity | None = None
    problem: str | None = None
    policy_digest: str | None = None


def read_lease(site: str, lease: Mapping[str, Any] | None) -> AgentReport:
    """The agent's report from its Lease object (None: no Lease)."""
    if lease is None:
        return AgentReport()
    where = f"Lease {site_namespace(site)}/{lease.get('metadata', {}).get('name', '?')}"
    renew = (lease.get("spec") or {}).get("renewTime")
    notes = lease.get("metadata", {}).get("annotations") or {}
    try:
        heartbeat = parse_time(renew) if renew else None
    except ValueError as exc:
        return AgentReport(problem=f"{where}: spec.renewTime: {exc}")
    version = notes.get(AGENT_VERSION_ANNOTATION)
    raw = notes.get(OBSERVED_GPUS_ANNOTATION)
    try:
        gpus = GpuCapacity.model_validate_json(raw) if raw else None
    except ValidationError as exc:
        return AgentReport(heartbeat, version, None,
                           f"{where}: annotation {OBSERVED_GPUS_ANNOTATION} is not a GPU "
                           f"capacity report: {exc.errors()[0]['msg']}")
    digest = notes.get(POLICY_DIGEST_ANNOTATION)
    if digest is not None and not _POLICY_DIGEST.match(digest):
        return AgentReport(heartbeat, version, gpus,
                           f"{where}: annotation {POLICY_DIGEST_ANNOTATION} is not "
                           "sha256:<64 hex>; the site agent writes it, check its version")
    return AgentReport(heartbeat, version, gpus, policy_digest=digest)


def observed_status(status: HospitalSiteStatus, report: AgentReport,
                    record_every: timedelta = HEARTBEAT_RECORD_EVERY) -> HospitalSiteStatus:
    """`status` with the agent's report copied in (fields it did not report are kept)."""
    return status.model_copy(update={
        "last_heartbeat": recorded_heartbeat(status.last_heartbeat, report.heartbeat,
                                             record_every),
        "agent_version": report.agent_version or status.agent_version,
        "observed_gpus": report.gpus or status.observed_gpus,
        "policy_digest": report.policy_digest or status.policy_digest})


def recorded_heartbeat(recorded: str | None, heartbeat: datetime | None,
                       record_every: timedelta) -> str | None:
    """status.lastHeartbeat: the Lease's renewTime, copied only when the recorded one is
    `record_every` older (or absent, or unreadable, or newer: a reset agent clock). The Lease
    is the live heartbeat, read from a watch; copying each renewal into status would cost a
    status write per site per pass."""
    if heartbeat is None:
        return recorded
    try:
        before = parse_time(recorded) if recorded else None
    except ValueError:
        before = None
    if before is None or heartbeat < before or heartbeat - before >= record_every:
        return rfc3339(heartbeat)
    return recorded


# ---- reachability and readiness ---------------------------------------------------------------


def reachable(site: str, spec: HospitalSiteSpec, heartbeat: datetime | None,
              now: datetime) -> Desired:
    """The Reachable condition from the heartbeat Lease's renewTime, renewed by the site's
    agent (pull) or by the hub's agent for the site after reaching its cluster (push)."""
    timeout = parse_duration(spec.connection.heartbeat_timeout,
                             f"HospitalSite {site}: spec.connection.heartbeatTimeout")
    if heartbeat is None:
        if spec.connection.mode == ConnectionMode.PUSH:
            ref = spec.connection.kubeconfig_secret_ref
            where = f"{ref.namespace}/{ref.name}" if ref else "(none)"
            return Desired.false(REACHABLE, "NoHeartbeat",
                                 f"push mode: the hub has not reached the site's cluster with "
                                 f"the kubeconfig in Secret {where} yet (see this site's "
                                 "Events)")
        return Desired.false(REACHABLE, "NoHeartbeat",
                             f"the site agent has never renewed its heartbeat Lease; install "
                             f"the site chart at {site} with this hub's address")
    age = now - heartbeat
    if age > timeout:
        # The age in whole minutes: the message (and so the status) changes once a minute,
        # not on every pass.
        shown = timedelta(minutes=age // timedelta(minutes=1)) if age >= \
            timedelta(minutes=1) else age
        return Desired.false(REACHABLE, "HeartbeatExpired",
                             f"last heartbeat {rfc3339(heartbeat)}, {format_duration(shown)} "
                             f"ago, older than spec.connection.heartbeatTimeout "
                             f"{spec.connection.heartbeat_timeout}")
    # No timestamp here: the message stays the same while the agent keeps renewing.
    return Desired.true(REACHABLE, "HeartbeatRecent",
                        f"the site agent renews its heartbeat Lease within "
                        f"spec.connection.heartbeatTimeout {spec.connection.heartbeat_timeout}")


def ready(site: str, spec: HospitalSiteSpec, status: HospitalSiteStatus,
          reachability: Desired, problem: str | None = None) -> Desired:
    """The Ready condition (the site may be given work), given this pass's Reachable and any
    problem with the agent's report."""
    if spec.suspend:
        return Desired.false(READY, "Suspended",
                             "spec.suspend is true: the site gets no new rounds")
    if reachability.status != "True":
        return Desired.false(READY, "NotReachable", f"Reachable is {reachability.status} "
                             f"({reachability.reason}): {reachability.message}")
    if problem:
        return Desired.false(READY, "InvalidAgentReport", problem)
    if status.agent_version is None:
        return Desired.false(READY, "AgentNotReported",
                             "the site agent heartbeats but has not reported its version and "
                             "GPUs yet")
    short = gpu_shortfall(spec, status)
    if short:
        return Desired.false(READY, "InsufficientGPUs", short)
    return Desired.true(READY, "AgentReady", f"site agent {status.agent_version} is reporting")


def gpu_shortfall(spec: HospitalSiteSpec, status: HospitalSiteStatus) -> str | None:
    """Why the observed GPUs cannot hold one training pod, or None (also when not observed)."""
    gpus = status.observed_gpus
    if gpus is None:
        return None
    have = gpus.allocatable if gpus.allocatable is not None else gpus.capacity
    if have is None or have >= spec.gpu.count:
        return None
    return (f"the agent observed {have} allocatable {gpus.resource_name or spec.gpu.resource_name}"
            f", below spec.gpu.count {spec.gpu.count} per training pod; lower spec.gpu.count or "
            "add GPU nodes")


def site_conditions(site: str, spec: HospitalSiteSpec, status: HospitalSiteStatus,
                    report: AgentReport, now: datetime) -> list[Desired]:
    """Reachable and Ready for one pass; `status` already holds the report (observed_status)."""
    heartbeat = report.heartbeat or (parse_time(status.last_heartbeat)
                                     if status.last_heartbeat else None)
    reach = reachable(site, spec, heartbeat, now)
    return [reach, ready(site, spec, status, reach, report.problem)]


# ---- maintenance windows ----------------------------------------------------------------------


@dataclass(frozen=True)
class WindowHit:
    """The maintenance window `now` falls in, and when it ends."""

    window: MaintenanceWindow
    start: datetime
    end: datetime


def active_window(windows: Sequence[MaintenanceWindow] | None, now: datetime,
                  where: str = "spec.maintenanceWindows") -> WindowHit | None:
    """The window containing `now`, if any. Windows start at a wall-clock time in their own
    zone (so 02:00 Europe/London is 01:00 UTC in summer) and last `duration` of real time.
    Raises ValueError naming the window for an unknown time zone or a bad duration."""
    for i, window in enumerate(windows or ()):
        try:
            zone = ZoneInfo(window.time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{where}[{i}].timeZone: unknown time zone {window.time_zone!r}; "
                             "use an IANA name such as Europe/Berlin or UTC") from None
        length = parse_duration(window.duration, f"{where}[{i}].duration")
        hour, minute = (int(p) for p in window.start.split(":"))
        local_today = now.astimezone(zone).date()
        # A window of up to 168h may have started on any of the previous 8 days.
        for back in range(8, -1, -1):
            day = local_today - timedelta(days=back)
            if _WEEKDAYS[day.weekday()] not in window.days:
                continue
            start = datetime(day.year, day.month, day.day, hour, minute, tzinfo=zone)
            end = _add_real(start, length)
            if start <= now < end:
                return WindowHit(window, start, end)
    return None


def _add_real(start: datetime, length: timedelta) -> datetime:
    """`start` plus elapsed time (Python adds wall-clock time to aware datetimes)."""
    return (start.astimezone(UTC) + length).astimezone(start.tzinfo)


# ---- selectors --------------------------------------------------------------------------------


def matches_selector(labels: Mapping[str, str] | None, selector: LabelSelector | None) -> bool:
    """Whether labels satisfy a metav1.LabelSelector (None or empty matches everything)."""
    labels = labels or {}
    if selector is None:
        return True
    for key, value in (selector.match_labels or {}).items():
        if labels.get(key) != value:
            return False
    for requirement in selector.match_expressions or ():
        key, operator = requirement.key, requirement.operator
        values = set(requirement.values or ())
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


# ---- admission --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteView:
    """What admission needs to know about one site, read from the API by the act layer."""

    name: str
    spec: HospitalSiteSpec
    conditions: Sequence[Condition] = ()
    status: HospitalSiteStatus = field(default_factory=HospitalSiteStatus)
    # Task slots other rounds take: unfinished SiteTasks, or admitted before their task exists.
    running_tasks: int = 0


@dataclass(frozen=True)
class Admission:
    """Whether a site joins a round, with a CamelCase reason and a message for status."""

    site: str
    admitted: bool
    reason: str
    message: str


def data_mismatch(spec: HospitalSiteSpec, selector: DataSelector,
                  task: str | None = None) -> str | None:
    """Why the site's declared data does not fit the study's data selector and task (None:
    any task), or None. A segmentation study needs sites that declare volumes
    (spec.data.kind); a site that declares no data holds slices."""
    wants = selector.modality is not None or bool(selector.labels) or selector.min_samples > 0
    data = spec.data
    needs = TASK_DATA_KIND[task] if task is not None else None
    if data is None:
        if needs is not None and needs != DataKind.SLICES:
            return (f"spec.data is empty but the study trains {task}, which needs "
                    f"spec.data.kind: {needs.value}; describe the site's data in spec.data")
        return ("spec.data is empty but the study selects data (modality, labels or "
                "minSamples); describe the site's data in spec.data") if wants else None
    if needs is not None and data.kind != needs:
        return (f"spec.data.kind is {data.kind.value}, but the study trains {task}, which "
                f"needs {needs.value}; choose a study of the site's kind of data")
    if selector.modality is not None and data.modality != selector.modality:
        return (f"spec.data.modality is {data.modality.value}, the study needs "
                f"{selector.modality.value}")
    missing = sorted(set(selector.labels or ()) - set(data.labels or ()))
    if missing:
        return f"spec.data.labels lacks {', '.join(missing)}, which the study needs"
    if data.sample_count < selector.min_samples:
        return (f"spec.data.sampleCount {data.sample_count} is below the study's minSamples "
                f"{selector.min_samples}")
    return None


def admit(site: SiteView, selector: DataSelector, now: datetime,
          task: str | None = None) -> Admission:
    """Admit a site to a round, or refuse it with the first reason that applies: Suspended,
    NotReady, InvalidMaintenanceWindow, InMaintenanceWindow, InsufficientGPUs, AtCapacity,
    DataMismatch. A round waits for the reasons that can clear by themselves
    (`decide.queue.TRANSIENT`); the others need a spec changed."""

    def refuse(reason: str, message: str) -> Admission:
        return Admission(site.name, False, reason, f"HospitalSite {site.name}: {message}")

    if site.spec.suspend:
        return refuse("Suspended", "spec.suspend is true")
    if not is_true(site.conditions, READY):
        readiness = find(site.conditions, READY)
        why = (f"{readiness.reason}: {readiness.message}" if readiness
               else "no Ready condition yet")
        return refuse("NotReady", f"not Ready ({why})")
    try:
        hit = active_window(site.spec.maintenance_windows, now)
    except ValueError as exc:
        return refuse("InvalidMaintenanceWindow", str(exc))
    if hit is not None:
        window = hit.window
        return refuse("InMaintenanceWindow",
                      f"in maintenance window {','.join(window.days)} {window.start} "
                      f"{window.time_zone} for {window.duration}, until {rfc3339(hit.end)}")
    short = gpu_shortfall(site.spec, site.status)
    if short:
        return refuse("InsufficientGPUs", short)
    limit = site.spec.limits.max_concurrent_tasks
    if site.running_tasks >= limit:
        return refuse("AtCapacity", f"serves {site.running_tasks} other round(s), "
                                    f"spec.limits.maxConcurrentTasks is {limit}")
    mismatch = data_mismatch(site.spec, selector, task)
    if mismatch:
        return refuse("DataMismatch", mismatch)
    return Admission(site.name, True, "Admitted", f"HospitalSite {site.name}: admitted")
