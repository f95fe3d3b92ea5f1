"""Outages mid-round on real clusters, a real S3 server and the node agent: each heals with
nothing lost, or fails the round with a condition naming the cause.

- the S3 server killed while the trainers start, restarted $DEEPRAD_OUTAGE_SECONDS (60 s)
  later on the same port and data: the trainers' store retries wait it out, the round succeeds
  with both hospitals' updates, and no Job needed a second pod;
- the hub's API unreachable for one site agent for as long: the agent logs the outage once,
  reports nothing failed, and reports its trainer's result when the hub is back; the round
  succeeds;
- a hospital cluster's API unreachable for its agent through the round's deadline: the agent
  says so on its task, fails it as the deadline comes, and the round fails (minSites 2) with a
  condition naming the cause.

The agents reach both API servers through TCP proxies (tests/support/tcp_proxy.py) that a test
cuts: a real outage of the path, nothing mocked. The module has its own hub and S3 server, so
killing them harms no other test. Rounds are small (32 px images, one epoch, no secure
aggregation) to keep each test within about three minutes at the default 60 s outage.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from deeprad_processes import OperatorProcess
from federation import (
    JOBS_NAMESPACE,
    Federation,
    SitePlan,
    agent_config,
    condition,
    items,
    register_site,
    site_ready,
    start_hub,
)
from tcp_proxy import TcpProxy

from deeprad.core.layout import StudyLayout
from deeprad.core.protocol import AggregateReport
from deeprad.devenv.cluster import Cluster, start_clusters
from deeprad.devenv.kubeconfig import kubeconfig_dict, write_kubeconfig
from deeprad.devenv.s3_server import S3Server

pytestmark = pytest.mark.e2e

OUTAGE_S = float(os.environ.get("DEEPRAD_OUTAGE_SECONDS", "60"))
SITES = ("bergen", "turku")
ROUND_TIMEOUT = 300.0


@dataclass
class Paths:
    """One agent's proxied ways to its two API servers."""

    hub: TcpProxy
    cluster: TcpProxy


@pytest.fixture(scope="module")
def outage_fed(clusters: dict[str, Cluster], devenv_dir: Path, owner_token: str,
               tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[Federation, dict[str, Paths]]]:
    hub = Cluster("outage-hub", devenv_dir / "clusters", owner_token=owner_token)
    s3 = S3Server(devenv_dir / "outage-s3", owner_token=owner_token)
    start_clusters([hub])
    s3.start()
    paths: dict[str, Paths] = {}
    fed: Federation | None = None
    try:
        fed = start_hub(hub, s3, tmp_path_factory.mktemp("outages"), owner_token)
        keys = fed.workdir / "keys"
        hub_signing = (keys / "hub" / "signing.pub").read_text().strip()
        for name, cluster, profile in zip(SITES, (clusters["site-1"], clusters["site-2"]),
                                          (0, 1), strict=True):
            site = SitePlan(name, cluster, profile, namespace=f"deeprad-training-{name}")
            fed.sites[name] = site
            paths[name] = _add_proxied_site(fed, site, keys, hub_signing)
        for name in SITES:
            fed.wait(f"HospitalSite {name} Ready", lambda n=name: site_ready(fed, n))
        yield fed, paths
    finally:
        if fed is not None:
            fed.stop()
        for p in paths.values():
            p.hub.close()
            p.cluster.close()
        s3.stop()
        hub.stop()


def _add_proxied_site(fed: Federation, site: SitePlan, keys: Path, hub_signing: str) -> Paths:
    """Register a pull-mode hospital (a heartbeat timeout longer than any outage here, so it
    stays admissible) and start its agent, reaching the hub and its own cluster by proxy."""
    register_site(fed, site, keys, {"mode": "pull", "heartbeatTimeout": "10m"})
    ns = f"deeprad-site-{site.name}"
    fed.wait(f"ServiceAccount deeprad-agent in {ns}",
             lambda: fed.get("serviceaccount", "deeprad-agent", "-n", ns))
    token = fed.hub.kubectl("create", "token", "deeprad-agent", "-n", ns,
                            "--duration", "24h").stdout.strip()
    paths = Paths(TcpProxy("127.0.0.1", fed.hub.ports.apiserver).open(),
                  TcpProxy("127.0.0.1", site.cluster.ports.apiserver).open())
    folder = fed.workdir / site.name
    ca = (fed.hub.dir / "pki" / "ca.crt").read_bytes()
    hub_kubeconfig = write_kubeconfig(folder / "hub.kubeconfig", kubeconfig_dict(
        f"hub-{site.name}", f"https://{paths.hub.address}", ca, token=token))
    local = yaml.safe_load(site.cluster.kubeconfig.read_text())
    for entry in local["clusters"]:
        entry["cluster"]["server"] = f"https://{paths.cluster.address}"
    local_kubeconfig = write_kubeconfig(folder / "local.kubeconfig", local)
    config_path = folder / "agent.yaml"
    config_path.write_text(yaml.safe_dump(agent_config(site, hub_signing, fed.s3)))
    agent = OperatorProcess(f"agent-{site.name}", "site", [
        "--config", str(config_path), "--hub-kubeconfig", str(hub_kubeconfig),
        "--kubeconfig", str(local_kubeconfig)], folder, fed.owner_token)
    fed.agents[site.name] = agent.start()
    return paths


def _round(name: str, min_sites: int, deadline: str) -> dict[str, Any]:
    return {"apiVersion": "deeprad.io/v1alpha1", "kind": "FederatedRound",
            "metadata": {"name": name},
            "spec": {"round": 1, "model": {"name": "tumor-cnn"}, "sites": list(SITES),
                     "minSites": min_sites, "deadline": deadline,
                     "data": {"imageSize": 32},
                     "privacy": {"secureAggregation": False},
                     "training": {"localEpochs": 1}}}


def _start_round(fed: Federation, body: dict[str, Any]) -> str:
    ns = f"outage-{uuid.uuid4().hex[:6]}"
    fed.hub.kubectl("create", "namespace", ns)
    fed.hub.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))
    return ns


def _round_obj(fed: Federation, ns: str, name: str) -> dict[str, Any]:
    return fed.get("federatedround", name, "-n", ns) or {}


def _report(fed: Federation, ns: str, name: str) -> str:
    """The round, its tasks and Jobs, for a failure message."""
    lines = [f"round: {json.dumps(_round_obj(fed, ns, name).get('status'))[:2500]}"]
    for site, plan in fed.sites.items():
        lines += [f"task {t['metadata']['name']}: {json.dumps(t.get('status'))[:800]}"
                  for t in items(fed, "sitetasks", "-n", f"deeprad-site-{site}")]
        lines += [f"job {site}/{j['metadata']['name']}: {json.dumps(j.get('status'))[:500]}"
                  for j in items(fed, "jobs", "-n", plan.namespace, cluster=plan.cluster)]
    lines += [f"hub job {j['metadata']['name']}: {json.dumps(j.get('status'))[:500]}"
              for j in items(fed, "jobs", "-n", JOBS_NAMESPACE)]
    return "\n".join(lines)


def _ended(fed: Federation, ns: str, name: str) -> dict[str, Any] | None:
    obj = _round_obj(fed, ns, name)
    return obj if (obj.get("status") or {}).get("state") in ("Succeeded", "Failed") else None


def _wait_ended(fed: Federation, ns: str, name: str) -> dict[str, Any]:
    try:
        return dict(fed.wait(f"round {name} to end", lambda: _ended(fed, ns, name),
                             ROUND_TIMEOUT))
    except pytest.fail.Exception as exc:
        pytest.fail(f"{exc}\n{_report(fed, ns, name)}")


def _task(fed: Federation, site: str, round_uid: str) -> dict[str, Any] | None:
    found = list(items(fed, "sitetasks", "-n", f"deeprad-site-{site}", "-l",
                       f"deeprad.io/round-uid={round_uid}"))
    return found[0] if found else None


def _job_created(fed: Federation, site: str, round_uid: str) -> bool:
    """The site's agent created its trainer Job (its task is Accepted or further)."""
    task = _task(fed, site, round_uid) or {}
    return (task.get("status") or {}).get("state") in ("Accepted", "Running", "Succeeded")


def _ride_out(fed: Federation, ns: str, name: str, seconds: float) -> None:
    """Let an outage last `seconds`, checking all along that the round does not give up."""
    until = time.monotonic() + seconds

    def over() -> bool:
        state = (_round_obj(fed, ns, name).get("status") or {}).get("state")
        assert state != "Failed", f"the round failed during the outage:\n{_report(fed, ns, name)}"
        return time.monotonic() >= until

    fed.wait(f"the {seconds:.0f} s outage to pass", over, seconds + 60)


def _trainer_log(fed: Federation, site: str, job: str) -> str:
    plan = fed.sites[site]
    return plan.cluster.kubectl("logs", f"job/{job}", "-n", plan.namespace,
                                check=False).stdout


def _assert_healed(fed: Federation, ns: str, done: dict[str, Any]) -> None:
    """Succeeded with every site's update aggregated, each trainer Job on its first pod."""
    name, uid = done["metadata"]["name"], done["metadata"]["uid"]
    status = done["status"]
    assert status["state"] == "Succeeded", _report(fed, ns, name)
    assert {s["site"]: s["state"] for s in status["sites"]} == dict.fromkeys(SITES, "Reported")
    report = AggregateReport.model_validate(fed.store_json(
        StudyLayout(ns, name, uid).aggregate(1)))
    assert sorted(c.site for c in report.contributors) == sorted(SITES)
    assert not report.rejected
    for site in SITES:
        plan = fed.sites[site]
        job = fed.get("job", f"{name}-{uid[:8]}", "-n", plan.namespace, cluster=plan.cluster)
        assert job is not None and job["status"].get("succeeded") == 1, (site, job)
        assert not job["status"].get("failed"), (site, job["status"])


def test_outage_of_the_store_mid_round_heals_with_nothing_lost(
        outage_fed: tuple[Federation, dict[str, Paths]]) -> None:
    fed, _ = outage_fed
    name = "store-outage"
    ns = _start_round(fed, _round(name, min_sites=2, deadline="5m"))
    uid = fed.wait("the round's uid", lambda: _round_obj(fed, ns, name).get(
        "metadata", {}).get("uid"))
    # The trainers start as the store goes away: their first download meets the outage.
    fed.wait("both trainer Jobs created", lambda: all(
        _job_created(fed, s, uid) for s in SITES), 180)
    fed.s3.stop()
    _ride_out(fed, ns, name, OUTAGE_S)
    fed.s3.start()  # same port, same data folder
    done = _wait_ended(fed, ns, name)
    _assert_healed(fed, ns, done)
    # The trainers met the outage and waited it out, saying so one line per retry.
    for site in SITES:
        log = _trainer_log(fed, site, f"{name}-{uid[:8]}")
        assert "store unreachable (connection refused, http://127.0.0.1:" in log, log[-2000:]
        assert "Traceback" not in log, log[-2000:]


def test_outage_of_the_hub_api_for_a_site_agent_heals(
        outage_fed: tuple[Federation, dict[str, Paths]]) -> None:
    fed, paths = outage_fed
    name, site = "hub-outage", SITES[0]
    agent = fed.agents[site]
    ns = _start_round(fed, _round(name, min_sites=2, deadline="5m"))
    uid = fed.wait("the round's uid", lambda: _round_obj(fed, ns, name).get(
        "metadata", {}).get("uid"))
    fed.wait(f"{site}'s trainer Job created", lambda: _job_created(fed, site, uid), 180)
    log_before = agent.log_tail(100_000)
    paths[site].hub.close()
    try:
        _ride_out(fed, ns, name, OUTAGE_S)
    finally:
        paths[site].hub.open()
    done = _wait_ended(fed, ns, name)
    _assert_healed(fed, ns, done)
    # Logged once as it began and once as it ended, not once per pass; nothing failed.
    during = agent.log_tail(100_000)[len(log_before):]
    assert during.count("hub API unreachable (connection refused to 127.0.0.1:") == 1, during
    assert "hub API reachable again after" in during, during
    assert "Traceback" not in during, during
    task = _task(fed, site, uid) or {}
    assert task["status"]["state"] == "Succeeded", task


def test_outage_of_a_hospital_cluster_api_through_the_deadline_fails_the_round_naming_it(
        outage_fed: tuple[Federation, dict[str, Paths]]) -> None:
    fed, paths = outage_fed
    name, site = "cluster-outage", SITES[1]
    cut = paths[site].cluster
    cut.close()  # before the round: this hospital's agent can neither create nor read Jobs
    try:
        # The deadline leaves room for the prepare Job on a busy machine: a round whose input
        # checkpoint is not there by then fails before any site is asked.
        ns = _start_round(fed, _round(name, min_sites=2, deadline="150s"))
        done = _wait_ended(fed, ns, name)
    finally:
        cut.open()
    cause = f"connection refused to 127.0.0.1:{cut.port}"
    status, report = done["status"], _report(fed, ns, name)
    assert status["state"] == "Failed", report
    entry = next(s for s in status["sites"] if s["site"] == site)
    assert entry["state"] == "Failed" and entry["reason"] == "ClusterUnreachable", report
    assert entry["message"] == ("the hospital cluster's API is unreachable through the "
                                f"round's deadline: {cause}"), entry
    failed = condition(done, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "QuorumNotMet", failed
    assert f"{site}: Failed (the hospital cluster's API is unreachable through the round's " \
           f"deadline: {cause})" in failed["message"], failed
    assert "\n" not in failed["message"] and "Traceback" not in failed["message"]
    # Said on the task while it lasted (state unchanged), failed only as the deadline came.
    log = fed.agents[site].log_tail(100_000)
    assert f"the hospital cluster's API is unreachable: {cause}" in log, log[-3000:]
    assert log.count(f"cluster API unreachable ({cause})") == 1, log[-3000:]
    # The cluster answers again: the agent notices and goes on.
    fed.wait(f"{site}'s agent to reach its cluster again",
             lambda: "cluster API reachable again after" in fed.agents[site].log_tail(400), 60)
