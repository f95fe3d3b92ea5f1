"""Lifecycles against a real control plane: with the hub operator stopped, rounds, studies and
sites still delete (no finalizer holds them); an older operator's finalizer is taken off; the
SiteTasks of ended rounds and of rounds deleted while the operator was down are collected; a
site's participation is counted from the rounds' status."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from deeprad_processes import OperatorProcess, wait

from deeprad.devenv.cluster import Cluster

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
API = "deeprad.io/v1alpha1"
PLURALS = ("hospitalsites", "federatedstudies", "federatedrounds", "sitetasks")
KEY_A = "Psy2mQcyA7EZmI3zzfHv9PHBlyb1GNO4M644weEL8yQ="
KEY_B = "W7OAMzybUo+M6JmOq0mD4nXn2J9bn3UDcx1ivMUULBI="
OLD_FINALIZER = "deeprad.io/finalizer"


@pytest.fixture(scope="module")
def hub(hub_cluster: Cluster) -> Cluster:
    hub_cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    hub_cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                        *(f"crd/{p}.deeprad.io" for p in PLURALS))
    return hub_cluster


@pytest.fixture
def operator(hub: Cluster, tmp_path: Path, owner_token: str) -> Iterator[OperatorProcess]:
    """A hub operator without a store (rounds wait with HubNotConfigured), sweeping often."""
    op = OperatorProcess("hub-operator", "hub", [
        "--kubeconfig", str(hub.kubeconfig), "--site-interval", "1", "--study-interval", "1",
        "--round-interval", "1", "--sweep-interval", "1", "--task-history", "2"],
        tmp_path / "operator", owner_token)
    try:
        yield op.start()
    finally:
        op.stop()


@pytest.fixture
def ns(hub: Cluster) -> Iterator[str]:
    name = f"lifecycle-{uuid.uuid4().hex[:6]}"
    hub.kubectl("create", "namespace", name)
    yield name
    hub.kubectl("delete", "namespace", name, "--wait=false")


def _get(hub: Cluster, *args: str) -> dict[str, Any] | None:
    out = hub.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def _apply(hub: Cluster, manifest: dict[str, Any]) -> None:
    hub.kubectl("create", "-f", "-", input=json.dumps(manifest))


def _site(name: str) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "HospitalSite", "metadata": {"name": name},
            "spec": {"identity": {"signingKey": KEY_A, "keyAgreementKey": KEY_B}}}


def _round(name: str, ns: str, finalizers: list[str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if finalizers:
        meta["finalizers"] = finalizers
    return {"apiVersion": API, "kind": "FederatedRound", "metadata": meta,
            "spec": {"round": 1, "model": {"name": "tumor-cnn"}, "minSites": 1,
                     "privacy": {"secureAggregation": False}}}


def _task(name: str, site: str, round_: dict[str, Any]) -> dict[str, Any]:
    """A SiteTask as the operator writes one (the hub runs without a store here)."""
    meta = round_["metadata"]
    url = "https://s3.example.org/deeprad/ns/study/s-uid/rounds/1/"
    return {"apiVersion": API, "kind": "SiteTask",
            "metadata": {"name": name, "namespace": f"deeprad-site-{site}"}, "spec": {
                "roundRef": {"namespace": meta["namespace"], "name": meta["name"],
                             "uid": meta["uid"]},
                "study": meta["name"], "studyUid": meta["uid"], "round": 1, "site": site,
                "model": {"name": "tumor-cnn"}, "parentDigest": "0" * 64,
                "hub": {"name": "hub", "signingKey": KEY_A, "keyAgreementKey": KEY_B},
                "objects": [{"key": "ns/study/s-uid/rounds/1/updates/a.bin", "method": "PUT",
                             "url": url + "updates/a.bin"}],
                "deadline": "2030-01-01T00:00:00Z"}}


def _condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or ():
        if c["type"] == type_:
            return dict(c)
    return {}


def test_rounds_studies_and_sites_delete_with_the_operator_stopped(
        hub: Cluster, operator: OperatorProcess, ns: str) -> None:
    site = f"lc-{uuid.uuid4().hex[:6]}"
    _apply(hub, _site(site))
    hub.kubectl("apply", "-n", ns, "-f", str(ROOT / "examples" / "federatedstudy-tumor-cnn.yaml"))
    _apply(hub, _round("by-hand", ns))
    # What an older operator left: its finalizer on a round; nothing needs it any more.
    _apply(hub, _round("from-before", ns, [OLD_FINALIZER]))
    handled = {
        ("hospitalsite", site): lambda o: _condition(o, "Reachable"),
        ("federatedstudy", "tumor-detection"): lambda o: _condition(o, "Progressing"),
        ("federatedround", "by-hand"): lambda o: _condition(o, "SitesScheduled"),
        ("federatedround", "from-before"): lambda o: _condition(o, "SitesScheduled"),
    }
    for (kind, name), seen in handled.items():
        where = () if kind == "hospitalsite" else ("-n", ns)
        obj = wait(f"the operator's status on {kind} {name}, no finalizer",
                   lambda k=kind, n=name, w=where, s=seen: (o := _get(hub, k, n, *w)) and s(o)
                   and not o["metadata"].get("finalizers") and o, 60, operator)
        assert not obj["metadata"].get("finalizers"), (kind, name)
    operator.stop()
    for kind, name in handled:
        where = () if kind == "hospitalsite" else ("-n", ns)
        out = hub.kubectl("delete", kind, name, *where, "--timeout=20s", check=False)
        assert out.returncode == 0, f"{kind} {name} did not delete: {out.stderr}"
        assert _get(hub, kind, name, *where) is None


def test_site_tasks_of_ended_and_deleted_rounds_are_collected(
        hub: Cluster, operator: OperatorProcess, ns: str) -> None:
    site = f"lc-{uuid.uuid4().hex[:6]}"
    _apply(hub, _site(site))
    wait(f"namespace deeprad-site-{site}",
         lambda: _get(hub, "namespace", f"deeprad-site-{site}"), 60, operator)
    rounds = {}
    for name in ("ended", "running", "doomed"):
        _apply(hub, _round(name, ns))
        rounds[name] = _get(hub, "federatedround", name, "-n", ns)
        _apply(hub, _task(f"{name}-task", site, rounds[name]))
    # Round "ended" succeeded with the site's report in it; "running" goes on.
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    hub.kubectl("patch", "federatedround", "ended", "-n", ns, "--subresource=status",
                "--type=merge", "-p", json.dumps({"status": {
                    "state": "Succeeded", "completionTime": now,
                    "sites": [{"site": site, "state": "Reported", "reportTime": now}]}}))
    tasks = f"deeprad-site-{site}"
    wait("the ended round's SiteTask collected after its history", lambda: _get(
        hub, "sitetask", "ended-task", "-n", tasks) is None, 60, operator)
    participation = wait("the site's participation", lambda: (
        p := ((_get(hub, "hospitalsite", site) or {}).get("status") or {}).get(
            "participation")) and p.get("roundsJoined") and p, 60, operator)
    assert participation == {"studies": [f"{ns}/ended"], "roundsJoined": 1,
                             "roundsReported": 1, "roundsFailed": 0,
                             "lastContributionTime": now}
    # A round deleted while the operator is down: its SiteTask goes once the operator is back.
    operator.stop()
    hub.kubectl("delete", "federatedround", "doomed", "-n", ns, "--timeout=20s")
    assert _get(hub, "sitetask", "doomed-task", "-n", tasks) is not None
    operator.start()
    wait("the deleted round's SiteTask collected", lambda: _get(
        hub, "sitetask", "doomed-task", "-n", tasks) is None, 60, operator)
    assert _get(hub, "sitetask", "running-task", "-n", tasks) is not None
    # Deleting the ended round takes its participation away with it.
    hub.kubectl("delete", "federatedround", "ended", "-n", ns)
    wait("the site's participation counts no round", lambda: (
        (_get(hub, "hospitalsite", site) or {}).get("status") or {}).get("participation") == {
        "roundsJoined": 0, "roundsReported": 0, "roundsFailed": 0}, 60, operator)
