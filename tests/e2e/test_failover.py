"""High availability of the hub operator on real clusters: two replicas with Lease-based leader
election run a 3-round study while the leader is SIGKILLed again and again at random moments
(each killed replica comes back as a fresh standby). The study succeeds with exactly one
SiteTask and one trainer Job per round and site and one accepted update per site and round;
each failover (kill -> another replica holds the Lease and reconciles) is timed and printed.

The leader election runs with the durations the charts ship (lease 10 s). DEEPRAD_CHAOS_KILLS
sets the number of kills: 3 in the suite, 20 in `make chaos`, where a 3-round study ends before
the twentieth kill and the next 3-round study takes the rest (each is checked).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from deeprad_processes import OperatorProcess
from federation import (
    JOBS_NAMESPACE,
    Federation,
    SitePlan,
    items,
    start_federation,
)

from deeprad.core.layout import StudyLayout
from deeprad.core.protocol import AggregateReport
from deeprad.devenv.cluster import Cluster, start_clusters
from deeprad.devenv.s3_server import S3Server
from deeprad.operator.client import load_configuration

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
STUDY = "tumor-detection"
HOSPITALS = ("st-marys", "charite")
LEASE = "deeprad-operator"
KILLS = int(os.environ.get("DEEPRAD_CHAOS_KILLS", "3"))
FAILOVER_GOAL = 15.0  # seconds, median (issue #14)
STUDY_TIMEOUT = 600.0 + 30.0 * KILLS


def _api(cluster: Cluster) -> kubernetes.client.ApiClient:
    return kubernetes.client.ApiClient(load_configuration(str(cluster.kubeconfig)))


class Replicas:
    """Two hub operators with leader election, as the hub chart runs them; each start gets a
    new identity (POD_NAME), as a pod that replaces a lost one does."""

    def __init__(self, fed: Federation) -> None:
        base = fed.operator
        args = [*base.args, "--leader-election", "--leader-election-namespace", JOBS_NAMESPACE,
                "--leader-election-lease-name", LEASE]
        self.procs = [OperatorProcess(f"hub-operator-{x}", "hub", args, base.workdir,
                                      base.owner_token, env=base.env) for x in "ab"]
        self.identity: dict[int, str] = {}
        self.leases = kubernetes.client.CoordinationV1Api(_api(fed.hub))

    def start(self, proc: OperatorProcess) -> None:
        identity = f"{proc.label}-{proc.starts + 1}"
        proc.env["POD_NAME"] = identity
        self.identity[id(proc)] = identity
        proc.start(timeout=180)  # a busy machine takes long to import kopf and the client

    def holder(self) -> str:
        try:
            lease = self.leases.read_namespaced_lease(LEASE, JOBS_NAMESPACE)
        except kubernetes.client.ApiException:
            return ""
        return lease.spec.holder_identity or ""

    def leader(self) -> OperatorProcess | None:
        """The replica that holds the Lease and has run a reconcile pass."""
        holder = self.holder()
        for proc in self.procs:
            if self.identity.get(id(proc)) == holder and proc.process.alive() \
                    and _reconciled(proc):
                return proc
        return None


def _reconciled(proc: OperatorProcess) -> bool:
    try:
        text = proc.metrics()
    except OSError:
        return False
    return any(line.startswith("deeprad_reconcile_duration_seconds_count")
               and float(line.rsplit(" ", 1)[1]) > 0 for line in text.splitlines())


class Census:
    """Every SiteTask and trainer Job of the study's namespace that ever existed, by uid,
    polled while the study runs (finished ones may be garbage-collected before the end)."""

    def __init__(self, fed: Federation, ns: str) -> None:
        self.fed, self.ns = fed, ns
        self.tasks: dict[tuple[str, str], set[str]] = defaultdict(set)  # (site, round uid)
        self.jobs: dict[tuple[str, str], set[str]] = defaultdict(set)  # (site, job name)
        self.stop = threading.Event()
        self.hub = kubernetes.client.CustomObjectsApi(_api(fed.hub))
        self.batch = {s: kubernetes.client.BatchV1Api(_api(fed.sites[s].cluster))
                      for s in HOSPITALS}
        self.thread = threading.Thread(target=self._run, daemon=True, name="census")

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            for site in HOSPITALS:
                try:
                    tasks = self.hub.list_namespaced_custom_object(
                        "deeprad.io", "v1alpha1", f"deeprad-site-{site}", "sitetasks")
                    jobs = self.batch[site].list_namespaced_job(
                        self.fed.sites[site].namespace)
                except (kubernetes.client.ApiException, OSError):
                    continue  # the next poll
                for t in tasks["items"]:
                    if t["spec"]["roundRef"]["namespace"] == self.ns:
                        self.tasks[site, t["spec"]["roundRef"]["uid"]].add(
                            t["metadata"]["uid"])
                for j in jobs.items:
                    self.jobs[site, j.metadata.name].add(j.metadata.uid)

    def __enter__(self) -> Census:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def fed(clusters: dict[str, Cluster], s3_server: S3Server, devenv_dir: Path,
        tmp_path_factory: pytest.TempPathFactory, owner_token: str) -> Iterator[Federation]:
    hub = Cluster("ha-hub", devenv_dir / "clusters", owner_token=owner_token)
    start_clusters([hub])
    plans = [SitePlan("st-marys", clusters["site-1"], 0),
             SitePlan("charite", clusters["site-2"], 1)]
    try:
        federation = start_federation(hub, plans, s3_server,
                                      tmp_path_factory.mktemp("ha-federation"), owner_token)
        try:
            yield federation
        finally:
            federation.stop()
    finally:
        hub.stop()


def _study(fed: Federation, ns: str) -> dict[str, Any] | None:
    study = fed.get("federatedstudy", STUDY, "-n", ns) or {}
    state = (study.get("status") or {}).get("state")
    if state == "Failed":
        pytest.fail(f"study failed: {json.dumps(study['status'])[:3000]}")
    return study if state == "Succeeded" else None


@pytest.fixture
def replicas(fed: Federation) -> Iterator[Replicas]:
    """The federation's single operator makes way for two replicas with leader election."""
    made = Replicas(fed)
    fed.operator.stop()
    try:
        for proc in made.procs:
            made.start(proc)
        fed.operator = made.procs[0]  # log tails on failure (fed.processes)
        yield made
    finally:
        for proc in made.procs:
            proc.stop()


# Each kill costs a failover and a restart (a minute on a busy machine): room beyond the
# default 900 s when `make chaos` asks for 20.
@pytest.mark.timeout(900 + 90 * max(0, KILLS - 3))
def test_hub_failover_under_repeated_leader_kill_9(fed: Federation, replicas: Replicas) -> None:
    first = fed.wait("a leader that reconciles", replicas.leader, 90)
    standby = next(p for p in replicas.procs if p is not first)
    assert standby.healthy(), "a standby answers its liveness probe"
    assert not _reconciled(standby), "the standby reconciled while the leader held the Lease"

    rng = random.Random(int(os.environ.get("DEEPRAD_CHAOS_SEED", "14")))
    failovers: list[tuple[str, str, float]] = []
    began = time.monotonic()
    studies = 0
    # A 3-round study outlasts a few kills; `make chaos` goes on with the next 3-round study
    # until every kill is done, and checks each study as the first.
    while len(failovers) < KILLS:
        studies += 1
        ns = f"failover-{uuid.uuid4().hex[:6]}"
        _start_study(fed, ns)
        with Census(fed, ns) as census:
            while len(failovers) < KILLS and not _study(fed, ns):
                leader = fed.wait("a leader that reconciles", replicas.leader, 90)
                time.sleep(rng.uniform(0.5, 6.0))  # a random moment of the leader's work
                if _study(fed, ns):
                    break
                killed = replicas.identity[id(leader)]
                leader.kill9()
                t0 = time.monotonic()
                # The killed replica comes back as a new standby while the other takes over.
                restart = threading.Thread(target=replicas.start, args=(leader,), daemon=True)
                restart.start()
                new = fed.wait(f"failover after killing {killed}", lambda k=killed: (
                    (p := replicas.leader()) is not None and replicas.identity[id(p)] != k
                    and p), 90)
                failovers.append((killed, replicas.identity[id(new)], time.monotonic() - t0))
                print(f"kill {len(failovers)}: failover {failovers[-1][2]:.1f} s", flush=True)
                restart.join(timeout=90)
            done = fed.wait("the study to succeed", lambda n=ns: _study(fed, n), STUDY_TIMEOUT)
        _check_study(fed, ns, done, census)
    total = time.monotonic() - began

    times = [t for _, _, t in failovers]
    print(f"\nfailover of the hub operator, {len(failovers)} SIGKILLs of the leader "
          "(lease 10 s, renew deadline 7 s, retry 2 s):")
    for n, (killed, new_leader, t) in enumerate(failovers, 1):
        print(f"  kill {n:2d}: {killed:>18} -> {new_leader:<18} {t:5.1f} s")
    print(f"  median {statistics.median(times):.1f} s, max {max(times):.1f} s; "
          f"{studies} study(ies) of 3 rounds, each checked, in {total:.0f} s")
    assert len(failovers) == KILLS
    assert statistics.median(times) <= FAILOVER_GOAL, times


def _start_study(fed: Federation, ns: str) -> None:
    study = yaml.safe_load((ROOT / "examples" / "federatedstudy-tumor-cnn.yaml").read_text())
    study["spec"].pop("stopping")  # all three rounds, whatever the AUROC
    study["spec"]["roundTemplate"]["training"]["localEpochs"] = 1
    fed.hub.kubectl("create", "namespace", ns)
    fed.hub.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(study))


def _check_study(fed: Federation, ns: str, done: dict[str, Any], census: Census) -> None:
    """The study's outcome, as if nothing had happened."""
    rounds = sorted(items(fed, "federatedrounds", "-n", ns), key=lambda r: r["spec"]["round"])
    # three training rounds, then the final model's evaluation round (no updates)
    trained = [r for r in rounds if r["spec"]["mode"] == "train"]
    assert done["status"]["completedRounds"] == len(trained) == 3
    assert [r["spec"]["mode"] for r in rounds] == ["train"] * 3 + ["evaluate"]
    layout = StudyLayout(ns, STUDY, done["metadata"]["uid"])
    for r in rounds:
        name, uid = r["metadata"]["name"], r["metadata"]["uid"]
        assert r["status"]["state"] == "Succeeded", r["status"]
        for site in HOSPITALS:
            # One work item and one trainer Job per round and site, ever (by uid).
            assert len(census.tasks[site, uid]) == 1, (site, name, census.tasks[site, uid])
            assert len(census.jobs[site, f"{name}-{uid[:8]}"]) == 1, (site, name)
        if r["spec"]["mode"] != "train":
            continue
        # One accepted update per site and training round.
        report = AggregateReport.model_validate(fed.store_json(layout.aggregate(r["spec"]
                                                                                ["round"])))
        assert sorted(c.site for c in report.contributors) == sorted(HOSPITALS)
        assert not report.rejected
    assert {(s, u) for s, u in census.tasks} == {(s, r["metadata"]["uid"]) for s in HOSPITALS
                                                 for r in rounds}
    nonces = fed.store_json(layout.seen_nonces())
    assert len(nonces) == 2 * len(trained), nonces
