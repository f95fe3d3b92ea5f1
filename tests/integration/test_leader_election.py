"""Leader election (deeprad.operator.leader) on a real API server: of candidates racing for one
Lease exactly one wins; a leader cut off from the API stops before a standby takes over, and
the standby takes over once the lease runs out (failover); a clean release hands over at once.
Short durations (lease 3 s) keep it quick; the rules are the same as the defaults'."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import kubernetes
import pytest
from deeprad_processes import wait

from deeprad.devenv.cluster import Cluster
from deeprad.operator.client import load_configuration
from deeprad.operator.leader import LeaderElector, Timing

pytestmark = pytest.mark.integration

NAMESPACE = "default"
TIMING = Timing(lease_duration=3.0, renew_deadline=2.0, retry_period=0.3)


class Candidate:
    """An elector with its own API client that records, instead of exiting, when it loses."""

    def __init__(self, cluster: Cluster, lease: str, identity: str) -> None:
        self.api = kubernetes.client.ApiClient(load_configuration(str(cluster.kubeconfig)))
        self.lost: list[tuple[float, str]] = []
        self.elector = LeaderElector(self.api, NAMESPACE, lease, identity, TIMING,
                                     on_lost=lambda why: self.lost.append((time.monotonic(),
                                                                           why)))
        self.stop = threading.Event()
        self.led_at: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if self.elector.wait_until_leader(self.stop):
            self.led_at = time.monotonic()
            self.elector.start_renewing()

    def start(self) -> Candidate:
        self.thread.start()
        return self

    def cut_off(self) -> None:
        """Every later API call of this candidate fails: a partitioned node."""
        self.api.configuration.host = "https://127.0.0.1:1"

    def close(self) -> None:
        self.stop.set()
        self.elector.stop_renewing()
        if self.thread.ident is not None:
            self.thread.join(timeout=10)


@pytest.fixture
def lease() -> str:
    return f"leader-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def candidates(hub_cluster: Cluster, lease: str) -> Iterator[list[Candidate]]:
    made = [Candidate(hub_cluster, lease, f"replica-{i}") for i in range(3)]
    yield made
    for c in made:
        c.close()


def _read(hub_cluster: Cluster, lease: str) -> dict:
    api = kubernetes.client.ApiClient(load_configuration(str(hub_cluster.kubeconfig)))
    return kubernetes.client.CoordinationV1Api(api).read_namespaced_lease(lease, NAMESPACE) \
        .to_dict()


def test_candidates_racing_for_a_lease_elect_exactly_one(candidates: list[Candidate],
                                                        hub_cluster: Cluster,
                                                        lease: str) -> None:
    for c in candidates:
        c.start()
    leaders = wait("a leader", lambda: [c for c in candidates if c.elector.leading])
    # Several renewals later there is still exactly one, and the Lease names it.
    deadline = time.monotonic() + 3 * TIMING.retry_period + 0.5
    while time.monotonic() < deadline:  # an observation window, not a wait
        assert len([c for c in candidates if c.elector.leading]) == 1
        time.sleep(0.02)
    spec = _read(hub_cluster, lease)["spec"]
    assert spec["holder_identity"] == leaders[0].elector.identity
    assert spec["lease_transitions"] == 0 and spec["lease_duration_seconds"] == 3
    assert not any(c.lost for c in candidates)


def test_leader_failover_when_it_is_cut_off_never_two_leaders(candidates: list[Candidate],
                                                              hub_cluster: Cluster,
                                                              lease: str) -> None:
    first, second, _ = candidates
    first.start()
    wait("the first leader", lambda: first.elector.leading)
    second.start()
    last_renewal = time.monotonic()
    first.cut_off()
    overlap: list[float] = []

    def both_lead() -> bool:
        if first.elector.leading and second.elector.leading:
            overlap.append(time.monotonic())
        return second.led_at is not None

    wait("the standby to take over", both_lead, TIMING.lease_duration + 5, interval=0.02)
    assert not overlap, "two candidates led at once"
    # The cut-off leader gave up within its renew deadline (plus a watchdog tick), before the
    # lease ran out; the standby took over once it had.
    assert first.lost and "not renewed" in first.lost[0][1]
    gave_up = first.lost[0][0] - last_renewal
    assert gave_up <= TIMING.renew_deadline + TIMING.retry_period + 0.5, gave_up
    assert second.led_at is not None and second.led_at > first.lost[0][0]
    failover = second.led_at - last_renewal
    assert TIMING.lease_duration - TIMING.retry_period - 0.5 <= failover, failover
    assert failover <= TIMING.lease_duration + 2.0, failover
    spec = _read(hub_cluster, lease)["spec"]
    assert spec["holder_identity"] == second.elector.identity
    assert spec["lease_transitions"] == 1


def test_a_released_lease_hands_over_at_once_and_a_usurped_leader_stops(
        candidates: list[Candidate], hub_cluster: Cluster, lease: str) -> None:
    first, second, third = candidates
    first.start()
    wait("the first leader", lambda: first.elector.leading)
    second.start()
    released = time.monotonic()
    first.elector.release()
    wait("the standby to lead after the release", lambda: second.led_at)
    assert second.led_at is not None
    assert second.led_at - released < TIMING.retry_period + 1.0  # not a whole lease
    assert not first.elector.leading and not first.lost
    # Someone else writes itself into the Lease (an admin, a split brain): the leader notices
    # at its next renewal and stops, instead of acting beside it.
    api = kubernetes.client.CoordinationV1Api(third.api)

    def usurp() -> bool:
        body = api.read_namespaced_lease(lease, NAMESPACE)
        body.spec.holder_identity = "usurper"
        try:
            api.replace_namespaced_lease(lease, NAMESPACE, body)
        except kubernetes.client.exceptions.ApiException as exc:
            if exc.status == 409:  # the leader renewed in between: read again
                return False
            raise
        return True

    wait("the Lease written by the usurper", usurp, 10.0, interval=0.02)
    wait("the usurped leader to stop", lambda: second.lost)
    assert "held by usurper" in second.lost[0][1]
    assert not second.elector.leading
