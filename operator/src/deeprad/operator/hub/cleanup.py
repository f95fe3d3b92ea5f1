"""Lifecycles: no object waits for the operator to be deleted, and nothing piles up.

No finalizers. kopf puts its finalizer on every object that has a timer or daemon (it stops
them when it sees deletionTimestamp), so deleting a round, study or site would hang while the
operator is absent. Here every timer and daemon is registered without one and instead stops
when its object leaves the `lives` index: kopf drops a deleted object from its indices before
it re-matches the object's timers, and a timer whose filter no longer matches is stopped.
Objects an older operator gave the finalizer lose it on the first event kopf sees, since no
handler needs it. Deletion handlers become watch handlers on the DELETED event.

Garbage collection (`decide.cleanup` decides): a deleted round's SiteTasks and hub Jobs go on
its DELETED event; SiteTasks of an ended round go --task-history after it ended; a sweep every
--sweep-interval (run by the first site heartbeat pass that finds it due, so only the active
operator runs it) also collects the orphans of rounds deleted while the operator was down:
from the indices, plus one LIST of the jobs namespace's Jobs.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import kopf

from deeprad.operator.api import API_VERSION
from deeprad.operator.api.federatedround import RoundState
from deeprad.operator.client import reconciling
from deeprad.operator.decide import cleanup as rules
from deeprad.operator.decide.timeutil import now, parse_time
from deeprad.operator.hub.resources import (
    FEDERATED_ROUNDS,
    FEDERATED_STUDIES,
    HOSPITAL_SITES,
)
from deeprad.operator.options import HubOptions
from deeprad.operator.render.meta import MANAGED_BY

if TYPE_CHECKING:  # the memo holds the Sweeper
    from deeprad.operator.hub.memo import HubMemo

log = logging.getLogger("deeprad.cleanup")

TASK_HISTORY = timedelta(seconds=HubOptions.task_history)
SWEEP_SECONDS = HubOptions.sweep_interval
# The `lives` index of each kind that has timers or daemons, by plural.
LIVES = {"hospitalsites": "site_lives", "federatedstudies": "study_lives",
         "federatedrounds": "round_lives"}


# ---- indices ----------------------------------------------------------------------------------


def alive(uid: str, **_: Any) -> dict[str, None]:
    """Index of existing objects by uid (a timer's filter reads it)."""
    return {uid: None}


def round_life(name: str, namespace: str | None, uid: str, status: kopf.Status, **_: Any
               ) -> dict[str, rules.RoundLife]:
    """Index of FederatedRounds by uid: where each is, whether and when it ended."""
    state = status.get("state")
    ended = state in (RoundState.SUCCEEDED.value, RoundState.FAILED.value)
    try:
        done = parse_time(status["completionTime"]) if status.get("completionTime") else None
    except ValueError:
        done = None
    return {uid: rules.RoundLife(namespace or "", name, ended, done)}


# ---- no finalizers ----------------------------------------------------------------------------


def while_alive(index: str, when: Callable[..., bool] | None) -> Callable[..., bool]:
    """A timer's filter: its own `when`, and its object still in the `index` of lives."""

    def check(uid: str, **kwargs: Any) -> bool:
        lives: Mapping[str, Any] = kwargs[index]
        return uid in lives and (when is None or bool(when(uid=uid, **kwargs)))

    return check


def without_finalizers(registry: kopf.OperatorRegistry) -> None:
    """Register every timer and daemon of `registry` again without kopf's finalizer, stopped
    when its object leaves its `lives` index instead; fail on any handler that needs one."""
    spawning = registry._spawning  # kopf has no public switch for the timers' finalizer
    for i, handler in enumerate(list(spawning.get_all_handlers())):
        selector = handler.selector
        plural = (selector.plural or selector.any_name) if selector else None
        if plural not in LIVES:
            raise ValueError(f"kopf handler {handler.id}: no lives index for {plural}; add "
                             "one to deeprad.operator.hub.cleanup.LIVES")
        spawning._handlers[i] = dataclasses.replace(
            handler, requires_finalizer=False, when=while_alive(LIVES[plural], handler.when))
    for changing in registry._changing.get_all_handlers():
        if changing.requires_finalizer:
            raise ValueError(f"kopf handler {changing.id} needs a finalizer: objects could not "
                             "be deleted without the operator; watch DELETED events instead")


def deleted(type: str, **_: Any) -> bool:
    """Filter of watch handlers: the object is gone."""
    return type == "DELETED"


# ---- garbage collection -----------------------------------------------------------------------


def delete_tasks(memo: HubMemo, tasks: Collection[rules.TaskRef]) -> None:
    for task in tasks:
        memo.kube.delete(API_VERSION, "SiteTask", task.name, task.namespace)


@dataclasses.dataclass
class Sweeper:
    """When the last sweep ran and the orphans it found (collected when found again)."""

    interval: float = SWEEP_SECONDS
    history: timedelta = TASK_HISTORY
    last: float = float("-inf")
    orphan_tasks: set[rules.TaskRef] = dataclasses.field(default_factory=set)
    orphan_jobs: set[str] = dataclasses.field(default_factory=set)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def due(self) -> bool:
        """Claim the next sweep if it is due and no other pass holds it (non-blocking)."""
        if time.monotonic() - self.last < self.interval or not self.lock.acquire(False):
            return False
        if time.monotonic() - self.last < self.interval:
            self.lock.release()
            return False
        self.last = time.monotonic()
        return True

    def sweep(self, memo: HubMemo, rounds: Mapping[str, Collection[rules.RoundLife]],
              tasks: Collection[rules.TaskRef]) -> None:
        """One sweep (the caller holds the claim from `due`): ended rounds' SiteTasks, then
        orphans found twice in a row."""
        try:
            lives = {uid: next(iter(entries)) for uid, entries in rounds.items() if entries}
            ended = rules.ended_tasks(tasks, lives, now(), self.history)
            orphans = rules.orphan_tasks(tasks, lives)
            gone = rules.confirmed(self.orphan_tasks, orphans)
            self.orphan_tasks = orphans - gone
            delete_tasks(memo, [*ended, *gone])
            jobs = self.orphan_job_names(memo, lives)
            if ended or gone or jobs:
                log.info("swept %d SiteTask(s) of ended rounds, %d of deleted rounds, %d hub "
                         "Job(s) of deleted rounds", len(ended), len(gone), len(jobs))
        finally:
            self.lock.release()

    def orphan_job_names(self, memo: HubMemo, lives: Mapping[str, rules.RoundLife]
                         ) -> set[str]:
        """Delete hub Jobs found without a round in this sweep and the last; their names."""
        if memo.rounds is None:
            return set()
        namespace = memo.options.jobs_namespace
        listed = memo.kube.list_objects("batch/v1", "Job", namespace,
                                        label_selector=f"app.kubernetes.io/managed-by="
                                                       f"{MANAGED_BY}")
        orphans = rules.orphan_jobs((j["metadata"]["name"] for j in listed), lives)
        gone = rules.confirmed(self.orphan_jobs, orphans)
        self.orphan_jobs = orphans - gone
        for job in gone:
            memo.kube.delete("batch/v1", "Job", job, namespace)
        return gone


def sweep_if_due(memo: HubMemo, indices: Mapping[str, Any]) -> None:
    """Run the sweep from a handler that has the indices, if it is due."""
    if not memo.sweeper.due():
        return
    tasks = [rules.TaskRef(f.round_uid, f.namespace, f.name)
             for facts in indices["round_tasks"].values() for f in facts]
    try:
        with reconciling("Sweep", "hub"):
            memo.sweeper.sweep(memo, indices["round_lives"], tasks)
    except kopf.TemporaryError as exc:  # the next sweep tries again; the site's pass is done
        log.warning("garbage sweep: %s", exc)


# ---- registration -----------------------------------------------------------------------------


def register(registry: kopf.OperatorRegistry, options: HubOptions) -> None:
    """Add the lives indices to `registry`; `without_finalizers` then runs over the finished
    registry. (A round's deletion handler is in `rounds`; the sweep reads its `round_tasks`.)"""
    del options  # the sweep's timing is in the memo's Sweeper (make_memo)
    kopf.index(*HOSPITAL_SITES, id="site_lives", registry=registry)(alive)
    kopf.index(*FEDERATED_STUDIES, id="study_lives", registry=registry)(alive)
    kopf.index(*FEDERATED_ROUNDS, id="round_lives", registry=registry)(round_life)
