"""The site agent (`deeprad operator --mode site`): runs at a hospital, dials out only.

Every `pollSeconds` it observes its SiteTasks in its hub namespace and the trainer Jobs in its
own training namespace (`site.observe`), decides what each pair needs (`site.decide`, where the
rules are) and applies those actions here, through the same `Kube` client the hub uses. Every
`heartbeatSeconds` it renews its Lease on the hub. Nothing is kept in memory between passes: a
restarted agent reads the same two lists and continues, and a Job is never created twice
(deterministic name, create-or-adopt).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from http.server import ThreadingHTTPServer
from urllib.parse import urlsplit

import kubernetes
from kubernetes.client.exceptions import ApiException

from deeprad.core.errors import ConfigError
from deeprad.operator import health
from deeprad.operator.api import API_VERSION
from deeprad.operator.api.names import site_namespace
from deeprad.operator.client import Kube
from deeprad.operator.decide.timeutil import now
from deeprad.operator.render.site import AGENT
from deeprad.operator.site import observe
from deeprad.operator.site.config import AgentConfig
from deeprad.operator.site.decide import (
    Action,
    CreateJob,
    DeleteJob,
    JobView,
    RecordPrivacy,
    ReportTask,
    TaskView,
    agent_failure,
    check_reservation,
    decide_task,
    gpu_capacity,
    heartbeat_due,
    ledger_refusal,
    needs_log,
    orphan_jobs,
    renew_lease,
)
from deeprad.operator.site.ledger import LEDGER_CONFIGMAP, Ledger, read_ledger, with_entry
from deeprad.operator.site.outage import (
    Outages,
    api_fault,
    reachable_report,
    unreachable_report,
)

log = logging.getLogger("deeprad.agent")


class SiteAgent:
    """One site's agent: `hub` reaches its namespace on the hub, `local` its own cluster."""

    def __init__(self, config: AgentConfig, hub: kubernetes.client.ApiClient,
                 local: kubernetes.client.ApiClient) -> None:
        self.config = config
        self.namespace = site_namespace(config.site)
        self.last_pass: float = 0.0
        self.last_heartbeat: float = 0.0
        self.last_step: float = 0.0
        self._hub_api, self._local_api = hub, local
        self.outages = Outages(config.poll_seconds)
        if config.store.endpoint is None:
            log.warning("store.endpoint is not set: every task will be refused, since its "
                        "presigned URLs could lead anywhere; set it to the hub's object store")

    # Built on first use, not in the constructor: `Kube` reads discovery documents, and an
    # agent whose clusters do not answer yet must still start (and retry on every step).

    @functools.cached_property
    def hub(self) -> Kube:
        """The hub, as far as the site's Role there reaches."""
        return Kube.of(self._hub_api)

    @functools.cached_property
    def local(self) -> Kube:
        """The site's own cluster."""
        return Kube.of(self._local_api)

    # ---- heartbeat ----------------------------------------------------------------------------

    def heartbeat(self) -> None:
        """Renew the Lease with this agent's version and GPU report."""
        resource = self.config.training.gpu.resource_name
        nodes = observe.nodes(self.local, resource)
        gpus = None if nodes is None else gpu_capacity(resource, nodes)
        renewal = renew_lease(self.config, observe.lease(self.hub, self.namespace), gpus, now())
        if renewal is None:
            log.warning("heartbeat: no Lease %s/%s on the hub yet; it appears once the hub has "
                        "registered HospitalSite %s", self.namespace, AGENT,
                        self.config.site)
            return
        self.hub.replace(renewal.lease)
        self.last_heartbeat = time.monotonic()

    # ---- tasks --------------------------------------------------------------------------------

    def sync(self) -> None:
        """One pass over every task and Job."""
        tasks = observe.tasks(self.hub, self.namespace)
        self.outages.answered("hub")
        try:
            jobs = observe.jobs(self.local, self.config)
        except Exception as exc:
            cause = api_fault(exc)
            if cause is not None:  # the hub still answers: tell it why nothing moves here
                self.outages.failed("cluster", cause)
                wait = self.outages.wait_seconds()
                self.apply([r for t in tasks
                            if (r := unreachable_report(t, cause, now(), wait))])
            raise
        if self.outages.answered("cluster"):
            self.apply([r for t in tasks if (r := reachable_report(t, now()))])
        try:
            ledger: Ledger | None = observe.ledger(self.local, self.config)
            unreadable = ""
        except ConfigError as exc:  # a tampered ledger stops new work, and says so per task
            log.error("privacy ledger: %s", exc)
            ledger, unreadable = None, str(exc)
        for task in tasks:
            try:
                if ledger is None:
                    self.apply(ledger_refusal(task, jobs.get(task.name), unreadable, now()))
                    continue
                written = self.apply(self.task_actions(task, jobs.get(task.name), ledger))
                if written is not None:  # the next task of the pass sees what this one wrote
                    ledger = written
            except ApiException as exc:
                log.warning("task %s: API call failed (%s %s); retrying next pass", task.name,
                            exc.status, exc.reason)
            except Exception as exc:  # deterministic: retrying cannot help, so say so
                if api_fault(exc) is not None:
                    raise  # an outage, not the task's fault: the pass is retried later
                log.exception("task %s: the agent cannot handle it", task.name)
                self.apply([agent_failure(task, exc, now())])
        self.apply(orphan_jobs(tasks, jobs))
        self.last_pass = time.monotonic()

    def task_actions(self, task: TaskView, job: JobView | None, ledger: Ledger
                     ) -> list[Action]:
        """What `decide_task` says for one task; a finished Job's log is read first when its
        outcome is to be reported."""
        if job is not None and needs_log(task, job):
            job = dataclasses.replace(job, log=observe.job_log(self.local, self.config, job))
        return decide_task(self.config, task, job, now(), ledger)

    def apply(self, actions: Sequence[Action]) -> Ledger | None:
        """Carry out actions in order; an API error stops the rest, and so does a reservation
        refused on the fresh ledger: its task's refusal is reported instead and its Job is
        never created. Returns the privacy ledger as last written, None when not written."""
        written: Ledger | None = None
        for action in actions:
            if isinstance(action, CreateJob):
                if self.local.create(action.manifest):
                    log.info("created training Job %s/%s", action.namespace, action.name)
            elif isinstance(action, RecordPrivacy):
                outcome = self.record_privacy(action)
                if isinstance(outcome, ReportTask):
                    self.apply([outcome])
                    return written
                written = outcome
            elif isinstance(action, DeleteJob):
                log.info("deleting Job %s: %s", action.name, action.reason)
                self.local.delete("batch/v1", "Job", action.name, self.config.training.namespace)
            elif isinstance(action, ReportTask):
                status = action.status
                body = status.model_dump(mode="json", exclude_none=True)
                if status.reason is None:  # merge patch: a Queued state's reason ends with it
                    body["reason"] = None
                self.hub.patch_status(API_VERSION, "SiteTask", action.name, self.namespace,
                                      body)
                log.info("task %s: %s — %s", action.name, status.state,
                         (status.message or "").partition("\n")[0][:200])
        return written

    def record_privacy(self, action: RecordPrivacy) -> Ledger | ReportTask:
        """Write a DP run (reservation or report) into the ledger, read afresh: create it, or
        replace it at the version read, so a concurrent write (409) or a lost create race fails
        this pass, which then retries before the Job is created or the task reported. A
        reservation is checked against that same fresh read first: its task's refusal is
        returned, nothing written, when it no longer fits. Returns the ledger as written."""
        current = observe.ledger_configmap(self.local, self.config)
        where = f"ConfigMap {self.config.training.namespace}/{LEDGER_CONFIGMAP}"
        refusal = check_reservation(self.config, action, read_ledger(current, where), now())
        if refusal is not None:
            log.warning("privacy ledger: reservation of task %s refused on the ledger as "
                        "written now: %s", action.entry.task, refusal.status.message)
            return refusal
        body = with_entry(current, self.config.training.namespace, action.key, action.entry)
        if current is not None:
            self.local.replace(body)
        elif not self.local.create(body):
            raise ApiException(status=409, reason="privacy ledger created concurrently")
        log.info("privacy ledger: %s task %s (round %d) of %s on dataset %s",
                 "reserved" if action.entry.reserved else "recorded", action.entry.task,
                 action.entry.round, action.key, action.entry.dataset)
        return read_ledger(body, where)

    # ---- the loop -----------------------------------------------------------------------------

    def step(self) -> None:
        """One iteration: the heartbeat when due, then a sync pass; API errors are logged
        and retried on the next step."""
        if heartbeat_due(self.config, time.monotonic() - self.last_heartbeat):
            self._guard("heartbeat", self.heartbeat)
        self._guard("sync", self.sync)
        self.last_step = time.monotonic()

    def _guard(self, what: str, fn: Callable[[], None]) -> None:
        """Run one step; an API outage is logged once (`Outages`), anything else as before."""
        try:
            fn()
        except Exception as exc:  # keep the agent alive; the next pass retries from the API
            cause = api_fault(exc)
            if cause is not None:
                self.outages.failed(self._api_of(exc), cause)
            elif isinstance(exc, ApiException):
                log.warning("%s: API call failed (%s %s): %s", what, exc.status, exc.reason,
                            (exc.body or "")[:300])
            else:
                log.exception("%s failed", what)

    def _api_of(self, exc: BaseException) -> str:
        """Which API a failed call went to, by the server address urllib3 names."""
        pool = getattr(exc, "pool", None)
        for api, client in (("hub", self._hub_api), ("cluster", self._local_api)):
            where = urlsplit(client.configuration.host)
            if pool is not None and (pool.host, pool.port) == (where.hostname, where.port):
                return api
        return "hub or cluster"

    def run(self, stop: threading.Event) -> None:
        """Step until `stop` is set; passes back off while an API is unreachable."""
        while not stop.is_set():
            self.step()
            stop.wait(self.outages.wait_seconds())

    def healthy(self) -> bool:
        """Alive when a sync pass finished recently, or the loop keeps retrying an API outage
        (a restart would not bring the API back)."""
        latest = max(self.last_pass, self.last_step if self.outages.since else 0.0)
        return time.monotonic() - latest < max(60.0, 6 * self.config.poll_seconds,
                                               2 * self.outages.wait_seconds())


def serve_health(agent: SiteAgent, address: str, port: int) -> ThreadingHTTPServer:
    """/healthz answers 200 while sync passes keep finishing."""
    return health.serve_health(address, port, lambda: {"ok": agent.healthy()})
