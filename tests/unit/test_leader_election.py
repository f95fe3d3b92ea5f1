"""Who may take the leader Lease when (deeprad.operator.leader), from plain Lease data: free,
own, expired and held Leases, the spec a candidate writes, a clean release, and durations that
could not keep one leader."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta

import pytest

from deeprad.operator import cli
from deeprad.operator.leader import (
    LeaseRecord,
    Timing,
    claimed_spec,
    expiry,
    may_take,
    released_spec,
)

NOW = datetime(2026, 12, 2, 12, 0, 0, tzinfo=UTC)


def _lease(holder: str | None, renewed_ago: float | None, duration: int | None = 10,
           transitions: int = 3) -> LeaseRecord:
    spec = {"holderIdentity": holder, "leaseDurationSeconds": duration,
            "acquireTime": "2026-12-02T11:00:00.000000Z", "leaseTransitions": transitions}
    if renewed_ago is not None:
        spec["renewTime"] = (NOW - timedelta(seconds=renewed_ago)).strftime(
            "%Y-%m-%dT%H:%M:%S.%fZ")
    return LeaseRecord.from_lease({"metadata": {"resourceVersion": "42"}, "spec": spec})


def test_the_lease_record_reads_what_the_api_server_writes() -> None:
    record = _lease("hub-a", 2.5)
    assert record.holder == "hub-a" and record.resource_version == "42"
    assert record.renew_time == NOW - timedelta(seconds=2.5)
    assert expiry(record) == NOW + timedelta(seconds=7.5)
    assert LeaseRecord.from_lease({}).holder == ""


@pytest.mark.parametrize(("holder", "renewed_ago", "duration", "me", "allowed"), [
    (None, None, None, "hub-b", True),  # never held
    ("", 1.0, 10, "hub-b", True),  # released by a leader that stopped cleanly
    ("hub-b", 1.0, 10, "hub-b", True),  # its own: renew
    ("hub-a", 1.0, 10, "hub-b", False),  # held and fresh
    ("hub-a", 9.9, 10, "hub-b", False),  # the last moment of the lease still belongs to a
    ("hub-a", 10.5, 10, "hub-b", True),  # expired: renewTime + duration < now
    ("hub-a", None, 10, "hub-b", True),  # no renewTime: held by nobody in time
    ("hub-a", 1.0, None, "hub-b", True),  # no duration: likewise
], ids=["never-held", "released", "own", "held", "last-moment", "expired", "no-renew-time",
        "no-duration"])
def test_who_may_take_the_lease(holder: str | None, renewed_ago: float | None,
                                duration: int | None, me: str, allowed: bool) -> None:
    assert may_take(_lease(holder, renewed_ago, duration), me, NOW) is allowed


def test_taking_over_counts_a_transition_and_renewing_does_not() -> None:
    held = _lease("hub-a", 20.0, transitions=3)
    taken = claimed_spec(held, "hub-b", NOW, 10.0)
    assert taken["holderIdentity"] == "hub-b" and taken["leaseTransitions"] == 4
    assert taken["acquireTime"] == taken["renewTime"] == "2026-12-02T12:00:00.000000Z"
    assert taken["leaseDurationSeconds"] == 10
    renewed = claimed_spec(_lease("hub-b", 2.0, transitions=4), "hub-b", NOW, 10.0)
    assert renewed["leaseTransitions"] == 4
    assert renewed["acquireTime"] == "2026-12-02T11:00:00.000000Z"  # kept while it leads
    assert renewed["renewTime"] == "2026-12-02T12:00:00.000000Z"
    first = claimed_spec(None, "hub-a", NOW, 0.4)
    assert first["leaseTransitions"] == 0 and first["leaseDurationSeconds"] == 1


def test_a_released_lease_is_free_for_anyone_at_once() -> None:
    held = _lease("hub-a", 1.0, transitions=5)
    spec = released_spec(held, NOW)
    after = LeaseRecord.from_lease({"spec": spec})
    assert after.holder == "" and after.transitions == 5
    assert may_take(after, "hub-b", NOW)


@pytest.mark.parametrize(("timing", "problem"), [
    (Timing(), None),
    (Timing(15, 10, 2), None),
    (Timing(10, 10, 2), "--leader-election-renew-deadline (10) must be shorter than "
                        "--leader-election-lease-duration (10)"),
    (Timing(10, 7, 7), "--leader-election-retry-period (7) must be shorter than "
                       "--leader-election-renew-deadline (7)"),
    (Timing(10, 7, 0), "every duration must be > 0"),
], ids=["defaults", "client-go", "deadline-not-shorter", "retry-not-shorter", "zero"])
def test_durations_that_cannot_keep_one_leader_are_refused(timing: Timing,
                                                           problem: str | None) -> None:
    found = timing.problem()
    assert (found is None) if problem is None else (found is not None and problem in found)
    if found:
        assert "\n" not in found


def test_defaults_stop_the_leader_before_a_standby_may_take_over() -> None:
    timing = Timing()
    # The leader gives up within the renew deadline plus one watchdog tick; the margin to the
    # lease's end absorbs clock skew between the replicas.
    assert timing.renew_deadline + 0.25 < timing.lease_duration - 2.0
    assert timing.lease_duration <= 12.0  # failover (lease + kopf start) stays within 15 s


def test_leader_election_flags_parse_and_default_off() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    plain = parser.parse_args(["--mode", "hub"])
    assert plain.leader_election is False
    parsed = parser.parse_args([
        "--mode", "site", "--leader-election", "--leader-election-namespace", "deeprad",
        "--leader-election-lease-name", "st-marys-agent", "--leader-election-lease-duration",
        "4", "--leader-election-renew-deadline", "3", "--leader-election-retry-period", "0.5"])
    assert parsed.leader_election is True
    assert (parsed.leader_election_namespace, parsed.leader_election_lease_name) == (
        "deeprad", "st-marys-agent")
    assert Timing(parsed.leader_election_lease_duration, parsed.leader_election_renew_deadline,
                  parsed.leader_election_retry_period).problem() is None
