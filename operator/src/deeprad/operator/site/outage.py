"""How the site agent lives through an API it cannot reach: the hub's, or its own cluster's.

A hospital's agent talks to two API servers over networks neither party fully controls. When
one stops answering (connection refused or reset, a timeout, a 5xx), the agent's state is
still in the API servers, so nothing is lost by waiting: the step is retried with backoff, the
outage is logged once when it starts and once when it ends (not once per pass), and no task is
reported Failed for it. `api_fault` tells such faults apart from errors that waiting cannot
heal; `Outages` keeps the one piece of memory this needs (since when each API is down), which
changes only what the agent logs and how long it waits between passes, never what it does to
a task.

While its own cluster's API is unreachable but the hub's answers, the agent says so on each
unfinished task (`UNREACHABLE_CLUSTER`), without changing its state, and fails the task
(reason ClusterUnreachable) only as the round's deadline comes: the round then ends the site's
part with that cause rather than with a silent "no report". Nothing is lost by failing it
then: a report after the deadline would not count either.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from kubernetes.client.exceptions import ApiException

from deeprad.core.store.retry import TRANSIENT_HTTP, transient_cause
from deeprad.operator.api.sitetask import TaskState
from deeprad.operator.decide.timeutil import parse_time
from deeprad.operator.site.decide import ReportTask, TaskView, report

log = logging.getLogger("deeprad.agent")

UNREACHABLE_CLUSTER = "the hospital cluster's API is unreachable"
REACHABLE_AGAIN = "the hospital cluster's API is reachable again"
CLUSTER_UNREACHABLE = "ClusterUnreachable"
BACKOFF_CAP_S = 15.0  # the longest wait between passes during an outage
# A task whose cluster is unreachable fails on the agent's last pass that ends at least this
# long before its round's deadline, so the hub reads the cause before its pass at the deadline
# drops the site without one.
DEADLINE_MARGIN = timedelta(seconds=5)


def api_fault(exc: BaseException) -> str | None:
    """A few words naming an outage of an API server (`exc` from the kubernetes client), with
    its address when known; None for an error that waiting will not heal."""
    if isinstance(exc, ApiException):
        if exc.status in TRANSIENT_HTTP and exc.status != 409:  # a conflict is an answer
            return f"HTTP {exc.status} {exc.reason or ''}".strip()
        return None
    cause = transient_cause(exc)
    if cause is None:
        return None
    pool = getattr(exc, "pool", None)  # urllib3's MaxRetryError names the server
    host, port = getattr(pool, "host", None), getattr(pool, "port", None)
    return f"{cause} to {host}:{port}" if host else cause


def unreachable_report(task: TaskView, cause: str, now: datetime, next_pass_s: float
                       ) -> ReportTask | None:
    """What an unfinished task says while the site's cluster cannot be reached: the cause,
    state unchanged (once: None when it says so already); Failed (ClusterUnreachable) on the
    last pass before its round's deadline (the next one, `next_pass_s` from now, would be
    too late)."""
    state, said = task.status.state, task.status.message or ""
    if state and state.terminal:
        return None
    message = f"{UNREACHABLE_CLUSTER}: {cause}"
    last_call = parse_time(task.spec.deadline) - DEADLINE_MARGIN if task.spec else None
    if last_call is not None and now + timedelta(seconds=next_pass_s) >= last_call:
        return report(task.name, task.status, TaskState.FAILED, f"{UNREACHABLE_CLUSTER} "
                      f"through the round's deadline: {cause}", now, terminal=True,
                      reason=CLUSTER_UNREACHABLE)
    if said == message:
        return None
    return report(task.name, task.status, state or TaskState.PENDING, message, now)


def reachable_report(task: TaskView, now: datetime) -> ReportTask | None:
    """The cluster answers again: a task that said it did not says so (once)."""
    state, said = task.status.state, task.status.message or ""
    if (state and state.terminal) or not said.startswith(UNREACHABLE_CLUSTER):
        return None
    return report(task.name, task.status, state or TaskState.PENDING, REACHABLE_AGAIN, now)


@dataclass
class Outages:
    """Since when each API ("hub", "cluster") has been unreachable, to log an outage once and
    back the agent's passes off while it lasts."""

    poll_seconds: float
    clock: Callable[[], float] = time.monotonic
    since: dict[str, float] = field(default_factory=dict)
    failures: int = 0

    def failed(self, api: str, cause: str) -> None:
        """A call to `api` failed with an outage; logged when the outage starts."""
        if api not in self.since:
            self.since[api] = self.clock()
            log.warning("%s API unreachable (%s); retrying with backoff, nothing is reported "
                        "failed for it", api, cause)
        self.failures += 1

    def answered(self, api: str) -> bool:
        """`api` answered; True (and logged) when that ends an outage."""
        start = self.since.pop(api, None)
        if start is None:
            return False
        log.info("%s API reachable again after %.0f s", api, self.clock() - start)
        if not self.since:
            self.failures = 0
        return True

    def down(self, api: str) -> bool:
        return api in self.since

    def wait_seconds(self) -> float:
        """The wait before the next pass: the poll interval, doubling while an outage lasts."""
        if not self.since:
            return self.poll_seconds
        return min(max(BACKOFF_CAP_S, self.poll_seconds),
                   self.poll_seconds * 2 ** min(self.failures, 10))
