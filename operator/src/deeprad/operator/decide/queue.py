"""Rounds that wait for sites, from plain data: which refusals are worth waiting for, and the
fair order in which waiting FederatedRounds get a HospitalSite's free task slots.

A round that cannot be admitted yet waits (Queued) instead of failing, up to its
spec.admissionTimeout, but only while waiting can help: a site refused for a reason in
`TRANSIENT` may become admissible by itself (an agent back, a window over, a task finished);
any other reason (NotFound, NamespaceNotAllowed, DataMismatch, SampleCountUnknown,
InvalidMaintenanceWindow) needs a person to change a spec, so the round does not count on it.

The order among waiting rounds that want the same site is higher spec.priority first, then the
earlier status.queuedSince, then the earlier creationTimestamp, then namespace/name: a site with
k free slots goes to the first k waiting rounds that want it and could start with it. A waiting
round counts as ahead at a site only if, given that site, it would be admissible now: enough of
the other sites it waits for are open (admit a round and have a free slot) to reach its
minSites. A round that cannot start anyway (say, another site it needs is NotReady) leaves the
site to the rounds behind it rather than hold its place there up to its admissionTimeout. Waiting
rounds hold no slot and running rounds are never preempted, so the queue cannot deadlock; the
price of this backfill is that a round wanting several busy sites may see rounds behind it take
each one as it frees, until its admissionTimeout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
    min_sites: int  # spec.minSites: how many of `sites` it needs to start
    sites: frozenset[str] = frozenset()  # the sites it waits for

    @property
    def order(self) -> tuple[int, datetime, datetime, str]:
        """The sort key of the queue: smaller comes first."""
        return (-self.priority, self.since, self.created, self.name)

    @property
    def namespace(self) -> str:
        """The round's namespace."""
        return self.name.split("/", 1)[0]

    def describe(self, viewer_namespace: str) -> str:
        """`FederatedRound ns/name (priority p, queued since t)`, for a message in a round of
        `viewer_namespace`; a round of another namespace is not named (tenant isolation)."""
        if self.namespace != viewer_namespace:
            return (f"a FederatedRound of another namespace (priority {self.priority}, waiting "
                    f"since {rfc3339(self.since)})")
        return (f"FederatedRound {self.name} (priority {self.priority}, queued since "
                f"{rfc3339(self.since)})")


class OpenSites:
    """Which sites are open now (they would admit a round and have a free task slot), each
    asked once per pass, and which waiting rounds could start with a given site."""

    def __init__(self, is_open: Callable[[str], bool]) -> None:
        self._is_open = is_open
        self._sites: dict[str, bool] = {}
        self._counts: dict[str, int] = {}  # open sites among a waiting round's, by round

    def __call__(self, site: str) -> bool:
        """Whether `site` is open now."""
        if site not in self._sites:
            self._sites[site] = self._is_open(site)
        return self._sites[site]

    def could_start(self, waiting: QueuedRound, site: str) -> bool:
        """Whether `waiting`, given `site`, would be admissible now: enough of the other sites
        it waits for are open to reach its minSites."""
        if waiting.name not in self._counts:
            self._counts[waiting.name] = sum(1 for s in waiting.sites if self(s))
        others = self._counts[waiting.name] - (1 if site in waiting.sites and self(site) else 0)
        return 1 + others >= waiting.min_sites


def waiting_ahead(me: QueuedRound, waiting: Iterable[QueuedRound], site: str,
                  open_sites: OpenSites) -> list[QueuedRound]:
    """The other rounds waiting for `site` that come before `me` and could start with it, in
    order (one that could not start anyway does not hold its place)."""
    return sorted((w for w in waiting
                   if site in w.sites and w.name != me.name and w.order < me.order
                   and open_sites.could_start(w, site)),
                  key=lambda w: w.order)


def queued_behind(me: QueuedRound, waiting: Iterable[QueuedRound], site: str, free: int,
                  open_sites: OpenSites) -> QueuedRound | None:
    """None when `me` is among the first `free` waiting rounds that want `site` and could
    start with it, so one of the site's free slots is its; else the round at the head of the
    site's queue."""
    ahead = waiting_ahead(me, waiting, site, open_sites)
    return ahead[0] if ahead and len(ahead) >= free else None


def waiting_summary(reasons: Iterable[tuple[str, str]]) -> str:
    """`a:AtCapacity b:InMaintenanceWindow`: each (site, reason), for a printer column."""
    return " ".join(f"{site}:{reason}" for site, reason in reasons)[:1024]
