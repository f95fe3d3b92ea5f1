"""What the site agent reads: its SiteTasks and Lease on the hub, its trainer Jobs (with their
Kueue Workloads and pending pods while they wait), their pods' logs, its privacy ledger and the
nodes on its own cluster, as the plain typed views `site.decide` takes."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import ResourceNotFoundError
from pydantic import ValidationError

from deeprad.operator.api import API_VERSION
from deeprad.operator.api.sitetask import SiteTaskSpec, SiteTaskStatus
from deeprad.operator.client import Kube
from deeprad.operator.render.jobs import KUEUE_QUEUE_LABEL
from deeprad.operator.render.meta import LABEL_SITE, Manifest
from deeprad.operator.render.site import AGENT
from deeprad.operator.site.config import AgentConfig
from deeprad.operator.site.decide import LABEL_TASK_UID, JobView, NodeView, TaskView
from deeprad.operator.site.ledger import LEDGER_CONFIGMAP, Ledger, read_ledger

log = logging.getLogger("deeprad.agent")

LABEL_COMPONENT = "app.kubernetes.io/component"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
LOG_TAIL_LINES = 40
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set on a Job's pods by the Job controller
KUEUE_API_VERSION = "kueue.x-k8s.io/v1beta2"
MESSAGE_CHARS = 400  # of a scheduler's or Kueue's message quoted in a task's status


def tasks(hub: Kube, namespace: str) -> list[TaskView]:
    """The SiteTasks in the site's hub namespace."""
    return [task_view(obj) for obj in hub.list_objects(API_VERSION, "SiteTask", namespace)]


def jobs(local: Kube, config: AgentConfig) -> dict[str, JobView]:
    """The agent's trainer Jobs, by name, with why a Job cannot run yet: its Workload's
    message for a Job Kueue holds, the scheduler's for a pending pod. At most one list of pods
    and one of Workloads per pass, and only while some Job waits."""
    selector = f"{LABEL_SITE}={config.site},{LABEL_COMPONENT}=trainer"
    namespace = config.training.namespace
    found = local.list_objects("batch/v1", "Job", namespace, label_selector=selector)
    views = {view.name: view for view in map(job_view, found)}
    if any(v.starting for v in views.values()):
        pods = local.list_objects("v1", "Pod", namespace, label_selector=selector)
        placed = {_labels(p).get(JOB_NAME_LABEL) for p in pods
                  if (p.get("spec") or {}).get("nodeName")}
        unschedulable = unschedulable_pods(pods)
        for name, view in views.items():
            if view.starting:
                views[name] = dataclasses.replace(view, unschedulable=unschedulable.get(name),
                                                  unplaced=name not in placed)
    if any(v.suspended and v.queue and v.outcome is None for v in views.values()):
        messages, evicted = workload_messages(local, namespace)
        for job, message in messages.items():
            if job in views and views[job].suspended:
                views[job] = dataclasses.replace(views[job], queue_message=message)
        for job in evicted & set(views):
            views[job] = dataclasses.replace(views[job], ran=True)
    return views


def workload_messages(local: Kube, namespace: str) -> tuple[dict[str, str], set[str]]:
    """Why Kueue has not admitted each Job yet, by Job name, from its Workload's QuotaReserved
    or Admitted condition, and the Jobs whose Workload Kueue evicted once (`evicted_jobs`);
    empty when Workloads cannot be read (no Kueue, no RBAC): the task then just names its
    LocalQueue."""
    try:
        found = local.list_objects(KUEUE_API_VERSION, "Workload", namespace)
    except (ApiException, ResourceNotFoundError) as exc:
        log.debug("cannot list Kueue Workloads in %s: %s", namespace, exc)
        return {}, set()
    return admission_messages(found), evicted_jobs(found)


def evicted_jobs(workloads: list[Manifest]) -> set[str]:
    """Jobs whose Workload Kueue evicted (preempted, requeued) at least once: their pods may
    have run before."""
    evicted: set[str] = set()
    for workload in workloads:
        status = workload.get("status") or {}
        types = {c.get("type") for c in status.get("conditions") or ()}
        if "Evicted" in types or status.get("requeueState"):
            evicted |= {o["name"] for o in workload["metadata"].get("ownerReferences") or ()
                        if o.get("kind") == "Job"}
    return evicted


def admission_messages(workloads: list[Manifest]) -> dict[str, str]:
    """The message of each Workload's unmet QuotaReserved (else Admitted) condition, by the
    name of the Job that owns it."""
    messages = {}
    for workload in workloads:
        owners = [o["name"] for o in workload["metadata"].get("ownerReferences") or ()
                  if o.get("kind") == "Job"]
        conditions = {c.get("type"): c for c in
                      (workload.get("status") or {}).get("conditions") or ()}
        for kind in ("QuotaReserved", "Admitted"):
            cond = conditions.get(kind)
            if cond and cond.get("status") != "True" and cond.get("message"):
                messages.update(dict.fromkeys(owners, one_line(cond["message"])))
                break
    return messages


def unschedulable_pods(pods: list[Manifest]) -> dict[str, str]:
    """The scheduler's message for each Job whose pending pod it cannot place, by Job name."""
    found = {}
    for pod in pods:
        status = pod.get("status") or {}
        job = _labels(pod).get(JOB_NAME_LABEL)
        if not job or status.get("phase") != "Pending":
            continue
        for cond in status.get("conditions") or ():
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" \
                    and cond.get("reason") == "Unschedulable":
                found[job] = one_line(cond.get("message") or "no node fits the pod")
    return found


def one_line(text: str, limit: int = MESSAGE_CHARS) -> str:
    """`text` on one line, whitespace collapsed, cut at `limit` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


def job_log(local: Kube, config: AgentConfig, job: JobView) -> str:
    """The log tail of the Job's newest pod that ended as the Job did."""
    phase = "Succeeded" if job.outcome == "Complete" else "Failed"
    return local.job_log(config.training.namespace, job.name, phase, LOG_TAIL_LINES)


def ledger_configmap(local: Kube, config: AgentConfig) -> Manifest | None:
    """The privacy ledger's ConfigMap in the training namespace (None before the first DP run
    finished). An unreadable one raises: no task starts without knowing what was spent."""
    return local.get("v1", "ConfigMap", LEDGER_CONFIGMAP, config.training.namespace)


def ledger(local: Kube, config: AgentConfig) -> Ledger:
    """The site's privacy ledger, every study's DP runs on this site's data."""
    where = f"ConfigMap {config.training.namespace}/{LEDGER_CONFIGMAP}"
    return read_ledger(ledger_configmap(local, config), where)


def nodes(local: Kube, resource: str) -> list[NodeView] | None:
    """The cluster's nodes; None when they may not be read (403). An unreachable cluster
    raises, so no heartbeat claims otherwise."""
    try:
        found = local.list_objects("v1", "Node")
    except ApiException as exc:
        log.warning("cannot list nodes (%s %s); GPU capacity not reported", exc.status,
                    exc.reason)
        return None
    return [node_view(obj, resource) for obj in found]


def lease(hub: Kube, namespace: str) -> Manifest | None:
    """The agent's Lease in its hub namespace, None while the hub has not created it."""
    return hub.get("coordination.k8s.io/v1", "Lease", AGENT, namespace)


# ---- from API objects to views ----------------------------------------------------------------


def task_view(obj: Manifest) -> TaskView:
    """A SiteTask object as a view; a spec this agent cannot parse is kept as its first error."""
    meta = obj["metadata"]
    status = SiteTaskStatus.model_validate(obj.get("status") or {})
    try:
        spec = SiteTaskSpec.model_validate(obj.get("spec") or {})
    except ValidationError as exc:
        return TaskView(meta["name"], meta["uid"], status,
                        spec_error=str(exc.errors()[0]["msg"]))
    return TaskView(meta["name"], meta["uid"], status, spec)


def job_view(obj: Manifest) -> JobView:
    """A Job object as a view: its pod counts and its true Complete or Failed condition."""
    status = obj.get("status") or {}
    conditions = {c["type"]: c for c in status.get("conditions") or ()
                  if c.get("status") == "True"}
    failed = conditions.get("Failed")
    return JobView(
        name=obj["metadata"]["name"], task_uid=_labels(obj).get(LABEL_TASK_UID),
        active=int(status.get("active") or 0), succeeded=int(status.get("succeeded") or 0),
        failed=int(status.get("failed") or 0),
        outcome="Complete" if "Complete" in conditions else "Failed" if failed else None,
        failure=(failed.get("message") or failed.get("reason") or "failed") if failed
        else "failed",
        ready=int(status.get("ready") or 0),
        suspended=bool((obj.get("spec") or {}).get("suspend")),
        queue=_labels(obj).get(KUEUE_QUEUE_LABEL),
        ran=bool(status.get("startTime") or status.get("failed") or status.get("succeeded")
                 or status.get("terminating") or status.get("uncountedTerminatedPods")))


def node_view(obj: Manifest, resource: str) -> NodeView:
    """A Node object as a view of `resource` (e.g. nvidia.com/gpu)."""
    status = obj.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or ())
    return NodeView(ready=ready, gpus=int((status.get("capacity") or {}).get(resource, 0) or 0),
                    allocatable_gpus=int((status.get("allocatable") or {}).get(resource, 0)
                                         or 0),
                    product=_labels(obj).get(GPU_PRODUCT_LABEL) or None)


def _labels(obj: dict[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})
