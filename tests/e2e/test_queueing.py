"""Rounds that queue for busy hospitals instead of failing, on real clusters: a hub and two
hospital clusters, the hub operator, one site agent per hospital, a real S3 server.

Two studies over the same two hospitals, each hospital taking one task at a time
(spec.limits.maxConcurrentTasks: 1, the default), are applied at once. Both succeed: while one
study's round trains, the other's waits Queued (SitesScheduled False, WaitingForSites, each site
AtCapacity or QueuedBehind, status.waitingFor saying so), and its deadline counts from its
admission, not from its creation. No hospital ever runs two training tasks at once.
"""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from federation import Federation, SitePlan, condition, items, start_federation

from deeprad.devenv.cluster import Cluster, start_clusters
from deeprad.devenv.s3_server import S3Server

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
HOSPITALS = ("st-marys", "charite")
STUDIES = ("queue-a", "queue-b")
# Four rounds one after another (each hospital takes one task at a time); the ceiling leaves
# room for a busy machine within pytest's 900 s per test, setup included.
TIMEOUT = 600.0


@pytest.fixture(scope="module")
def fed(clusters: dict[str, Cluster], s3_server: S3Server, devenv_dir: Path,
        tmp_path_factory: pytest.TempPathFactory, owner_token: str) -> Iterator[Federation]:
    """A hub of this module's own, its two hospitals taking one task at a time."""
    hub = Cluster("queue-hub", devenv_dir / "clusters", owner_token=owner_token)
    start_clusters([hub])
    plans = [SitePlan("st-marys", clusters["site-1"], 0),
             SitePlan("charite", clusters["site-2"], 1)]
    try:
        federation = start_federation(hub, plans, s3_server,
                                      tmp_path_factory.mktemp("queueing"), owner_token)
        try:
            for site in HOSPITALS:
                federation.hub.kubectl("patch", "hospitalsite", site, "--type", "merge", "-p",
                                       json.dumps({"spec": {"limits": {
                                           "maxConcurrentTasks": 1}}}))
            yield federation
        finally:
            federation.stop()
    finally:
        hub.stop()


def _study(name: str) -> dict[str, Any]:
    """The example study, small: two rounds of one local epoch on 32-pixel images at both
    hospitals, no early stop, secure aggregation off and no final evaluation round (the
    queue of training rounds, not the exchange, is under test)."""
    study = yaml.safe_load((ROOT / "examples" / "federatedstudy-tumor-cnn.yaml").read_text())
    study["metadata"]["name"] = name
    spec = study["spec"]
    del spec["siteSelector"]
    spec.update(sites=list(HOSPITALS), rounds=2, stopping={}, finalEvaluation=False)
    spec["data"]["imageSize"] = 32
    spec["roundTemplate"]["training"]["localEpochs"] = 1
    spec["roundTemplate"]["privacy"] = {"secureAggregation": False}
    spec["roundTemplate"]["deadline"] = "10m"
    return study


class RoundWatcher:
    """Polls the namespace's rounds and keeps every Queued status it saw, by round."""

    def __init__(self, fed: Federation, ns: str) -> None:
        self.fed, self.ns = fed, ns
        self.queued: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RoundWatcher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for r in items(self.fed, "federatedrounds", "-n", self.ns):
                status = r.get("status") or {}
                if status.get("state") == "Queued":
                    self.queued.setdefault(r["metadata"]["name"], status)


def _report(fed: Federation, ns: str) -> str:
    lines = [f"{r['metadata']['name']}: {json.dumps(r.get('status'))[:1500]}"
             for r in items(fed, "federatedrounds", "-n", ns)]
    lines += [f"study {s['metadata']['name']}: {json.dumps(s.get('status'))[:800]}"
              for s in items(fed, "federatedstudies", "-n", ns)]
    return "\n".join(lines)


def _both_done(fed: Federation, ns: str) -> list[dict[str, Any]] | None:
    studies = list(items(fed, "federatedstudies", "-n", ns))
    states = {(s.get("status") or {}).get("state") for s in studies}
    if "Failed" in states:
        pytest.fail(f"a study failed:\n{_report(fed, ns)}")
    return studies if len(studies) == 2 and states == {"Succeeded"} else None


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_two_studies_sharing_busy_hospitals_queue_and_both_succeed(fed: Federation) -> None:
    ns = f"queue-{uuid.uuid4().hex[:6]}"
    fed.hub.kubectl("create", "namespace", ns)
    with RoundWatcher(fed, ns) as watcher:
        fed.hub.kubectl("apply", "-n", ns, "-f", "-",
                        input=yaml.safe_dump_all([_study(s) for s in STUDIES]))
        try:
            studies = fed.wait("both studies to succeed", lambda: _both_done(fed, ns), TIMEOUT)
        except pytest.fail.Exception as exc:
            pytest.fail(f"{exc}\n{_report(fed, ns)}")
    assert {s["status"]["completedRounds"] for s in studies} == {2}, _report(fed, ns)
    rounds = {r["metadata"]["name"]: r for r in items(fed, "federatedrounds", "-n", ns)}
    assert sorted(rounds) == [f"{s}-r{n}" for s in STUDIES for n in (1, 2)]
    # A round of the study admitted second waited, visibly and for a reason that clears.
    assert watcher.queued, f"no round was seen Queued\n{_report(fed, ns)}"
    for name, status in watcher.queued.items():
        scheduled = condition({"status": status}, "SitesScheduled")
        assert (scheduled["status"], scheduled["reason"]) == ("False", "WaitingForSites"), name
        reasons = {s["site"]: s["reason"] for s in status["sites"]}
        assert set(reasons) == set(HOSPITALS), status
        assert set(reasons.values()) <= {"AtCapacity", "QueuedBehind", "Available"}, status
        assert status["waitingFor"], status
        assert all(f"{site}: {reason}" in scheduled["message"]
                   for site, reason in reasons.items() if reason != "Available"), scheduled
        assert "startTime" not in status and "deadlineTime" not in status, status
        # It started later, its deadline counted from its admission.
        done = rounds[name]["status"]
        assert done["state"] == "Succeeded", _report(fed, ns)
        assert done["queuedSince"] <= done["startTime"]
        assert _time(done["deadlineTime"]) - _time(done["startTime"]) == timedelta(minutes=10)
        assert done["waitingFor"] == ""
        assert _time(done["startTime"]) > _time(rounds[name]["metadata"]["creationTimestamp"])
    firsts = {name.rsplit("-r", 1)[0] for name in watcher.queued if name.endswith("-r1")}
    assert firsts, f"neither study's first round waited: {sorted(watcher.queued)}"
    # Each hospital ran one training task at a time, one per round.
    for site in HOSPITALS:
        tasks = sorted((t for t in items(fed, "sitetasks", "-n", f"deeprad-site-{site}")
                        if t["spec"]["roundRef"]["namespace"] == ns),
                       key=lambda t: t["status"]["startTime"])
        assert len(tasks) == 4 and {t["status"]["state"] for t in tasks} == {"Succeeded"}
        for before, after in itertools.pairwise(tasks):
            assert before["status"]["completionTime"] <= after["status"]["startTime"], (
                site, before["metadata"]["name"], after["metadata"]["name"])
    events = {e["reason"] for e in items(fed, "events", "-n", ns)}
    assert "Queued" in events
