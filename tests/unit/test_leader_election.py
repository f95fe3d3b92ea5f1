"""Who may take the leader Lease when (deeprad.operator.leader), from plain Lease data and
the candidate's own monotonic clock: free, own, expired and held Leases, skewed clocks, the
spec a candidate writes, a clean release, durations that could not keep one leader; how a lost
leader exits, how the hub lets go of the Lease, and what a standby without RBAC says."""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from deeprad.operator import cli, leader
from deeprad.operator.leader import (
    LeaderElector,
    LeaseRecord,
    Observation,
    Timing,
    claimed_spec,
    may_take,
    observe,
    released_spec,
    takeover_at,
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
    assert record.duration == 10
    assert LeaseRecord.from_lease({}).holder == ""


# Monotonic seconds on the candidate's own clock: it first read the record at SEEN.
SEEN = 1000.0


@pytest.mark.parametrize(("holder", "duration", "me", "watched", "allowed"), [
    (None, None, "hub-b", 0.0, True),  # never held
    ("", 10, "hub-b", 0.0, True),  # released by a leader that stopped cleanly
    ("hub-b", 10, "hub-b", 0.0, True),  # its own: renew
    ("hub-a", 10, "hub-b", 1.0, False),  # held, watched for a moment
    ("hub-a", 10, "hub-b", 10.0, False),  # the last moment of the lease still belongs to a
    ("hub-a", 10, "hub-b", 10.5, True),  # unchanged for longer than the lease: expired
    ("hub-a", None, "hub-b", 0.0, True),  # no duration: held by nobody in time
], ids=["never-held", "released", "own", "held", "last-moment", "expired", "no-duration"])
def test_who_may_take_the_lease(holder: str | None, duration: int | None, me: str,
                                watched: float, allowed: bool) -> None:
    seen = Observation(_lease(holder, 1.0, duration), SEEN)
    assert may_take(seen, me, SEEN + watched) is allowed


def test_a_skewed_renew_time_does_not_let_a_standby_take_over_early() -> None:
    # The leader's clock runs an hour behind (or the standby's ahead): by wall clocks its lease
    # ran out long ago, yet it renewed a moment ago and still acts.
    stale_looking = _lease("hub-a", renewed_ago=3600.0)
    seen = observe(None, stale_looking, SEEN)
    assert not may_take(seen, "hub-b", SEEN)
    assert not may_take(seen, "hub-b", SEEN + 9.9)
    # The same record, read again and again, keeps the first sighting: a whole lease later the
    # holder has stopped renewing, so the standby may take over.
    again = observe(seen, _lease("hub-a", renewed_ago=3600.0), SEEN + 6.0)
    assert again.at == SEEN
    assert takeover_at(again, "hub-b") == SEEN + 10
    assert may_take(again, "hub-b", SEEN + 10.1)


def test_a_renewal_restarts_the_standbys_wait() -> None:
    seen = observe(None, _lease("hub-a", 1.0), SEEN)
    renewed = LeaseRecord.from_lease({
        "metadata": {"resourceVersion": "43"},
        "spec": {"holderIdentity": "hub-a", "leaseDurationSeconds": 10,
                 "renewTime": NOW.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}})
    later = observe(seen, renewed, SEEN + 8.0)
    assert later.at == SEEN + 8.0
    assert not may_take(later, "hub-b", SEEN + 12.0)  # would have expired by the first sighting
    assert may_take(later, "hub-b", SEEN + 18.1)
    # A new resourceVersion alone (the holder wrote, whatever its clock says) counts as well.
    rewritten = LeaseRecord.from_lease({"metadata": {"resourceVersion": "44"},
                                        "spec": {"holderIdentity": "hub-a",
                                                 "leaseDurationSeconds": 10,
                                                 "renewTime": NOW.strftime(
                                                     "%Y-%m-%dT%H:%M:%S.%fZ")}})
    assert observe(later, rewritten, SEEN + 9.0).at == SEEN + 9.0


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
    # Whole seconds, rounded up: never a lease shorter than the durations checked against it.
    assert claimed_spec(None, "hub-a", NOW, 7.4)["leaseDurationSeconds"] == 8
    assert Timing(7.4, 7.2, 0.1).lease_seconds == 8


def test_a_released_lease_is_free_for_anyone_at_once() -> None:
    held = _lease("hub-a", 1.0, transitions=5)
    spec = released_spec(held, NOW)
    after = LeaseRecord.from_lease({"spec": spec})
    assert after.holder == "" and after.transitions == 5
    assert may_take(Observation(after, SEEN), "hub-b", SEEN)


@pytest.mark.parametrize(("timing", "problem"), [
    (Timing(), None),
    (Timing(15, 10, 2), None),
    (Timing(10, 8, 2), None),  # the leader stops by 10 s, when a standby may take over
    (Timing(7.4, 7.2, 0.1), None),  # written as 8 s
    (Timing(10, 10, 2), "--leader-election-renew-deadline 10 + --leader-election-retry-period "
                        "2 must not exceed --leader-election-lease-duration 10"),
    (Timing(10, 9, 2), "--leader-election-renew-deadline 9 + --leader-election-retry-period 2 "
                       "must not exceed --leader-election-lease-duration 10"),
    (Timing(7.4, 7.2, 1), "--leader-election-renew-deadline 7.2 + "
                          "--leader-election-retry-period 1 must not exceed "
                          "--leader-election-lease-duration 7.4 (written as 8 s)"),
    (Timing(10, 7, 7), "--leader-election-retry-period 7 must be shorter than "
                       "--leader-election-renew-deadline 7"),
    (Timing(10, 7, 0), "--leader-election-retry-period must be > 0, got 0"),
    (Timing(-1, 7, 2), "--leader-election-lease-duration must be > 0, got -1"),
], ids=["defaults", "client-go", "just-fits", "rounded-up", "deadline-not-shorter",
        "no-room-for-a-tick", "rounded-up-too-short", "retry-not-shorter", "zero-retry",
        "negative-lease"])
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


class _Leases:
    """CoordinationV1Api as the elector calls it: one Lease, or errors, and the writes made."""

    def __init__(self, lease: dict[str, Any] | None = None, fail: int | None = None) -> None:
        self.lease, self.fail = lease, fail
        self.writes: list[dict[str, Any]] = []

    def read_namespaced_lease(self, name: str, namespace: str, **_: Any) -> Any:
        if self.fail:
            raise ApiException(status=self.fail, reason={403: "Forbidden"}.get(self.fail, "Err"))
        if self.lease is None:
            raise ApiException(status=404, reason="Not Found")
        return SimpleNamespace(data=json.dumps(self.lease).encode())

    def replace_namespaced_lease(self, name: str, namespace: str, body: dict[str, Any],
                                 **_: Any) -> Any:
        self.writes.append(body)
        return SimpleNamespace(data=json.dumps(body).encode())

    create_namespaced_lease = None  # not reached here


def _elector(leases: _Leases) -> LeaderElector:
    elector = LeaderElector(object(), "deeprad", "deeprad-operator", "hub-b")
    elector.leases = leases
    return elector


def test_a_standby_does_not_take_a_lease_that_only_looks_expired_by_its_clock() -> None:
    stale = {"metadata": {"resourceVersion": "7"},
             "spec": {"holderIdentity": "hub-a", "leaseDurationSeconds": 10,
                      "renewTime": (datetime.now(UTC) - timedelta(hours=1)).strftime(
                          "%Y-%m-%dT%H:%M:%S.%fZ")}}
    leases = _Leases(stale)
    elector = _elector(leases)
    assert not elector.try_acquire_or_renew()
    assert not elector.try_acquire_or_renew()
    assert leases.writes == []
    assert elector.observation is not None and elector._pause() == elector.timing.retry_period


def test_a_standby_without_rbac_says_once_which_lease_and_verbs_it_needs(
        caplog: pytest.LogCaptureFixture) -> None:
    leases = _Leases(fail=403)
    elector = _elector(leases)
    with caplog.at_level(logging.INFO, logger="deeprad.leader"):
        for _ in range(3):
            assert not elector.try_acquire_or_renew()
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and errors[0].levelno == logging.ERROR
    message = errors[0].getMessage()
    assert "\n" not in message
    for part in ("Lease deeprad/deeprad-operator", "get refused (403 Forbidden)",
                 "get, create and update", "coordination.k8s.io leases", "Role"):
        assert part in message, message
    # Another problem is news, and so is the first one coming back after it.
    leases.fail = 500
    assert not elector.try_acquire_or_renew()
    leases.fail = 403
    assert not elector.try_acquire_or_renew()
    levels = [r.levelno for r in caplog.records if r.levelno >= logging.WARNING]
    assert levels == [logging.ERROR, logging.WARNING, logging.ERROR]


def test_a_lost_leader_exits_even_while_a_logging_lock_is_held(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A handler thread blocked while holding a logging lock must not keep the leader alive.
    handler = logging.Handler()
    logging.getLogger("deeprad.leader").addHandler(handler)
    written: list[bytes] = []
    exits: list[int] = []
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        if fd != 2:
            return real_write(fd, data)
        written.append(bytes(data))
        return len(data)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "_exit", exits.append)  # returns: the thread ends
    handler.acquire()
    try:
        lost = threading.Thread(target=leader._exit_lost, args=("Lease a/b held by x",),
                                daemon=True)
        lost.start()
        lost.join(timeout=10)
        exited_while_locked = not lost.is_alive()
    finally:
        handler.release()
        lost.join(timeout=10)
        logging.getLogger("deeprad.leader").removeHandler(handler)
    assert exited_while_locked
    assert exits == [leader.LOST_EXIT_CODE]
    assert written == [b"leader election: Lease a/b held by x; exiting so that no two "
                       b"replicas act\n"]


class _Elector:
    released = False

    def release(self) -> None:
        self.released = True


def test_the_hub_keeps_the_lease_while_a_handler_thread_still_runs() -> None:
    # kopf has returned (its cancellation timeout passed) while a sync handler still runs in
    # its executor: the Lease is released only after that handler has finished.
    elector = _Elector()
    started, go = threading.Event(), threading.Event()
    released_while_running: list[bool] = []

    class Executor(ThreadPoolExecutor):
        def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
            go.set()  # the handler ends once the operator waits for it, not before
            super().shutdown(wait=wait, cancel_futures=cancel_futures)

    def handler() -> None:
        started.set()
        go.wait(timeout=10)
        released_while_running.append(elector.released)

    executor = Executor(max_workers=1)
    executor.submit(handler)
    assert started.wait(timeout=10)
    try:
        cli._stop_leading(executor, elector)  # type: ignore[arg-type]
    finally:
        go.set()
        ThreadPoolExecutor.shutdown(executor, wait=True)
    assert released_while_running == [False]
    assert elector.released
