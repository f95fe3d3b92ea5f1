"""Whole studies through the operator on real clusters: a hub and two hospital clusters, the
hub operator, one site agent per hospital, a real S3 server. Training Jobs run in the hospital
clusters (through the node agent), prepare and aggregator Jobs in the hub.

- the example FederatedStudy (3 rounds, secure aggregation on) succeeds, AUROC rises, the
  final checkpoint's manifest names both hospitals and carries the hub's signature;
- the same study survives the hub operator SIGKILLed five times and a site agent once, with
  no duplicate Jobs, work items or updates;
- a hospital whose agent stops mid-round drops out of the secure-aggregation exchange; with
  quorum the round succeeds before its deadline, below minSites it fails at once with a
  condition that says why;
- a FedAdam study with secure aggregation (the default) succeeds.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from federation import (
    BUCKET,
    JOBS_NAMESPACE,
    Federation,
    SitePlan,
    add_site,
    agent_config,
    condition,
    items,
    register_site,
    site_ready,
    start_federation,
)

from deeprad.core.checkpoint import verify_checkpoint_manifest
from deeprad.core.identity import PublicIdentity
from deeprad.core.layout import StudyLayout
from deeprad.core.protocol import AggregateReport, CheckpointManifest
from deeprad.devenv.cluster import Cluster, start_clusters
from deeprad.devenv.s3_server import S3Server

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
STUDY = "tumor-detection"
HOSPITALS = ("st-marys", "charite")
STUDY_TIMEOUT = 600.0


@pytest.fixture(scope="module")
def fed(clusters: dict[str, Cluster], s3_server: S3Server, devenv_dir: Path,
        tmp_path_factory: pytest.TempPathFactory, owner_token: str) -> Iterator[Federation]:
    # A hub of this module's own: the session's hub serves integration tests that register
    # the example HospitalSites themselves and expect them fresh.
    hub = Cluster("op-hub", devenv_dir / "clusters", owner_token=owner_token)
    start_clusters([hub])
    plans = [SitePlan("st-marys", clusters["site-1"], 0),
             SitePlan("charite", clusters["site-2"], 1)]
    try:
        federation = start_federation(hub, plans, s3_server,
                                      tmp_path_factory.mktemp("federation"), owner_token)
        try:
            yield federation
        finally:
            federation.stop()
    finally:
        hub.stop()


def _apply_study(fed: Federation, ns: str) -> None:
    fed.hub.kubectl("create", "namespace", ns)
    fed.hub.kubectl("apply", "-n", ns, "-f", str(ROOT / "examples" /
                                                  "federatedstudy-tumor-cnn.yaml"))


def _study_done(fed: Federation, ns: str) -> dict[str, Any] | None:
    study = fed.get("federatedstudy", STUDY, "-n", ns)
    state = ((study or {}).get("status") or {}).get("state")
    if state == "Failed":
        pytest.fail(f"study failed: {json.dumps(study['status'], indent=1)[:3000]}\n"  # type: ignore[index]
                    f"{_round_report(fed, ns)}")
    return study if state == "Succeeded" else None


def _round_report(fed: Federation, ns: str) -> str:
    """Rounds, their work items and hub Jobs: what a failure message needs."""
    lines = [f"{r['metadata']['name']}: {json.dumps(r.get('status'))[:1500]}"
             for r in items(fed, "federatedrounds", "-n", ns)]
    for site in fed.sites:
        lines += [f"task {t['metadata']['name']}: {json.dumps(t.get('status'))[:600]}"
                  for t in items(fed, "sitetasks", "-n", f"deeprad-site-{site}")
                  if t["spec"]["roundRef"]["namespace"] == ns]
    lines += [f"job {j['metadata']['name']}: {json.dumps(j.get('status'))[:400]}"
              for j in items(fed, "jobs", "-n", JOBS_NAMESPACE)]
    return "\n".join(lines)


def _wait_study(fed: Federation, ns: str, what: str) -> dict[str, Any]:
    try:
        return dict(fed.wait(what, lambda: _study_done(fed, ns), STUDY_TIMEOUT))
    except pytest.fail.Exception as exc:
        study = fed.get("federatedstudy", STUDY, "-n", ns) or {}
        pytest.fail(f"{exc}\n--- state ---\n{json.dumps(study.get('status'))}\n"
                    f"{_round_report(fed, ns)}")


def _trained(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training rounds (not the final evaluation round)."""
    return [r for r in rounds if r["spec"].get("mode", "train") == "train"]


def _check_study(fed: Federation, ns: str, study: dict[str, Any]) -> list[dict[str, Any]]:
    """The study's outcome as a user checks it; returns its training rounds."""
    every = sorted(items(fed, "federatedrounds", "-n", ns), key=lambda r: r["spec"]["round"])
    rounds = _trained(every)
    done = study["status"]["completedRounds"]
    assert done == len(rounds) and done >= 2, _round_report(fed, ns)
    if done < 3:
        assert condition(study, "Succeeded")["reason"] == "TargetReached"
    hub_keys = PublicIdentity.load(fed.workdir / "keys" / "hub-public")
    layout = StudyLayout(ns, STUDY, study["metadata"]["uid"])  # keys carry the study's uid
    for r in rounds:
        n, st = r["spec"]["round"], r["status"]
        assert st["state"] == "Succeeded", _round_report(fed, ns)
        assert {s["site"]: s["state"] for s in st["sites"]} == dict.fromkeys(HOSPITALS,
                                                                             "Reported")
        assert (st["admittedSites"], st["reportedSites"]) == (2, 2)
        manifest = CheckpointManifest.model_validate(fed.store_json(layout.global_manifest(n)))
        verify_checkpoint_manifest(manifest, hub_keys, layout, n)
        assert sorted(c.site for c in manifest.contributors) == sorted(HOSPITALS)
        assert st["outputCheckpoint"]["digest"] == manifest.payload_sha256
        report = AggregateReport.model_validate(fed.store_json(layout.aggregate(n)))
        assert report.secagg is not None and sorted(report.secagg.survivors) == sorted(HOSPITALS)
        assert not report.rejected
        # Each training Job ran once, in its hospital's cluster, and succeeded.
        for site in HOSPITALS:
            cluster = fed.sites[site].cluster
            job = fed.get("job", f"{r['metadata']['name']}-{r['metadata']['uid'][:8]}", "-n",
                          fed.sites[site].namespace, cluster=cluster)
            assert job is not None and job["status"].get("succeeded") == 1, (site, n)
            assert not job["status"].get("failed"), (site, n, job["status"])
            tasks = list(items(fed, "sitetasks", "-n", f"deeprad-site-{site}", "-l",
                               f"deeprad.io/round-uid={r['metadata']['uid']}"))
            assert len(tasks) == 1 and tasks[0]["status"]["state"] == "Succeeded"
        agg = fed.get("job", f"{r['metadata']['name']}-{r['metadata']['uid'][:8]}-aggregate",
                      "-n", JOBS_NAMESPACE)
        assert agg is not None and agg["status"].get("succeeded") == 1, agg
        assert not agg["status"].get("failed"), agg["status"]
    # Input metrics are the global model on the sites' validation data: it learns.
    aurocs = [r["status"]["inputMetrics"]["auroc"] for r in rounds]
    assert all(b > a for a, b in itertools.pairwise(aurocs)), aurocs
    assert aurocs[-1] >= aurocs[0] + 0.05, aurocs
    # Each round's aggregateMetrics is the next round's input, filled in by the study; the
    # last one's is the final evaluation round's (the final model on validation data).
    assert len(every) == len(rounds) + 1 and every[-1]["spec"]["mode"] == "evaluate"
    for prev, nxt in itertools.pairwise(every):
        fresh = fed.get("federatedround", prev["metadata"]["name"], "-n", ns) or {}
        assert fresh["status"]["aggregateMetrics"] == nxt["status"]["inputMetrics"]
    last = rounds[-1]["status"]["outputCheckpoint"]
    assert study["status"]["latestCheckpoint"] == last
    _check_final_evaluation(fed, ns, study, every[-1], "auroc")
    return rounds


def _check_final_evaluation(fed: Federation, ns: str, study: dict[str, Any],
                            evaluation: dict[str, Any], metric: str) -> None:
    """The final model was scored by every site in an evaluation round that uploaded nothing
    and wrote no checkpoint; the study's status holds the pooled and per-site scores."""
    st, final = evaluation["status"], study["status"]["finalEvaluation"]
    assert st["state"] == "Succeeded", _round_report(fed, ns)
    assert evaluation["spec"]["inputCheckpoint"] == study["status"]["latestCheckpoint"]
    assert "outputCheckpoint" not in st and not any(s.get("updateDigest") for s in st["sites"])
    assert (final["round"], final["state"], final["metric"]) == (
        evaluation["metadata"]["name"], "Succeeded", metric)
    assert final["checkpoint"] == study["status"]["latestCheckpoint"]
    pooled = study["status"]["finalMetrics"]
    assert pooled == st["testMetrics"] and 0.0 <= pooled[metric] <= 1.0
    assert final["value"] == pooled[metric]
    assert sorted(s["site"] for s in final["sites"]) == sorted(HOSPITALS)
    for site in final["sites"]:
        assert site["split"] in ("test", "validation") and 0 <= site["metrics"][metric] <= 1
    # Pooled over the sites' records, not averaged: the counts add up.
    assert pooled["n"] == sum(s["metrics"]["n"] for s in final["sites"])
    layout = StudyLayout(ns, study["metadata"]["name"], study["metadata"]["uid"])
    number = evaluation["spec"]["round"]
    assert not list(fed.s3.client().list_objects(
        BUCKET, prefix=layout.updates_prefix(number), recursive=True))
    report = AggregateReport.model_validate(fed.store_json(layout.aggregate(number)))
    assert report.contributors == [] and sorted(report.evaluated_sites) == sorted(HOSPITALS)


def _check_audit_trail(fed: Federation, ns: str, rounds: int) -> None:
    """`deeprad audit` verifies every round x hospital record against the pinned hub key, and
    names who created the study (the admin, as the creator admission policy recorded it)."""
    creator = json.loads(fed.hub.kubectl("auth", "whoami", "-o", "json").stdout)
    admin = creator["status"]["userInfo"]["username"]
    out = subprocess.run(
        [sys.executable, "-m", "deeprad.cli", "audit", STUDY, "-n", ns,
         "--store", f"s3://{BUCKET}?endpoint={fed.s3.endpoint}&secure=false",
         "--hub-key", str(fed.workdir / "keys" / "hub-public")],
        capture_output=True, text=True, timeout=120, cwd="/",
        env={**os.environ, "DEEPRAD_S3_ACCESS_KEY": fed.s3.root.access_key,
             "DEEPRAD_S3_SECRET_KEY": fed.s3.root.secret_key})
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[1:-1]]
    assert sorted((int(r[0]), r[1]) for r in rows) == [
        (n, site) for n in range(1, rounds + 1) for site in sorted(HOSPITALS)], out.stdout
    assert all(r[2] == admin and r[-1] == "✓" for r in rows), out.stdout
    assert f"{len(rows)} of {len(rows)} records verified" in out.stdout


def test_example_study_trains_across_hospital_clusters(fed: Federation) -> None:
    ns = f"research-{uuid.uuid4().hex[:6]}"
    _apply_study(fed, ns)
    study = _wait_study(fed, ns, "the study to succeed")
    _check_audit_trail(fed, ns, study["status"]["completedRounds"])
    rounds = _check_study(fed, ns, study)
    # The first round started from a hub-initialised model (prepare Job), the next from
    # the previous round's output.
    assert "inputCheckpoint" not in rounds[0]["spec"]
    assert rounds[1]["spec"]["inputCheckpoint"]["uri"] == \
        rounds[0]["status"]["outputCheckpoint"]["uri"]
    events = {e["reason"] for e in items(fed, "events", "-n", ns)}
    assert {"RoundCreated", "SitesScheduled", "RoundSucceeded"} <= events
    text = fed.operator.metrics()
    assert f'deeprad_rounds_total{{namespace="{ns}",outcome="succeeded",study="{STUDY}"}}' \
        in text
    assert f'deeprad_global_auroc{{namespace="{ns}",study="{STUDY}"}}' in text


def test_study_survives_operator_and_agent_kill_9(fed: Federation) -> None:
    ns = f"chaos-{uuid.uuid4().hex[:6]}"
    rng = random.Random(7)
    stop = threading.Event()
    kills: list[str] = []

    def chaos() -> None:
        victims = ["hub-operator"] * 5 + ["agent-charite"]
        rng.shuffle(victims)
        for victim in victims:
            if stop.wait(rng.uniform(4.0, 12.0)):
                return
            proc = fed.operator if victim == "hub-operator" else fed.agents["charite"]
            proc.kill9()
            kills.append(victim)
            time.sleep(rng.uniform(0.5, 3.0))
            proc.start()

    thread = threading.Thread(target=chaos, daemon=True)
    _apply_study(fed, ns)
    thread.start()
    try:
        study = _wait_study(fed, ns, "the study to succeed under chaos")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert kills.count("hub-operator") >= 5 and "agent-charite" in kills, kills
    _check_study(fed, ns, study)
    # Work items: exactly one per round and site; no round beyond the study's.
    rounds = list(items(fed, "federatedrounds", "-n", ns))
    for site in HOSPITALS:
        tasks = [t for t in items(fed, "sitetasks", "-n", f"deeprad-site-{site}")
                 if t["spec"]["roundRef"]["namespace"] == ns]
        assert len(tasks) == len(rounds), [t["metadata"]["name"] for t in tasks]
    # Every accepted nonce once: no update counted twice (the evaluation round sends none).
    nonces = fed.store_json(StudyLayout(ns, STUDY, study["metadata"]["uid"]).seen_nonces())
    assert len(nonces) == 2 * len(_trained(rounds)), nonces


def _hand_round(name: str, sites: list[str], min_sites: int) -> dict[str, Any]:
    """A round made by hand, with secure aggregation on (the default, semi-honest: 2 of 3
    sites finish it). The deadline leaves the hospitals' training inside the hub's first wait
    (the window less four step timeouts, deeprad.core.secagg.relay), with room for four
    trainers on a busy machine; a site that never advertises its keys costs that wait."""
    return {"apiVersion": "deeprad.io/v1alpha1", "kind": "FederatedRound",
            "metadata": {"name": name},
            "spec": {"round": 1, "model": {"name": "tumor-cnn"}, "sites": sites,
                     "minSites": min_sites, "deadline": "5m",
                     "data": {"imageSize": 64},
                     "training": {"localEpochs": 1}}}


def test_dropout_mid_round_under_secure_aggregation(fed: Federation,
                                                    clusters: dict[str, Cluster]) -> None:
    keys = fed.workdir / "keys"
    hub_signing = (keys / "hub" / "signing.pub").read_text().strip()
    plan = SitePlan("uclh", clusters["site-2"], 2, namespace="deeprad-training-uclh")
    fed.sites[plan.name] = plan
    # A long heartbeat timeout keeps uclh Ready after its agent stops, however slowly the
    # hub gets to admitting it: the round must see it drop out, not exclude it.
    add_site(fed, plan, keys, hub_signing, heartbeat_timeout="10m")
    fed.wait("HospitalSite uclh Ready", lambda: site_ready(fed, "uclh"))
    ns = f"dropout-{uuid.uuid4().hex[:6]}"
    fed.hub.kubectl("create", "namespace", ns)
    fed.agents["uclh"].stop()  # mid-round: the site is still Ready when the rounds start
    everyone = [*HOSPITALS, "uclh"]
    fed.hub.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump_all([
        _hand_round("quorum", everyone, 2), _hand_round("no-quorum", everyone, 3)]))

    def ended(name: str) -> dict[str, Any] | None:
        r = fed.get("federatedround", name, "-n", ns) or {}
        return r if (r.get("status") or {}).get("state") in ("Succeeded", "Failed") else None

    ok = fed.wait("round quorum to end", lambda: ended("quorum"), 420)
    bad = fed.wait("round no-quorum to end", lambda: ended("no-quorum"), 420)
    # Both ended before their deadline: a site missing from the exchange costs the hub's
    # first wait, and the round does not wait on for it once the aggregate exists.
    for r in (ok, bad):
        assert r["status"]["completionTime"] < r["status"]["deadlineTime"], \
            _round_report(fed, ns)
    sites = {s["site"]: s for s in ok["status"]["sites"]}
    assert ok["status"]["state"] == "Succeeded", _round_report(fed, ns)
    assert sites["uclh"]["state"] == "Dropped", sites["uclh"]
    assert sites["uclh"]["reason"] == "SecureAggregationDropout", sites["uclh"]
    assert {sites[h]["state"] for h in HOSPITALS} == {"Reported"}
    report = AggregateReport.model_validate(fed.store_json(
        StudyLayout(ns, "quorum", ok["metadata"]["uid"]).aggregate(1)))  # its own uid: by hand
    assert sorted(c.site for c in report.contributors) == sorted(HOSPITALS)
    assert report.secagg is not None and report.secagg.threshold == 2
    assert sorted(report.secagg.survivors) == sorted(HOSPITALS)
    assert report.secagg.not_joined + report.secagg.dropped == ["uclh"]
    # Below minSites the hub stops the exchange before any site reveals a share, and the
    # round fails at once with the aggregator's reason in one line.
    failed = condition(bad, "Failed")
    assert bad["status"]["state"] == "Failed" and failed["status"] == "True"
    assert failed["reason"] == "AggregationFailed", failed
    assert "2 of 3 site(s) advertised keys, minSites is 3 (missing: uclh)" in \
        failed["message"], failed
    assert "\n" not in failed["message"]
    unmask = StudyLayout(ns, "no-quorum", bad["metadata"]["uid"]).secagg_prefix(1) + "unmask/"
    revealed = list(fed.s3.client().list_objects(BUCKET, prefix=unmask, recursive=True))
    assert not revealed, "a site revealed unmasking shares in a round that failed"
    # The dropped site's work item was withdrawn when the rounds ended.
    fed.wait("uclh's tasks withdrawn", lambda: not list(
        items(fed, "sitetasks", "-n", "deeprad-site-uclh")), 60)


def test_fedadam_study_with_secure_aggregation(fed: Federation) -> None:
    """The issue's case: a plain `strategy: fedadam` study, secure aggregation on by default,
    trains at both hospitals and succeeds; the optimizer's state, built from the secure mean
    alone, travels between rounds in the hub-signed checkpoints."""
    ns = f"fedadam-{uuid.uuid4().hex[:6]}"
    study = yaml.safe_load((ROOT / "examples" / "federatedstudy-tumor-cnn.yaml").read_text())
    study["spec"]["rounds"] = 2
    study["spec"]["roundTemplate"]["strategy"] = {"name": "fedadam"}
    study["spec"]["roundTemplate"]["training"]["localEpochs"] = 1
    fed.hub.kubectl("create", "namespace", ns)
    fed.hub.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(study))
    done = _wait_study(fed, ns, "the FedAdam study to succeed")
    assert done["status"]["completedRounds"] == 2, _round_report(fed, ns)
    hub_keys = PublicIdentity.load(fed.workdir / "keys" / "hub-public")
    layout = StudyLayout(ns, STUDY, done["metadata"]["uid"])
    for r in _trained(sorted(items(fed, "federatedrounds", "-n", ns),
                             key=lambda r: r["spec"]["round"])):
        n, st = r["spec"]["round"], r["status"]
        assert st["state"] == "Succeeded", _round_report(fed, ns)
        assert {s["site"]: s["state"] for s in st["sites"]} == dict.fromkeys(HOSPITALS,
                                                                             "Reported")
        manifest = CheckpointManifest.model_validate(fed.store_json(layout.global_manifest(n)))
        verify_checkpoint_manifest(manifest, hub_keys, layout, n)
        assert manifest.strategy is not None and manifest.strategy.name == "fedadam"
        assert manifest.secagg is not None
        assert sorted(manifest.secagg.survivors) == sorted(HOSPITALS)


def _push_secret(name: str, kubeconfig: str, config: dict[str, Any] | None) -> dict[str, Any]:
    data = {"kubeconfig": kubeconfig}
    if config is not None:
        data["agent.yaml"] = yaml.safe_dump(config)
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": JOBS_NAMESPACE}, "stringData": data}


def test_push_mode_lab_cluster(fed: Federation, clusters: dict[str, Cluster]) -> None:
    """A lab cluster without an agent: the hub drives it with a kubeconfig Secret; one that
    would run an exec plugin is refused."""
    keys = fed.workdir / "keys"
    hub_signing = (keys / "hub" / "signing.pub").read_text().strip()
    lab = SitePlan("lab", clusters["site-1"], 3, namespace="deeprad-training-lab")
    fed.sites[lab.name] = lab
    kubeconfig = lab.cluster.kubeconfig.read_text()
    fed.hub.kubectl("apply", "-f", "-", input=json.dumps(
        _push_secret("lab-kubeconfig", kubeconfig, agent_config(lab, hub_signing, fed.s3))))
    ref = {"name": "lab-kubeconfig", "namespace": JOBS_NAMESPACE, "key": "kubeconfig"}
    register_site(fed, lab, keys, {"mode": "push", "kubeconfigSecretRef": ref,
                                   "heartbeatTimeout": "30s"})
    # A kubeconfig that would make the hub run a program is refused, and the site says why.
    evil = yaml.safe_load(kubeconfig)
    evil["users"][0]["user"] = {"exec": {"apiVersion": "client.authentication.k8s.io/v1",
                                         "command": "/bin/sh", "args": ["-c", "id"]}}
    fed.hub.kubectl("apply", "-f", "-", input=json.dumps(
        _push_secret("evil-kubeconfig", yaml.safe_dump(evil), None)))
    evil_site = SitePlan("evil-lab", clusters["site-2"], 0, namespace="deeprad-training-evil")
    register_site(fed, evil_site, keys, {"mode": "push", "kubeconfigSecretRef": {
        **ref, "name": "evil-kubeconfig"}, "heartbeatTimeout": "30s"})
    fed.wait("HospitalSite lab Ready", lambda: site_ready(fed, "lab"))
    refused = fed.wait("the exec kubeconfig refused", lambda: [
        e for e in items(fed, "events", "-A")
        if e["reason"] == "PushConfigInvalid" and e["involvedObject"]["name"] == "evil-lab"])
    assert "uses `exec`, which would run a program inside the hub" in refused[0]["message"]
    assert not site_ready(fed, "evil-lab")

    ns = f"push-{uuid.uuid4().hex[:6]}"
    fed.hub.kubectl("create", "namespace", ns)
    fed.hub.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(
        _hand_round("with-lab", ["lab", "st-marys"], 2)))
    done = fed.wait("round with-lab to end", lambda: (
        (r := fed.get("federatedround", "with-lab", "-n", ns) or {}).get("status", {})
        .get("state") in ("Succeeded", "Failed") and r), 300)
    assert done["status"]["state"] == "Succeeded", _round_report(fed, ns)
    job = fed.get("job", f"with-lab-{done['metadata']['uid'][:8]}", "-n", lab.namespace,
                  cluster=lab.cluster)
    assert job is not None and job["status"].get("succeeded") == 1


# ---- the privacy ledger -----------------------------------------------------------------------

DP_STUDY = "tumor-dp"


def _dp_status(fed: Federation, ns: str, name: str = DP_STUDY) -> dict[str, Any]:
    return dict(((fed.get("federatedstudy", name, "-n", ns) or {}).get("status")) or {})


def _ledger_keys(fed: Federation, ns: str, name: str) -> list[str]:
    return sorted(o.object_name for o in fed.s3.client().list_objects(
        BUCKET, prefix=f"{ns}/{name}/privacy-ledger/", recursive=True))


def _apply_dp(fed: Federation, ns: str, name: str = DP_STUDY,
              initial: dict[str, Any] | None = None) -> None:
    study = yaml.safe_load((ROOT / "examples" / "federatedstudy-tumor-dp.yaml").read_text())
    study["metadata"]["name"] = name
    if initial is not None:
        study["spec"]["initialCheckpoint"] = initial
    fed.hub.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(study))


def _settled(fed: Federation, ns: str, name: str, reason: str) -> dict[str, Any] | None:
    st = _dp_status(fed, ns, name)
    succeeded = next((c for c in st.get("conditions") or () if c["type"] == "Succeeded"), {})
    return st if succeeded.get("reason") == reason else None


def test_ledger_dp_study_spends_its_budget_and_no_edit_lowers_it(fed: Federation) -> None:
    """The example DP study (noise calibrated by the operator) spends at most its budget; then
    each way a study author could try to get its ε back — delete a round, raise a site's
    sampleCount, start a new study from its checkpoint, re-create it — leaves ε where it is,
    and a study that inherits it cannot train further."""
    ns = f"dp-{uuid.uuid4().hex[:6]}"
    fed.hub.kubectl("create", "namespace", ns)
    _apply_dp(fed, ns)
    study = fed.wait("the DP study to finish", lambda: _settled(
        fed, ns, DP_STUDY, "RoundsCompleted") or _settled(fed, ns, DP_STUDY,
                                                            "PrivacyBudgetExhausted"),
        STUDY_TIMEOUT)
    spent, privacy = study["epsilonSpent"], study["privacy"]
    assert 4.0 <= spent <= 8.0, study  # calibrated to spend the budget (ε = 8) over 3 rounds
    assert privacy["calibrated"] is True and privacy["noiseMultiplier"] > 0
    rounds = study["completedRounds"]
    assert rounds == 3, study
    assert {s["site"]: s["runs"] for s in privacy["sites"]} == dict.fromkeys(HOSPITALS, rounds)
    # The final evaluation round carries the training rounds' settings (the sites' policies
    # judge it as training) and spends nothing.
    round_z = {r["spec"]["privacy"]["differentialPrivacy"]["noiseMultiplier"]
               for r in items(fed, "federatedrounds", "-n", ns)}
    assert round_z == {privacy["noiseMultiplier"]}
    # The facts: one hub-signed entry per site record, each verified against the site's key.
    everything = _ledger_keys(fed, ns, DP_STUDY)
    keys = [k for k in everything if k.split("/")[3] in HOSPITALS]
    assert len(keys) == 2 * rounds, everything
    # beside them: the pinned δ and accountant, and one settled plan per round
    pin = fed.store_json(f"{ns}/{DP_STUDY}/privacy-ledger/budget.json")
    assert (pin["delta"], pin["accountant"]) == (1e-5, "rdp")
    plans = [fed.store_json(k) for k in everything if "/_reservations/" in k]
    assert len(plans) == rounds and all(p["settled"] for p in plans), plans
    assert len(everything) == len(keys) + 1 + rounds, everything
    entries = [fed.store_json(k) for k in keys]
    assert all(e["site_signature_verified"] for e in entries), entries[0]
    assert {e["max_grad_norm"] for e in entries} == {1.5}  # the example's clip, as signed

    # 1 and 2. Declare ten times the records at a site (a smaller sampling rate, less ε per
    # step), then delete a round: the pass that re-derives the status with one round fewer
    # (completedRounds) comes after both edits, and ε stays.
    site = fed.get("hospitalsite", "charite") or {}
    declared = site["spec"]["data"]["sampleCount"]
    fed.hub.kubectl("patch", "hospitalsite", "charite", "--type", "merge", "-p",
                    json.dumps({"spec": {"data": {"sampleCount": declared * 10}}}))
    try:
        fed.hub.kubectl("delete", "federatedround", f"{DP_STUDY}-r1", "-n", ns)
        after = fed.wait("the study to see the deleted round",
                         lambda: (st := _dp_status(fed, ns)).get("completedRounds") ==
                         rounds - 1 and st, 120)
        assert after["epsilonSpent"] == pytest.approx(spent), after
    finally:
        fed.hub.kubectl("patch", "hospitalsite", "charite", "--type", "merge", "-p",
                        json.dumps({"spec": {"data": {"sampleCount": declared}}}))

    # 3. A new study from its final checkpoint inherits its ε and cannot train on.
    checkpoint = study["latestCheckpoint"]
    _apply_dp(fed, ns, "tumor-dp-continued", initial=checkpoint)
    heir = fed.wait("the continued study to stop", lambda: _settled(
        fed, ns, "tumor-dp-continued", "PrivacyBudgetExhausted"), 120)
    assert heir["epsilonSpent"] >= spent - 1e-9 and heir["privacy"]["inheritedFrom"] == [
        f"{ns}/{DP_STUDY}"], heir
    assert not [r for r in items(fed, "federatedrounds", "-n", ns)
                if r["spec"].get("studyRef", {}).get("name") == "tumor-dp-continued"]

    # 4. Delete and re-create the study: the new one starts where the old one ended.
    fed.hub.kubectl("delete", "federatedstudy", DP_STUDY, "-n", ns, "--wait=true")
    _apply_dp(fed, ns)
    reborn = fed.wait("the re-created study to stop", lambda: _settled(
        fed, ns, DP_STUDY, "PrivacyBudgetExhausted"), 120)
    assert reborn["epsilonSpent"] >= spent - 1e-9, reborn
    assert reborn.get("completedRounds", 0) == 0
    assert "before round 1" in condition({"status": reborn}, "Succeeded")["message"]
