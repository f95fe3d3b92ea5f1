"""Leader election on a `coordination.k8s.io/v1` Lease, so the hub operator and the site agent
can run as several replicas of which exactly one acts.

Why our own: kopf's peering pauses a peer only for one of *higher* priority; peers of the same
priority (every replica of one Deployment) all run. The rules are client-go's leaderelection:

- a candidate takes the Lease when it is free (no holder), its own, or expired, writing with
  the `resourceVersion` it read, so of two candidates racing for it the API server lets exactly
  one win (the other gets 409). Expired is judged on the candidate's own monotonic clock, never
  on the holder's `renewTime`: the record must have stayed unchanged for
  `leaseDurationSeconds` since this candidate first saw it, so clocks that disagree between
  nodes cannot make a standby take over early;
- the leader renews every retry period; when no renewal has succeeded for the renew deadline
  (which, plus a retry period, fits in the lease as written, so it stops before anyone may
  take over) it exits the process at once, non-zero: the pod restarts as a standby, and two
  leaders never act together;
- on SIGTERM the leader releases the Lease (no holder), so a rolling update hands over at once
  instead of after the lease runs out; not while a handler thread of its still runs.

A standby blocks before it starts kopf or the agent loop, answering its liveness probe
meanwhile. After a leader dies without releasing (SIGKILL, a lost node) a standby takes over
`leaseDuration` after it first saw the last renewal (up to a retry period after it), plus the
time to start kopf: about 12 s with the defaults below (docs: README "High availability").
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

from deeprad.operator.health import serve_health

log = logging.getLogger("deeprad.leader")

LEASE_DURATION = 10.0  # seconds a standby waits after the last renewal before taking over
RENEW_DEADLINE = 7.0  # seconds the leader keeps acting without a successful renewal
RETRY_PERIOD = 2.0  # seconds between renewals, and between a standby's attempts
LOST_EXIT_CODE = 1
LEASE_VERBS = "get, create and update"  # on coordination.k8s.io leases: what a candidate needs
_MICROTIME = "%Y-%m-%dT%H:%M:%S.%fZ"


@dataclass(frozen=True)
class Timing:
    """How long a lease lasts, how long the leader may go without renewing, how often it
    tries."""

    lease_duration: float = LEASE_DURATION
    renew_deadline: float = RENEW_DEADLINE
    retry_period: float = RETRY_PERIOD

    @property
    def lease_seconds(self) -> int:
        """`leaseDurationSeconds` as written to the Lease (an integer, rounded up)."""
        return lease_seconds(self.lease_duration)

    def problem(self) -> str | None:
        """Why these durations cannot guarantee a single leader, if they cannot."""
        for flag, value in (("lease-duration", self.lease_duration),
                            ("renew-deadline", self.renew_deadline),
                            ("retry-period", self.retry_period)):
            if not value > 0:  # also refuses NaN
                return f"leader election: --leader-election-{flag} must be > 0, got {value:g}"
        if self.retry_period >= self.renew_deadline:
            return (f"leader election: --leader-election-retry-period {self.retry_period:g} "
                    f"must be shorter than --leader-election-renew-deadline "
                    f"{self.renew_deadline:g}")
        # The leader notices a missed deadline up to one tick late; a standby waits the whole
        # lease as written (whole seconds) after it saw the last renewal.
        if self.renew_deadline + self.retry_period > self.lease_seconds:
            written = ("" if self.lease_seconds == self.lease_duration
                       else f" (written as {self.lease_seconds} s)")
            return (f"leader election: --leader-election-renew-deadline "
                    f"{self.renew_deadline:g} + --leader-election-retry-period "
                    f"{self.retry_period:g} must not exceed --leader-election-lease-duration "
                    f"{self.lease_duration:g}{written}, or a standby could take over while the "
                    "leader still acts; lengthen the lease or shorten the other two")
        return None


def lease_seconds(lease_duration: float) -> int:
    """The whole seconds written as `leaseDurationSeconds`: rounded up, so the Lease never
    promises less than the leader's timing was checked against."""
    return max(1, math.ceil(lease_duration))


@dataclass(frozen=True)
class LeaseRecord:
    """What a Lease says about its holder."""

    holder: str = ""
    renew_time: datetime | None = None
    duration: float | None = None
    acquire_time: str | None = None
    transitions: int = 0
    resource_version: str | None = None

    @classmethod
    def from_lease(cls, lease: dict[str, Any]) -> LeaseRecord:
        spec = lease.get("spec") or {}
        renew = spec.get("renewTime")
        return cls(holder=spec.get("holderIdentity") or "",
                   renew_time=_parse_time(renew) if renew else None,
                   duration=spec.get("leaseDurationSeconds"),
                   acquire_time=spec.get("acquireTime"),
                   transitions=int(spec.get("leaseTransitions") or 0),
                   resource_version=(lease.get("metadata") or {}).get("resourceVersion"))


def _parse_time(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass(frozen=True)
class Observation:
    """A Lease record as a candidate first saw it, and when, on its own monotonic clock."""

    record: LeaseRecord
    at: float


def observe(previous: Observation | None, record: LeaseRecord, now: float) -> Observation:
    """The observation after reading `record` at monotonic time `now`: the previous one while
    the record is unchanged (resourceVersion and spec), else a fresh one: any write by the
    holder restarts this candidate's wait."""
    if previous is not None and _same_record(previous.record, record):
        return previous
    return Observation(record, now)


def _same_record(a: LeaseRecord, b: LeaseRecord) -> bool:
    return (a.resource_version, a.holder, a.renew_time, a.duration, a.transitions) == (
        b.resource_version, b.holder, b.renew_time, b.duration, b.transitions)


def takeover_at(observation: Observation, identity: str) -> float | None:
    """The monotonic time after which `identity` may take the observed Lease; None when it may
    at once (free, its own, or without a duration, which holds nobody)."""
    record = observation.record
    if not record.holder or record.holder == identity or record.duration is None:
        return None
    return observation.at + record.duration


def may_take(observation: Observation, identity: str, now: float) -> bool:
    """Whether `identity` may write itself as holder at monotonic time `now`: the Lease is free,
    its own, or its record has not changed for a whole lease since this candidate saw it (the
    holder's renewTime is another node's clock, so it decides nothing)."""
    ends = takeover_at(observation, identity)
    return ends is None or ends < now


def claimed_spec(record: LeaseRecord | None, identity: str, now: datetime,
                 lease_duration: float) -> dict[str, Any]:
    """The Lease spec `identity` writes to take or renew it; a change of holder counts a
    transition and restarts acquireTime."""
    stamp = now.strftime(_MICROTIME)
    keeps = record is not None and record.holder == identity
    transitions = (record.transitions if record else 0) + (0 if keeps or record is None else 1)
    return {"holderIdentity": identity, "leaseDurationSeconds": lease_seconds(lease_duration),
            "acquireTime": (record.acquire_time if keeps and record else None) or stamp,
            "renewTime": stamp, "leaseTransitions": transitions}


def released_spec(record: LeaseRecord, now: datetime) -> dict[str, Any]:
    """The spec a leader leaves behind on a clean exit: no holder, so anyone takes it now."""
    return {"holderIdentity": None, "leaseDurationSeconds": 1,
            "renewTime": now.strftime(_MICROTIME), "acquireTime": record.acquire_time,
            "leaseTransitions": record.transitions}


def forbidden_problem(namespace: str, name: str, verb: str, status: int, reason: str) -> str:
    """One line for a Lease request RBAC refused (403): which Lease, which verbs a candidate
    needs, and where they are granted."""
    return (f"leader election: Lease {namespace}/{name}: {verb} refused ({status} {reason}); "
            f"this pod's ServiceAccount needs {LEASE_VERBS} on coordination.k8s.io leases "
            f"in namespace {namespace} (name {name}): grant them in the chart's Role "
            "(rbac.create with leaderElection.enabled) or your own Role and RoleBinding; no "
            "replica can lead until then")


def default_identity() -> str:
    """The pod's name (env POD_NAME, from the downward API), else hostname and pid."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


def _exit_lost(reason: str) -> None:
    # No logging: a thread blocked inside a handler may hold a logging lock, and waiting for it
    # would keep this process acting as leader. One raw write to stderr, then out at once
    # (kopf's tasks and the agent's threads must not go on).
    line = f"leader election: {reason}; exiting so that no two replicas act\n"
    try:
        os.write(2, line.encode(errors="replace"))
    finally:
        os._exit(LOST_EXIT_CODE)


class LeaderElector:
    """One candidate for one Lease, through the kubernetes client (`ApiClient`)."""

    def __init__(self, api: Any, namespace: str, name: str, identity: str | None = None,
                 timing: Timing = Timing(),
                 on_lost: Callable[[str], None] = _exit_lost) -> None:
        import kubernetes

        # Any: with _preload_content=False the calls take and return raw JSON, not V1Lease
        # (plain dicts keep renewTime in the API's microsecond format).
        self.leases: Any = kubernetes.client.CoordinationV1Api(api)
        self.namespace, self.name = namespace, name
        self.identity = identity or default_identity()
        self.timing = timing
        self.on_lost = on_lost
        self.leading = False
        self.record: LeaseRecord | None = None
        self.observation: Observation | None = None  # the record as first seen, and when
        self._problem: str | None = None  # the last failure logged, so each is logged once
        self._renewed = 0.0  # monotonic time of the start of the last successful write
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # Each call ends well inside the renew deadline, so a hung connection cannot outlast it.
        self._timeout = max(0.5, timing.renew_deadline / 3)

    @property
    def where(self) -> str:
        return f"Lease {self.namespace}/{self.name}"

    def _read(self) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            response = self.leases.read_namespaced_lease(
                self.name, self.namespace, _preload_content=False,
                _request_timeout=self._timeout)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(json.loads(response.data))

    def try_acquire_or_renew(self) -> bool:
        """One attempt to hold the Lease; True when this candidate holds it now."""
        from kubernetes.client.exceptions import ApiException

        started = time.monotonic()
        now = datetime.now(UTC)
        verb = "get"
        try:
            lease = self._read()
            if lease is None:
                verb = "create"
                spec = claimed_spec(None, self.identity, now, self.timing.lease_duration)
                body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": self.name, "namespace": self.namespace},
                        "spec": spec}
                written = self.leases.create_namespaced_lease(
                    self.namespace, body, _preload_content=False,
                    _request_timeout=self._timeout)
            else:
                record = LeaseRecord.from_lease(lease)
                self.record = record
                self.observation = observe(self.observation, record, time.monotonic())
                if not may_take(self.observation, self.identity, time.monotonic()):
                    self._problem = None
                    return False
                verb = "update"
                lease["spec"] = claimed_spec(record, self.identity, now,
                                             self.timing.lease_duration)
                # resourceVersion stays in the body: a concurrent writer makes this a 409.
                written = self.leases.replace_namespaced_lease(
                    self.name, self.namespace, lease, _preload_content=False,
                    _request_timeout=self._timeout)
        except ApiException as exc:
            if exc.status == 409:  # another candidate wrote first
                return False
            if exc.status == 403:  # RBAC: retrying never helps, so say what to grant
                self._report(logging.ERROR, forbidden_problem(
                    self.namespace, self.name, verb, exc.status, str(exc.reason)))
            else:
                self._report(logging.WARNING, f"leader election: {self.where}: {verb} failed: "
                                              f"{exc.status} {exc.reason}; retrying")
            return False
        except Exception as exc:  # connection refused, timeouts: the next attempt retries
            self._report(logging.WARNING,
                         f"leader election: {self.where}: {verb} failed: {exc}; retrying")
            return False
        self.record = LeaseRecord.from_lease(json.loads(written.data))
        self.observation = Observation(self.record, time.monotonic())
        self._renewed = started
        self._problem = None
        return True

    def _report(self, level: int, problem: str) -> None:
        """Log `problem` once, not every retry period, until an attempt gets through."""
        if problem != self._problem:
            self._problem = problem
            log.log(level, "%s", problem)

    def wait_until_leader(self, stop: threading.Event) -> bool:
        """Block as a standby until this candidate holds the Lease (True) or `stop` is set."""
        log.info("leader election: %s standing by for %s", self.identity, self.where)
        while not stop.is_set():
            if self.try_acquire_or_renew():
                self.leading = True
                log.info("leader election: %s leads %s (transition %d)", self.identity,
                         self.where, self.record.transitions if self.record else 0)
                return True
            stop.wait(self._pause())
        return False

    def _pause(self) -> float:
        """Until the next attempt: the retry period, or less when the holder's lease runs out
        sooner (failover is then not rounded up to a retry period)."""
        ends = takeover_at(self.observation, self.identity) if self.observation else None
        if ends is None:
            return self.timing.retry_period
        left = ends - time.monotonic() + 0.05
        return max(0.05, min(self.timing.retry_period, left))

    def start_renewing(self) -> None:
        """Renew every retry period in the background; call `on_lost` when another holder
        appears or no renewal succeeded for the renew deadline."""
        self._stop.clear()
        self._threads = [threading.Thread(target=self._renew_loop, daemon=True,
                                          name="lease-renew"),
                         threading.Thread(target=self._watchdog, daemon=True,
                                          name="lease-watchdog")]
        for thread in self._threads:
            thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.timing.retry_period):
            if self.try_acquire_or_renew():
                continue
            if self.record is not None and self.record.holder not in ("", self.identity):
                self._lose(f"{self.where} is held by {self.record.holder}")
                return

    def _watchdog(self) -> None:
        while not self._stop.wait(min(0.25, self.timing.retry_period / 4)):
            silent = time.monotonic() - self._renewed
            if silent > self.timing.renew_deadline:
                self._lose(f"{self.where} not renewed for {silent:.1f}s (renew deadline "
                           f"{self.timing.renew_deadline:g}s)")
                return

    def _lose(self, reason: str) -> None:
        if not self.leading:
            return
        self.leading = False
        self._stop.set()
        self.on_lost(reason)

    def stop_renewing(self) -> None:
        """Stop the background renewal (the Lease stays held until it expires or is
        released)."""
        self._stop.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=self._timeout * 2)
        self._threads = []

    def release(self) -> None:
        """Give the Lease up now, if this candidate still holds it: a clean exit hands over at
        once."""
        from kubernetes.client.exceptions import ApiException

        was_leading, self.leading = self.leading, False
        self.stop_renewing()
        if not was_leading:
            return
        try:
            lease = self._read()
            if lease is None:
                return
            record = LeaseRecord.from_lease(lease)
            if record.holder != self.identity:
                return
            lease["spec"] = released_spec(record, datetime.now(UTC))
            self.leases.replace_namespaced_lease(self.name, self.namespace, lease,
                                                 _preload_content=False,
                                                 _request_timeout=self._timeout)
            log.info("leader election: %s released %s", self.identity, self.where)
        except (ApiException, OSError) as exc:  # it expires on its own
            log.warning("leader election: releasing %s failed (%s); it expires in %gs",
                        self.where, exc, self.timing.lease_duration)


def serve_standby_health(liveness: str) -> ThreadingHTTPServer | None:
    """A standby's liveness endpoint (200: waiting is healthy), on the address of `--liveness`,
    until the leader's own endpoint replaces it; None when liveness is off."""
    if not liveness:
        return None
    url = urlparse(liveness)
    return serve_health(url.hostname or "0.0.0.0", url.port or 8080,
                        lambda: {"ok": True, "leader": False}, name="standby-health")


def stand_by(elector: LeaderElector, liveness: str, stop: threading.Event) -> bool:
    """Wait as a healthy standby until `elector` leads (True: renewal running, the liveness
    port free for the leader's endpoint) or `stop` is set (False)."""
    server = serve_standby_health(liveness)
    try:
        if not elector.wait_until_leader(stop):
            return False
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    elector.start_renewing()
    return True
