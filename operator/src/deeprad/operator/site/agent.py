"""The site agent (`deeprad operator --mode site`): runs at a hospital, dials out only.

Every `pollSeconds` it lists its SiteTasks in its hub namespace and the trainer Jobs in its own
training namespace, and brings each pair in line:

- a task without a Job gets one (name = task name, labelled with the task's uid), unless the
  round's deadline passed or the task asks for something the site refuses;
- a running Job reports Running; a finished Job reports Succeeded with the trainer's result
  (the last JSON line of its log) or Failed with the log's tail;
- a Job whose task is gone (round deleted) is deleted.

Every `heartbeatSeconds` it renews its Lease on the hub, with its version and the GPUs its
cluster offers. Nothing is kept in memory between passes: a restarted agent reads the same two
lists and continues, and a Job is never created twice (deterministic name, create-or-adopt).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import kubernetes
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from deeprad.core import __version__
from deeprad.core.errors import DeepRadError
from deeprad.core.protocol import SiteResult
from deeprad.operator.api import GROUP, VERSION
from deeprad.operator.api.hospitalsite import GpuCapacity
from deeprad.operator.api.names import site_namespace
from deeprad.operator.api.sitetask import SiteTaskSpec, SiteTaskStatus, TaskState
from deeprad.operator.client import job_pod_log
from deeprad.operator.decide.sites import AGENT_VERSION_ANNOTATION, OBSERVED_GPUS_ANNOTATION
from deeprad.operator.decide.timeutil import now, parse_time, rfc3339
from deeprad.operator.render.jobs import (
    JobContext,
    StoreAccess,
    active_deadline_seconds,
    trainer_job,
)
from deeprad.operator.render.meta import LABEL_SITE
from deeprad.operator.render.site import AGENT
from deeprad.operator.site.config import AgentConfig
from deeprad.operator.site.training import presigned_env, task_result, training_task

log = logging.getLogger("deeprad.agent")

LABEL_TASK_UID = "deeprad.io/task-uid"
LABEL_COMPONENT = "app.kubernetes.io/component"
PRESIGNED_STORE = "presigned:"
LOG_TAIL_LINES = 40
TASK_HEARTBEAT_SECONDS = 30.0




class SiteAgent:
    """One site's agent: `hub` reaches its namespace on the hub, `local` its own cluster."""

    def __init__(self, config: AgentConfig, hub: kubernetes.client.ApiClient,
                 local: kubernetes.client.ApiClient) -> None:
        self.config = config
        self.namespace = site_namespace(config.site)
        self.custom = kubernetes.client.CustomObjectsApi(hub)
        self.leases = kubernetes.client.CoordinationV1Api(hub)
        self.batch = kubernetes.client.BatchV1Api(local)
        self.core = kubernetes.client.CoreV1Api(local)
        self.last_pass: float = 0.0
        self.last_heartbeat: float = 0.0

    # ---- heartbeat ----------------------------------------------------------------------------

    def observed_gpus(self) -> GpuCapacity | None:
        """GPUs of the configured resource on Ready nodes; None when nodes may not be read
        (403). An unreachable cluster raises, so no heartbeat claims otherwise."""
        resource = self.config.training.gpu.resource_name
        try:
            nodes = self.core.api_client.sanitize_for_serialization(
                self.core.list_node())["items"]
        except ApiException as exc:
            log.warning("cannot list nodes (%s %s); GPU capacity not reported", exc.status,
                        exc.reason)
            return None
        capacity = allocatable = count = 0
        products: set[str] = set()
        for node in nodes:
            st = node.get("status") or {}
            ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                        for c in st.get("conditions") or ())
            cap = int((st.get("capacity") or {}).get(resource, 0) or 0)
            if not ready or cap == 0:
                continue
            count += 1
            capacity += cap
            allocatable += int((st.get("allocatable") or {}).get(resource, 0) or 0)
            product = _labels(node).get("nvidia.com/gpu.product")
            if product:
                products.add(product)
        return GpuCapacity(resource_name=resource, capacity=capacity, allocatable=allocatable,
                           nodes=count, product=",".join(sorted(products))[:256] or None)

    def heartbeat(self) -> None:
        """Renew the Lease with this agent's version and GPU report."""
        notes = {AGENT_VERSION_ANNOTATION: __version__}
        gpus = self.observed_gpus()
        if gpus is not None:
            notes[OBSERVED_GPUS_ANNOTATION] = gpus.model_dump_json(exclude_none=True)
        # A merge patch needs `patch`, which the site's Role does not grant: the Role allows
        # get and update of this one Lease, so read it and write it back whole.
        lease = self.leases.api_client.sanitize_for_serialization(
            self.leases.read_namespaced_lease(AGENT, self.namespace))
        lease.setdefault("metadata", {}).setdefault("annotations", {}).update(notes)
        lease.setdefault("spec", {}).update({
            "holderIdentity": f"{self.config.site}-agent",
            "leaseDurationSeconds": max(1, round(3 * self.config.heartbeat_seconds)),
            "renewTime": now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")})
        self.leases.replace_namespaced_lease(AGENT, self.namespace, lease)
        self.last_heartbeat = time.monotonic()

    # ---- tasks --------------------------------------------------------------------------------

    def list_tasks(self) -> list[dict[str, Any]]:
        out = cast(dict[str, Any], self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "sitetasks"))
        return list(out.get("items", []))

    def list_jobs(self) -> dict[str, dict[str, Any]]:
        """The agent's trainer Jobs by name, as API dicts (camelCase)."""
        selector = f"{LABEL_SITE}={self.config.site},{LABEL_COMPONENT}=trainer"
        out = self.batch.list_namespaced_job(self.config.training.namespace,
                                             label_selector=selector)
        jobs = self.batch.api_client.sanitize_for_serialization(out)["items"]
        return {j["metadata"]["name"]: j for j in jobs}

    def sync(self) -> None:
        """One pass over every task and Job."""
        tasks = self.list_tasks()
        jobs = self.list_jobs()
        uids = {t["metadata"]["uid"] for t in tasks}
        for task in tasks:
            name = task["metadata"]["name"]
            try:
                self.sync_task(task, jobs.get(name))
            except ApiException as exc:
                log.warning("task %s: API call failed (%s %s); retrying next pass", name,
                            exc.status, exc.reason)
            except Exception as exc:  # deterministic: retrying cannot help, so say so
                log.exception("task %s: the agent cannot handle it", name)
                status = SiteTaskStatus.model_validate(task.get("status") or {})
                self.report(name, status, TaskState.FAILED, f"site agent {__version__} "
                            f"failed on this task: {type(exc).__name__}: {exc}", terminal=True)
        for name, job in jobs.items():
            if _labels(job).get(LABEL_TASK_UID) not in uids:
                log.info("deleting Job %s: its task is gone", name)
                self._delete_job(name)
        self.last_pass = time.monotonic()

    def sync_task(self, task: dict[str, Any], job: dict[str, Any] | None) -> None:
        meta = task["metadata"]
        name, uid = meta["name"], meta["uid"]
        status = SiteTaskStatus.model_validate(task.get("status") or {})
        if status.state and status.state.terminal:
            return
        try:
            spec = SiteTaskSpec.model_validate(task["spec"])
        except ValidationError as exc:
            self.report(name, status, TaskState.FAILED, f"the task's spec is invalid for agent "
                        f"{__version__}: {exc.errors()[0]['msg']}", terminal=True)
            return
        if job is not None and _labels(job).get(LABEL_TASK_UID) != uid:
            log.info("Job %s belongs to an earlier task of that name; deleting it", name)
            self._delete_job(name)
            return
        if job is None:
            self.start(name, uid, spec, status)
            return
        self.follow(name, spec, status, job)

    def start(self, name: str, uid: str, spec: SiteTaskSpec, status: SiteTaskStatus) -> None:
        """Create the trainer Job for a task, or refuse the task with a reason."""
        t = now()
        deadline = parse_time(spec.deadline)
        if t >= deadline:
            self.report(name, status, TaskState.FAILED, "the round's deadline passed before "
                        "the site could start training", terminal=True)
            return
        if status.state in (TaskState.ACCEPTED, TaskState.RUNNING) and status.job_name:
            # The Job existed and is gone (deleted by hand or collected): never run it twice,
            # an update may already be uploaded.
            self.report(name, status, TaskState.FAILED, f"training Job {status.job_name} "
                        "disappeared before it finished", terminal=True)
            return
        try:
            training = training_task(spec, self.config)
        except (DeepRadError, ValidationError) as exc:
            self.report(name, status, TaskState.FAILED, f"refused by site {self.config.site}: "
                        f"{exc}", terminal=True)
            return
        placement = self.config.training
        ctx = JobContext(name=name, namespace=placement.namespace, study=spec.study,
                         round_name=spec.round_ref.name, image=placement.image,
                         image_pull_policy=placement.image_pull_policy)
        manifest = trainer_job(ctx, self.config.site, placement, training,
                               active_deadline_seconds(deadline, t),
                               store=StoreAccess(PRESIGNED_STORE), extra_env=presigned_env(spec))
        manifest["metadata"]["labels"][LABEL_TASK_UID] = uid
        try:
            self.batch.create_namespaced_job(placement.namespace, manifest)
            log.info("created training Job %s/%s", placement.namespace, name)
        except ApiException as exc:
            if exc.status != 409:
                raise
        status.job_name = name
        status.start_time = status.start_time or rfc3339(t)
        self.report(name, status, TaskState.ACCEPTED,
                    f"training Job {placement.namespace}/{name} created")

    def follow(self, name: str, spec: SiteTaskSpec, status: SiteTaskStatus,
               job: dict[str, Any]) -> None:
        """Report a Job's progress and outcome."""
        js = job.get("status") or {}
        status.job_name = name
        status.attempts = sum(int(js.get(k) or 0) for k in ("active", "succeeded", "failed"))
        conditions = {c["type"]: c for c in js.get("conditions") or ()
                      if c.get("status") == "True"}
        if "Complete" in conditions:
            text = self.job_log(name, succeeded=True)
            result = _last_result(text)
            if result is None:
                self.report(name, status, TaskState.FAILED, "the trainer finished but printed "
                            "no result; log tail:\n" + _tail(text), terminal=True)
                return
            status.result = task_result(result, spec)
            self.report(name, status, TaskState.SUCCEEDED,
                        f"update uploaded ({result.num_samples} samples, "
                        f"{result.duration_s:.0f}s)", terminal=True)
        elif "Failed" in conditions:
            failed = conditions["Failed"]
            why = failed.get("message") or failed.get("reason") or "failed"
            self.report(name, status, TaskState.FAILED, f"training Job failed ({why}); log "
                        "tail:\n" + _tail(self.job_log(name, succeeded=False)), terminal=True)
        elif js.get("active") and status.state != TaskState.RUNNING:
            self.report(name, status, TaskState.RUNNING, "training")
        elif _age(status.heartbeat_time) > TASK_HEARTBEAT_SECONDS:
            # The task's heartbeat tells the hub the agent still follows a long Job.
            self.report(name, status, status.state or TaskState.ACCEPTED,
                        status.message or "training")

    def job_log(self, job: str, succeeded: bool) -> str:
        """The log of the Job's newest pod that ended as wanted."""
        return job_pod_log(self.core, self.config.training.namespace, job,
                           "Succeeded" if succeeded else "Failed", LOG_TAIL_LINES)

    def report(self, name: str, status: SiteTaskStatus, state: TaskState, message: str,
               terminal: bool = False) -> None:
        """Patch the task's status (state, message, heartbeat, completion)."""
        t = rfc3339(now())
        status.state = state
        status.message = message[-4000:]
        status.heartbeat_time = t
        status.agent_version = __version__
        if terminal:
            status.completion_time = status.completion_time or t
        body = {"status": status.model_dump(mode="json", exclude_none=True)}
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, self.namespace,
                                                          "sitetasks", name, body)
        log.info("task %s: %s — %s", name, state.value, message.splitlines()[0][:200])

    def _delete_job(self, name: str) -> None:
        try:
            self.batch.delete_namespaced_job(name, self.config.training.namespace,
                                             propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise

    # ---- the loop -----------------------------------------------------------------------------

    def step(self) -> None:
        """One iteration: the heartbeat when due, then a sync pass; API errors are logged
        and retried on the next step."""
        if time.monotonic() - self.last_heartbeat >= self.config.heartbeat_seconds:
            _guard("heartbeat", self.heartbeat)
        _guard("sync", self.sync)

    def run(self, stop: threading.Event) -> None:
        """Step until `stop` is set."""
        while not stop.is_set():
            self.step()
            stop.wait(self.config.poll_seconds)

    def healthy(self) -> bool:
        """Alive when a sync pass finished recently."""
        return time.monotonic() - self.last_pass < max(60.0, 6 * self.config.poll_seconds)


def _guard(what: str, fn: Callable[[], None]) -> None:
    try:
        fn()
    except ApiException as exc:
        log.warning("%s: API call failed (%s %s): %s", what, exc.status, exc.reason,
                    (exc.body or "")[:300])
    except Exception:  # keep the agent alive; the next pass retries from the API's state
        log.exception("%s failed", what)


def _age(stamp: str | None) -> float:
    """Seconds since an RFC 3339 time (infinite when unset)."""
    return float("inf") if not stamp else (now() - parse_time(stamp)).total_seconds()


def _labels(obj: dict[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})


def _last_result(text: str) -> SiteResult | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return SiteResult.model_validate_json(line)
            except ValidationError:
                continue
    return None


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.splitlines()[-lines:])


def serve_health(agent: SiteAgent, address: str, port: int) -> ThreadingHTTPServer:
    """/healthz answers 200 while sync passes keep finishing."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = agent.healthy()
            body = json.dumps({"ok": ok}).encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((address, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="health").start()
    return server
