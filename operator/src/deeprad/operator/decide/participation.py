"""A HospitalSite's participation, from the per-site entries of the FederatedRounds' status.

Rounds outlive their SiteTasks (which are collected after the round ends), so the rounds'
`status.sites` are the record; a site's participation is recounted from them on its heartbeat
pass and written only when it changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from deeprad.operator.api.federatedround import SiteState
from deeprad.operator.api.hospitalsite import Participation
from deeprad.operator.decide.timeutil import parse_time, rfc3339

MAX_STUDIES = 64  # Participation.studies' schema limit
NOT_JOINED = frozenset({SiteState.EXCLUDED.value, SiteState.WAITING.value})
FAILED = frozenset({SiteState.FAILED.value, SiteState.DROPPED.value, SiteState.REJECTED.value})


@dataclass(frozen=True, slots=True)
class RoundPart:
    """One site's entry in one round (an index value: small, plain strings)."""

    study: str  # namespace/name of the study, or of the round made by hand
    state: str
    report_time: str | None = None


def round_parts(namespace: str, name: str, spec: Mapping[str, Any],
                status: Mapping[str, Any]) -> dict[str, RoundPart]:
    """The round's admitted sites and their parts, keyed by site (excluded and waiting sites
    did not join). Reads the raw status: this runs on every status write of every round."""
    study = f"{namespace}/{(spec.get('studyRef') or {}).get('name') or name}"
    parts = {}
    for entry in status.get("sites") or ():
        site, state = entry.get("site"), entry.get("state")
        if site and state and state not in NOT_JOINED:
            parts[str(site)] = RoundPart(study, str(state), entry.get("reportTime"))
    return parts


def participation(parts: Iterable[RoundPart]) -> Participation:
    """The site's counters over its rounds (zeros when it joined none: status writes send
    what changed, and a field left out would keep its old value)."""
    studies: set[str] = set()
    joined = reported = failed = 0
    last = None
    for part in parts:
        joined += 1
        studies.add(part.study)
        if part.state == SiteState.REPORTED.value:
            reported += 1
            if part.report_time:
                try:
                    when = parse_time(part.report_time)
                except ValueError:
                    continue
                last = when if last is None or when > last else last
        elif part.state in FAILED:
            failed += 1
    return Participation(studies=sorted(studies)[:MAX_STUDIES] or None, rounds_joined=joined,
                         rounds_reported=reported, rounds_failed=failed,
                         last_contribution_time=rfc3339(last) if last else None)
