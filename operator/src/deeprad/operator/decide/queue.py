"""Rounds that wait for sites, from plain data: which refusals are worth waiting for, and the
fair order in which waiting FederatedRounds get a HospitalSite's free task slots.

A round that cannot be admitted yet waits (Queued) instead of failing, up to its
spec.admissionTimeout, but only while waiting can help: a site refused for a reason in
`TRANSIENT` may become admissible by itself (an agent back, a window over, a task finished);
any other reason (NotFound, NamespaceNotAllowed, DataMismatch, SampleCountUnknown,
InvalidMaintenanceWindow) needs a person to change a spec, so the round does not count on it.

The order among waiting rounds that want the same site is higher spec.priority first, then the
earlier status.queuedSince, then the earlier creationTimestamp, then namespace/name: a site with
k free slots goes to the first k waiting rounds that want it. Waiting rounds hold no slot, so
the first round in the order is never behind anyone and the queue cannot deadlock; a round at
the head of a site's queue that waits for another site keeps the rounds behind it waiting (no
backfill), which keeps the order predictable.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from deeprad.operator.decide.timeutil import rfc3339

QUEUED_BEHIND: Final = "QueuedBehind"  # the site's free slots go to rounds ahead in the order
AVAILABLE: Final = "Available"  # admissible now; the round waits for enough such sites
TRANSIENT: Final = frozenset({"Suspended", "NotReady", "InMaintenanceWindow",
                              "InsufficientGPUs", "AtCapacity", QUEUED_BEHIND})


@dataclass(frozen=True)
class QueuedRound:
    """A round waiting for sites, as the order sees it."""

    name: str  # <namespace>/<name>
    priority: int
    since: datetime  # status.queuedSince
    created: datetime  # metadata.creationTimestamp
    sites: frozenset[str] = frozenset()  # the sites it waits for

    @property
    def order(self) -> tuple[int, datetime, datetime, str]:
        """The sort key of the queue: smaller comes first."""
        return (-self.priority, self.since, self.created, self.name)

    def describe(self) -> str:
        """`FederatedRound ns/name (priority p, queued since t)`, for messages."""
        return (f"FederatedRound {self.name} (priority {self.priority}, queued since "
                f"{rfc3339(self.since)})")


def waiting_ahead(me: QueuedRound, waiting: Iterable[QueuedRound], site: str
                  ) -> list[QueuedRound]:
    """The other rounds waiting for `site` that come before `me`, in order."""
    return sorted((w for w in waiting
                   if site in w.sites and w.name != me.name and w.order < me.order),
                  key=lambda w: w.order)


def queued_behind(me: QueuedRound, waiting: Iterable[QueuedRound], site: str, free: int
                  ) -> QueuedRound | None:
    """None when `me` is among the first `free` waiting rounds that want `site`, so one of the
    site's free slots is its; else the round at the head of the site's queue."""
    ahead = waiting_ahead(me, waiting, site)
    return ahead[0] if ahead and len(ahead) >= free else None


def waiting_summary(reasons: Iterable[tuple[str, str]]) -> str:
    """`a:AtCapacity b:InMaintenanceWindow`: each (site, reason), for a printer column."""
    return " ".join(f"{site}:{reason}" for site, reason in reasons)[:1024]
