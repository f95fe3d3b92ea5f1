"""Kueue at a hospital, on real clusters: a hub, one hospital cluster running a real Kueue
controller (v0.17, built from source) with a quota of ONE GPU, the hub operator, the site agent
with `training.localQueue`, a real S3 server.

- two studies whose trainer Jobs need one GPU each both succeed, one after the other: while one
  trains, the other's SiteTask is Queued (reason QueuedByKueue, with Kueue's reason) rather than
  Running, and its Job starts only once the first one finished;
- a trainer pod that no node can take is reported Queued with reason Unschedulable and the
  scheduler's message, not Running, on the SiteTask and in the round's status on the hub.

The HospitalSite allows two concurrent tasks (spec.limits.maxConcurrentTasks: 2), so the hub
admits both rounds at once and the hospital's queue, not the hub, decides which one runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from deeprad_processes import wait
from federation import (
    TRAINING_NAMESPACE,
    Federation,
    SitePlan,
    agent_config,
    items,
    start_federation,
)
from kueue import KueueController, kueue_binary

from deeprad.devenv.cluster import Cluster, start_clusters
from deeprad.devenv.s3_server import S3Server

pytestmark = pytest.mark.e2e

SITE = "kueue-hospital"
QUEUE = "gpu-queue"
TASKS_NAMESPACE = f"deeprad-site-{SITE}"
TIMEOUT = 420.0  # a shared CI machine: every Job is a Python process that imports torch
SAMPLES = 96  # phantom images per training run: the queueing is under test, not the model


@dataclass
class KueueFederation:
    fed: Federation
    kueue: KueueController
    hospital: Cluster
    plan: SitePlan
    hub_signing: str = field(default="")


@pytest.fixture(scope="module")
def kueue_fed(kube_tools: None, s3_server: S3Server, devenv_dir: Path,
              tmp_path_factory: pytest.TempPathFactory, owner_token: str
              ) -> Iterator[KueueFederation]:
    """A hub and a hospital of this module's own (Kueue's CRDs stay off the shared clusters);
    Kueue's LocalQueue in the training namespace, quota one GPU."""
    kueue_binary()  # skip before starting anything when Kueue is not built
    workdir = tmp_path_factory.mktemp("kueue")
    hub = Cluster("kueue-hub", devenv_dir / "clusters", owner_token=owner_token)
    hospital = Cluster(SITE, devenv_dir / "clusters", owner_token=owner_token)
    start_clusters([hub, hospital])
    kueue = KueueController(hospital, workdir, owner_token)
    fed: Federation | None = None
    try:
        kueue.start()
        plan = SitePlan(SITE, hospital, 0)
        fed = start_federation(hub, [plan], s3_server, workdir / "federation", owner_token)
        kueue.add_queue(TRAINING_NAMESPACE, QUEUE, gpus=1)
        hub_signing = (fed.workdir / "keys" / "hub" / "signing.pub").read_text().strip()
        yield KueueFederation(fed, kueue, hospital, plan, hub_signing)
    finally:
        if fed is not None:
            fed.stop()
        kueue.stop()
        for cluster in (hospital, hub):
            cluster.stop()


def _configure_agent(kf: KueueFederation, **training: Any) -> None:
    """Restart the site agent with these training settings, as a hospital admin's
    `helm upgrade` of the site chart would."""
    config = agent_config(kf.plan, kf.hub_signing, kf.fed.s3)
    config["training"]["dataset"]["options"]["samples"] = SAMPLES
    config["training"].update(training)
    (kf.fed.workdir / SITE / "agent.yaml").write_text(yaml.safe_dump(config))
    agent = kf.fed.agents[SITE]
    agent.stop()
    agent.start()


def _study(name: str) -> dict[str, Any]:
    """One round of the small tumour CNN at this one hospital (no secure aggregation: it
    needs two sites)."""
    return {"apiVersion": "deeprad.io/v1alpha1", "kind": "FederatedStudy",
            "metadata": {"name": name},
            "spec": {"model": {"name": "tumor-cnn"},
                     "data": {"modality": "mri", "labels": ["normal", "tumor"],
                              "imageSize": 32, "valFraction": 0.2},
                     "siteSelector": {"matchLabels": {"deeprad.io/site": SITE}},
                     "rounds": 1,
                     # the queue's training Jobs are the subject: no evaluation round after
                     "finalEvaluation": False,
                     "roundTemplate": {"minSites": 1, "deadline": "10m",
                                       "training": {"localEpochs": 1, "batchSize": 16},
                                       "privacy": {"secureAggregation": False},
                                       "strategy": {"name": "fedavg"}}}}


def _tasks(kf: KueueFederation, namespace: str) -> dict[str, dict[str, Any]]:
    """The site's tasks of rounds in `namespace`, by name, with their status."""
    return {t["metadata"]["name"]: t.get("status") or {}
            for t in items(kf.fed, "sitetasks", "-n", TASKS_NAMESPACE)
            if t["spec"]["roundRef"]["namespace"] == namespace}


def _report(kf: KueueFederation, namespace: str) -> str:
    """Studies, tasks, the hospital's Jobs and Kueue's Workloads: what a failure needs."""
    lines = [f"study {s['metadata']['name']}: {json.dumps(s.get('status'))[:1200]}"
             for s in items(kf.fed, "federatedstudies", "-n", namespace)]
    lines += [f"task {n}: {json.dumps(st)[:600]}" for n, st in _tasks(kf, namespace).items()]
    lines += [f"job {j['metadata']['name']}: suspend={j['spec'].get('suspend')} "
              f"{json.dumps(j.get('status'))[:400]}"
              for j in items(kf.fed, "jobs", "-n", TRAINING_NAMESPACE, cluster=kf.hospital)]
    lines += [f"workload {w['metadata']['name']}: "
              f"{json.dumps((w.get('status') or {}).get('conditions'))[:600]}"
              for w in kf.kueue.workloads(TRAINING_NAMESPACE)]
    return "\n".join(lines) + f"\n--- kueue ---\n{kf.kueue.log_tail(20)}"


def _wait(kf: KueueFederation, ns: str, what: str, check: Callable[[], Any]) -> Any:
    return wait(what, check, TIMEOUT, *kf.fed.processes(), interval=0.5,
                diagnostics=lambda: "\n--- state ---\n" + _report(kf, ns))


def test_kueue_quota_of_one_gpu_runs_two_studies_in_turn(kueue_fed: KueueFederation) -> None:
    kf, ns = kueue_fed, "kueue-studies"
    _configure_agent(kf, localQueue=QUEUE, gpu={"count": 1})
    kf.fed.hub.kubectl("create", "namespace", ns)
    kf.fed.hub.kubectl("apply", "-n", ns, "-f", "-",
                       input=yaml.safe_dump_all([_study("kueue-a"), _study("kueue-b")]))
    queued_while_training: list[tuple[str, str]] = []

    def both_succeeded() -> bool:
        tasks = _tasks(kf, ns)
        running = [n for n, st in tasks.items() if st.get("state") == "Running"]
        queued_while_training.extend(
            (n, st.get("message", "")) for n, st in tasks.items()
            if running and st.get("state") == "Queued" and st.get("reason") == "QueuedByKueue")
        states = {s["metadata"]["name"]: (s.get("status") or {}).get("state")
                  for s in items(kf.fed, "federatedstudies", "-n", ns)}
        if "Failed" in states.values():
            pytest.fail(f"a study failed: {states}\n{_report(kf, ns)}")
        return set(states.values()) == {"Succeeded"} and len(states) == 2

    _wait(kf, ns, "both studies Succeeded", both_succeeded)

    # One task waited in Kueue while the other trained, and said why.
    assert queued_while_training, _report(kf, ns)
    name, message = queued_while_training[0]
    assert message.startswith(f"waiting in Kueue LocalQueue {QUEUE}"), message
    assert "insufficient unused quota for nvidia.com/gpu" in message, message
    # Both tasks succeeded, and the queue's reason did not outlive the wait.
    finished = _tasks(kf, ns)
    assert {st["state"] for st in finished.values()} == {"Succeeded"}, finished
    assert not [st for st in finished.values() if st.get("reason")], finished
    # On the hospital: the Jobs went through the LocalQueue and ran one after the other.
    jobs = sorted(items(kf.fed, "jobs", "-n", TRAINING_NAMESPACE, cluster=kf.hospital),
                  key=lambda j: j["status"]["startTime"])
    assert len(jobs) == 2, _report(kf, ns)
    assert {j["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] for j in jobs} == {QUEUE}
    assert jobs[1]["status"]["startTime"] >= jobs[0]["status"]["completionTime"], \
        _report(kf, ns)
    assert jobs[1]["metadata"]["name"] == name  # the one that waited started last
    finished_workloads = [w for w in kf.kueue.workloads(TRAINING_NAMESPACE)
                          if any(c["type"] == "Finished" and c["status"] == "True"
                                 for c in (w.get("status") or {}).get("conditions") or ())]
    assert len(finished_workloads) == 2, _report(kf, ns)


def test_kueue_reports_unschedulable_trainer_pod(kueue_fed: KueueFederation) -> None:
    """Kueue admits the Job (the quota fits), but no node matches the site's node selector:
    the task, and the round's entry for the site on the hub, say so in the scheduler's words."""
    kf, ns = kueue_fed, "kueue-unschedulable"
    _configure_agent(kf, localQueue=QUEUE,
                     gpu={"count": 1, "nodeSelector": {"deeprad.io/gpu-pool": "nowhere"}})
    kf.fed.hub.kubectl("create", "namespace", ns)
    kf.fed.hub.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(_study("kueue-nowhere")))

    def unschedulable() -> dict[str, Any] | None:
        for st in _tasks(kf, ns).values():
            if st.get("state") == "Running":
                pytest.fail(f"an unschedulable trainer was reported Running\n{_report(kf, ns)}")
            if st.get("state") == "Queued" and st.get("reason") == "Unschedulable":
                return st
        return None

    st = _wait(kf, ns, "the task Queued as Unschedulable", unschedulable)
    assert st["message"].startswith("trainer pod unschedulable: 0/2 nodes are available"), st
    assert "didn't match Pod's node affinity/selector" in st["message"], st
    assert "\n" not in st["message"], st

    def hub_shows_it() -> dict[str, Any] | None:
        return next((site for r in items(kf.fed, "federatedrounds", "-n", ns)
                     for site in (r.get("status") or {}).get("sites") or ()
                     if (site.get("state"), site.get("reason")) == ("Queued", "Unschedulable")),
                    None)

    site = _wait(kf, ns, "the round's site entry Queued as Unschedulable", hub_shows_it)
    assert "didn't match Pod's node affinity/selector" in site["message"], site

    # Withdrawn with its study, the Job goes too (the agent collects Jobs whose task is gone).
    # (The round's deadline would end it as well: tests/unit/test_site_agent_decide.py.)
    kf.fed.hub.kubectl("delete", "-n", ns, "federatedstudy", "kueue-nowhere", "--wait=false")
    _wait(kf, ns, "its Job deleted on the hospital cluster", lambda: not [
        j for j in items(kf.fed, "jobs", "-n", TRAINING_NAMESPACE, cluster=kf.hospital)
        if j["metadata"]["labels"].get("deeprad.io/study") == "kueue-nowhere"])
