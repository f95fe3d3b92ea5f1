"""The hub operator against a real control plane: it reserves each HospitalSite's namespace
and RBAC (and nothing more), tracks the agent's heartbeat, drives a FederatedStudy round after
round, and survives kill -9 without duplicating anything."""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from deeprad_processes import OperatorProcess, wait
from redteam import refused

from deeprad.devenv.cluster import Cluster

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PLURALS = ("hospitalsites", "federatedstudies", "federatedrounds", "sitetasks")
SITES = ("st-marys", "charite")
AGENT = "deeprad-agent"
STUDY = "tumor-detection"


def _wait(what: str, check: Callable[[], Any], timeout: float = 60.0,
          operator: OperatorProcess | None = None) -> Any:
    return wait(what, check, timeout, operator)


def _get(hub: Cluster, *args: str) -> dict[str, Any] | None:
    out = hub.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


@pytest.fixture(scope="module")
def hub(hub_cluster: Cluster) -> Cluster:
    """The hub with the CRDs Established and the example HospitalSites applied."""
    hub_cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    hub_cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                        *(f"crd/{p}.deeprad.io" for p in PLURALS))
    hub_cluster.kubectl("apply", *(a for s in SITES for a in
                                   ("-f", str(ROOT / "examples" / f"hospitalsite-{s}.yaml"))))
    return hub_cluster


@pytest.fixture(scope="module")
def operator(hub: Cluster, tmp_path_factory: pytest.TempPathFactory, owner_token: str
             ) -> Iterator[OperatorProcess]:
    """A running hub operator, always stopped at the end (also on failure)."""
    op = OperatorProcess("hub-operator", "hub", [
        "--kubeconfig", str(hub.kubeconfig), "--site-interval", "1", "--study-interval", "1"],
        tmp_path_factory.mktemp("hub-operator"), owner_token)
    try:
        yield op.start()
    finally:
        op.stop()


def _can(hub: Cluster, site: str, *args: str) -> bool:
    who = f"--as=system:serviceaccount:deeprad-site-{site}:{AGENT}"
    out = hub.kubectl("auth", "can-i", who, *args, check=False)
    assert out.stdout.strip() in ("yes", "no"), out.stderr
    return out.stdout.strip() == "yes"


def _condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or ():
        if c["type"] == type_:
            return dict(c)
    return {}


def test_sites_get_a_restricted_namespace_and_least_privilege_rbac(
        hub: Cluster, operator: OperatorProcess) -> None:
    for site in SITES:
        ns = _wait(f"namespace deeprad-site-{site}",
                   lambda s=site: _get(hub, "namespace", f"deeprad-site-{s}"), operator=operator)
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        assert ns["metadata"]["ownerReferences"][0]["kind"] == "HospitalSite"
        for kind in ("serviceaccount", "role", "rolebinding", "lease"):
            _wait(f"{kind} {AGENT} in deeprad-site-{site}",
                  lambda k=kind, s=site: _get(hub, k, AGENT, "-n", f"deeprad-site-{s}"),
                  operator=operator)
    own, other = "-n=deeprad-site-st-marys", "-n=deeprad-site-charite"
    allowed = [("get", "sitetasks.deeprad.io", own), ("list", "sitetasks.deeprad.io", own),
               ("watch", "sitetasks.deeprad.io", own),
               ("patch", "sitetasks.deeprad.io", "--subresource=status", own),
               ("get", f"leases.coordination.k8s.io/{AGENT}", own),
               ("update", f"leases.coordination.k8s.io/{AGENT}", own)]
    denied = [("create", "sitetasks.deeprad.io", own), ("delete", "sitetasks.deeprad.io", own),
              ("update", "sitetasks.deeprad.io", own), ("patch", "sitetasks.deeprad.io", own),
              ("get", "sitetasks.deeprad.io", other),
              ("patch", "sitetasks.deeprad.io", "--subresource=status", other),
              ("create", "leases.coordination.k8s.io", own),
              ("update", "leases.coordination.k8s.io/someone-else", own),
              ("update", f"leases.coordination.k8s.io/{AGENT}", other),
              ("get", "secrets", own), ("create", "pods", own), ("list", "hospitalsites"),
              ("list", "federatedrounds.deeprad.io", "-A"), ("get", "namespaces")]
    for args in allowed:
        assert _can(hub, "st-marys", *args), f"the st-marys agent should be able to {args}"
    for args in denied:
        assert not _can(hub, "st-marys", *args), f"the st-marys agent must not {args}"


def test_reachable_and_ready_follow_the_agents_lease(hub: Cluster,
                                                     operator: OperatorProcess) -> None:
    site = _wait("st-marys Reachable=False", lambda: (
        s := _get(hub, "hospitalsite", "st-marys")) and
        _condition(s, "Reachable").get("status") == "False" and s, operator=operator)
    assert _condition(site, "Reachable")["reason"] == "NoHeartbeat"
    assert _condition(site, "Ready")["status"] == "False"
    # charite is push-mode and its kubeconfig Secret does not exist: the hub says so.
    push = _wait("charite (push) Reachable=False", lambda: (
        s := _get(hub, "hospitalsite", "charite")) and
        _condition(s, "Reachable").get("status") == "False" and s, operator=operator)
    assert "Secret deeprad-system/charite-kubeconfig" in _condition(push, "Reachable")["message"]
    events = _wait("a PushConfigInvalid event", lambda: [
        e for e in (_get(hub, "events", "-A") or {}).get("items", ())
        if e["reason"] == "PushConfigInvalid"], operator=operator)
    assert "cannot read Secret deeprad-system/charite-kubeconfig" in events[0]["message"]
    # The agent renews its Lease with its own identity (update only: no patch, no create).
    lease = _get(hub, "lease", AGENT, "-n", "deeprad-site-st-marys")
    assert lease is not None
    lease["spec"] = {"holderIdentity": "st-marys-agent", "leaseDurationSeconds": 120,
                     "renewTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
    lease["metadata"]["annotations"] = {
        "deeprad.io/agent-version": "0.1.0",
        "deeprad.io/observed-gpus": json.dumps({"resourceName": "nvidia.com/gpu",
                                                "capacity": 2, "allocatable": 2, "nodes": 1})}
    hub.kubectl("replace", "--as=system:serviceaccount:deeprad-site-st-marys:deeprad-agent",
                "-f", "-", input=json.dumps(lease))
    site = _wait("st-marys Ready=True", lambda: (
        s := _get(hub, "hospitalsite", "st-marys")) and
        _condition(s, "Ready").get("status") == "True" and s, operator=operator)
    assert _condition(site, "Reachable")["reason"] == "HeartbeatRecent"
    assert site["status"]["agentVersion"] == "0.1.0"
    assert site["status"]["observedGpus"]["allocatable"] == 2
    assert "deeprad_site_ready" in operator.metrics()


def _rounds(hub: Cluster, ns: str) -> list[dict[str, Any]]:
    out = _get(hub, "federatedrounds", "-n", ns)
    return list((out or {}).get("items") or [])


def _finish(hub: Cluster, ns: str, name: str, auroc: float, n: int) -> None:
    status = {"status": {"state": "Succeeded", "aggregateMetrics": {"auroc": auroc},
                         "outputCheckpoint": {
                             "uri": f"s3://deeprad/{ns}/{STUDY}/rounds/{n}/global.safetensors",
                             "digest": f"{n:064x}", "round": n}}}
    hub.kubectl("patch", "federatedround", name, "-n", ns, "--subresource=status",
                "--type=merge", "-p", json.dumps(status))


def test_study_creates_rounds_in_sequence_and_survives_kill_9(
        hub: Cluster, operator: OperatorProcess) -> None:
    ns = f"research-{uuid.uuid4().hex[:6]}"
    hub.kubectl("create", "namespace", ns)
    hub.kubectl("apply", "-n", ns, "-f", str(ROOT / "examples" / "federatedstudy-tumor-cnn.yaml"))
    # This test finishes training rounds by hand; the final evaluation round that follows them
    # runs real trainers (tests/e2e/test_operator_study.py), so it is off here.
    hub.kubectl("patch", "federatedstudy", STUDY, "-n", ns, "--type=merge",
                "-p", json.dumps({"spec": {"finalEvaluation": False}}))
    study = _get(hub, "federatedstudy", STUDY, "-n", ns)
    assert study is not None
    # The example sites serve namespace research only: the study waits and says why, until
    # their admin adds this namespace.
    waiting = _wait("study blocked: the sites do not serve its namespace", lambda: (
        c := _condition(_get(hub, "federatedstudy", STUDY, "-n", ns), "Progressing")) and
        c.get("reason") == "NotEnoughSites" and c, operator=operator)
    assert (f"charite, st-marys match but do not allow namespace {ns}: add it to their "
            "spec.studyNamespaces") in waiting["message"]
    assert _rounds(hub, ns) == []
    for site in SITES:
        hub.kubectl("patch", "hospitalsite", site, "--type=json", "-p", json.dumps(
            [{"op": "add", "path": "/spec/studyNamespaces/-", "value": ns}]))
    r1 = _wait(f"FederatedRound {STUDY}-r1", lambda: _get(
        hub, "federatedround", f"{STUDY}-r1", "-n", ns), operator=operator)
    (owner,) = r1["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "FederatedStudy", STUDY, study["metadata"]["uid"], True)
    assert r1["spec"]["round"] == 1 and r1["spec"]["studyRef"] == {"name": STUDY}
    assert r1["spec"]["sites"] == ["charite", "st-marys"]  # the selector, resolved
    assert r1["spec"]["minSites"] == 2 and "inputCheckpoint" not in r1["spec"]
    _wait("study status Running, round 1", lambda: (
        (s := _get(hub, "federatedstudy", STUDY, "-n", ns)) and
        s.get("status", {}).get("state") == "Running" and
        s["status"].get("currentRound") == 1), operator=operator)

    # kill -9 mid-study and restart: the same objects, nothing duplicated.
    operator.kill9()
    operator.start()
    time.sleep(4)  # several study and site passes
    assert [r["metadata"]["name"] for r in _rounds(hub, ns)] == [f"{STUDY}-r1"]
    for site in SITES:
        for kind in ("roles", "rolebindings", "serviceaccounts", "leases"):
            items = (_get(hub, kind, "-n", f"deeprad-site-{site}", "-l",
                          "app.kubernetes.io/managed-by=deeprad-operator") or {})["items"]
            assert [i["metadata"]["name"] for i in items] == [AGENT], (kind, site)

    # Round 1 succeeds: round 2 starts from its checkpoint; reaching the target ends the study.
    _finish(hub, ns, f"{STUDY}-r1", 0.81, 1)
    r2 = _wait(f"FederatedRound {STUDY}-r2", lambda: _get(
        hub, "federatedround", f"{STUDY}-r2", "-n", ns), operator=operator)
    assert r2["spec"]["inputCheckpoint"]["uri"].endswith("/rounds/1/global.safetensors")
    assert r2["spec"]["inputCheckpoint"]["round"] == 1
    _finish(hub, ns, f"{STUDY}-r2", 0.975, 2)
    done = _wait("study Succeeded", lambda: (
        (s := _get(hub, "federatedstudy", STUDY, "-n", ns)) and
        s.get("status", {}).get("state") == "Succeeded" and s), operator=operator)
    assert _condition(done, "Succeeded")["reason"] == "TargetReached"
    assert done["status"]["bestMetric"] == {"name": "auroc", "value": 0.975, "round": 2}
    assert done["status"]["completedRounds"] == 2
    time.sleep(2)
    assert len(_rounds(hub, ns)) == 2
    events = _get(hub, "events", "-n", ns, "--field-selector",
                  f"involvedObject.name={STUDY}") or {}
    reasons = {e["reason"] for e in events.get("items", ())}
    assert {"RoundCreated", "TargetReached"} <= reasons
    text = operator.metrics()
    assert f'deeprad_study_rounds_completed{{namespace="{ns}",study="{STUDY}"}} 2.0' in text


def test_redteam_push_kubeconfig_naming_a_hub_file_is_refused_before_it_is_read(
        hub: Cluster, operator: OperatorProcess, tmp_path: Path) -> None:
    """A push Secret whose kubeconfig has the hub read a token from a file of its own
    (`tokenFile`, e.g. its ServiceAccount token) and send it to a server of the Secret author's
    choosing. The hub refuses it with a PushConfigInvalid Event naming the field and the fix;
    the file is never opened (a FIFO: the hub's open() would still be waiting for a writer),
    the server it names is never contacted, and the site's agent never starts."""
    site, secret = "evil-files", "evil-files-kubeconfig"
    token = tmp_path / "token"
    os.mkfifo(token)
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    kubeconfig = {
        "apiVersion": "v1", "kind": "Config", "current-context": "lab",
        "clusters": [{"name": "lab", "cluster": {
            "server": f"https://127.0.0.1:{server.getsockname()[1]}",
            "certificate-authority-data": base64.b64encode(b"not a CA").decode()}}],
        "users": [{"name": "lab", "user": {"tokenFile": str(token)}}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "lab"}}]}
    example = yaml.safe_load((ROOT / "examples" / "hospitalsite-charite.yaml").read_text())
    example["metadata"] = {"name": site}  # no labels: no study selects it
    example["spec"]["connection"]["kubeconfigSecretRef"]["name"] = secret
    hub.kubectl("create", "namespace", "deeprad-system", check=False)
    try:
        hub.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": secret, "namespace": "deeprad-system"},
            "stringData": {"kubeconfig": yaml.safe_dump(kubeconfig)}}))
        hub.kubectl("apply", "-f", "-", input=json.dumps(example))
        events = _wait("a PushConfigInvalid event for evil-files", lambda: [
            e for e in (_get(hub, "events", "-A") or {}).get("items", ())
            if e["reason"] == "PushConfigInvalid" and e["involvedObject"]["name"] == site],
            operator=operator)
        message = events[0]["message"]
        assert message == (
            f"HospitalSite {site}: the push kubeconfig's user 'lab' names a file in "
            f"`tokenFile` ('{token}'), which the hub would read from its own disk and present "
            "to the server; put the content inline in `token` instead")
        assert events[0]["type"] == "Warning"
        # Nobody holds the FIFO open for reading, nor waits to: a writer finds no reader.
        with pytest.raises(OSError) as probe:
            os.close(os.open(token, os.O_WRONLY | os.O_NONBLOCK))
        assert probe.value.errno == errno.ENXIO, "the hub opened the token file"
        with pytest.raises(BlockingIOError):  # nothing ever connected to the named server
            server.accept()
        # The agent never ran: its Lease was never renewed, and the site says where to look.
        lease = _wait("the site's Lease", lambda: _get(
            hub, "lease", AGENT, "-n", f"deeprad-site-{site}"), operator=operator)
        assert not (lease.get("spec") or {}).get("renewTime")
        reachable = _condition(_wait("evil-files Reachable=False", lambda: (
            s := _get(hub, "hospitalsite", site)) and _condition(s, "Reachable") and s,
            operator=operator), "Reachable")
        assert reachable["status"] == "False" and reachable["reason"] == "NoHeartbeat"
        assert "see this site's Events" in reachable["message"]
        refused("push kubeconfig tokenFile naming a hub file (real hub)",
                "hub operator: push daemon Event", message)
    finally:
        with contextlib.suppress(OSError):  # release a reader, were one waiting
            os.close(os.open(token, os.O_WRONLY | os.O_NONBLOCK))
        server.close()
        hub.kubectl("delete", "hospitalsite", site, "--ignore-not-found", "--wait=false")
        hub.kubectl("delete", "secret", secret, "-n", "deeprad-system", "--ignore-not-found")
