"""Which of a round's children in the hub may go: its SiteTasks (in the sites' namespaces, out
of reach of ownerReferences) and its prepare and aggregator Jobs (in the jobs namespace).

- A round that ended keeps its SiteTasks for `history` after its completionTime, so each site's
  agent sees the final state; then they go. The round's status.sites keeps every site's
  result, which is all the study and the site's participation read.
- A round that no longer exists (deleted, also while the operator was down) leaves orphans:
  SiteTasks whose roundRef uid and hub Jobs whose name match no round. An orphan is collected
  when two sweeps in a row found it, so an object seen before its round is never taken.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from deeprad.operator.api.names import (
    AGGREGATOR_SUFFIX,
    PREPARE_SUFFIX,
    aggregator_job_name,
    prepare_job_name,
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RoundLife:
    """Index entry of one FederatedRound: where it is and whether (and when) it ended."""

    namespace: str
    name: str
    ended: bool = False
    completion_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class TaskRef:
    """A SiteTask by its round's uid and where it lives."""

    round_uid: str
    namespace: str
    name: str


def ended_tasks(tasks: Iterable[TaskRef], rounds: Mapping[str, RoundLife], now: datetime,
                history: timedelta) -> list[TaskRef]:
    """SiteTasks of rounds that ended more than `history` ago (a round ended without a
    completionTime counts as ended long ago)."""
    out = []
    for task in tasks:
        life = rounds.get(task.round_uid)
        if life is None or not life.ended:
            continue
        if life.completion_time is None or now - life.completion_time >= history:
            out.append(task)
    return out


def orphan_tasks(tasks: Iterable[TaskRef], rounds: Mapping[str, RoundLife]) -> set[TaskRef]:
    """SiteTasks whose round does not exist."""
    return {task for task in tasks if task.round_uid not in rounds}


def orphan_jobs(jobs: Iterable[str], rounds: Mapping[str, RoundLife]) -> set[str]:
    """Names of hub Jobs (prepare, aggregate) that belong to no existing round."""
    live = set()
    for uid, life in rounds.items():
        live.add(prepare_job_name(life.name, uid))
        live.add(aggregator_job_name(life.name, uid))
    return {job for job in jobs
            if job.endswith((PREPARE_SUFFIX, AGGREGATOR_SUFFIX)) and job not in live}


def confirmed(previous: set[T], current: set[T]) -> set[T]:
    """Orphans found by this sweep and the one before it."""
    return previous & current
