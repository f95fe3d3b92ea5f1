"""Tenant isolation against a real API server, a real S3 server and the hub operator: a study from
a namespace a site does not serve gets no work item there, another namespace's checkpoint needs
its owner's grant, and a study re-created under an old name starts from its own objects.

No site agent runs: the sites' heartbeats are renewed by hand (as the agent would), so rounds
are admitted and their SiteTasks created, which is as far as the hub goes without hospitals.
The prepare Jobs run for real on the hub's node agent."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml
from federation import BUCKET, JOBS_NAMESPACE, Federation, condition, items, start_hub
from redteam import refused

from deeprad.core.layout import StudyLayout
from deeprad.core.protocol import CheckpointManifest
from deeprad.devenv.cluster import Cluster
from deeprad.devenv.s3_server import S3Server

pytestmark = pytest.mark.integration

SITES = ("iso-a", "iso-b")
AGENT = "deeprad-agent"
SUFFIX = uuid.uuid4().hex[:6]
OWNER, INTRUDER, FRIEND = (f"{role}-{SUFFIX}" for role in ("owner", "intruder", "friend"))
STUDY = "tumor"
TIMEOUT = 240.0


def _deeprad(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "deeprad.cli", *args], capture_output=True,
                          text=True, check=True, cwd="/").stdout


def _heartbeat(fed: Federation, site: str) -> None:
    """What the site agent does: renew its Lease, reporting its version and GPUs."""
    ns = f"deeprad-site-{site}"
    lease = fed.wait(f"Lease {AGENT} in {ns}", lambda: fed.get("lease", AGENT, "-n", ns))
    lease["spec"] = {"holderIdentity": f"{site}-agent", "leaseDurationSeconds": 600,
                     "renewTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
    lease["metadata"]["annotations"] = {
        "deeprad.io/agent-version": "0.1.0",
        "deeprad.io/observed-gpus": json.dumps({"resourceName": "nvidia.com/gpu",
                                                "capacity": 1, "allocatable": 1, "nodes": 1})}
    fed.hub.kubectl("replace", f"--as=system:serviceaccount:{ns}:{AGENT}", "-f", "-",
                    input=json.dumps(lease))


def _ready(fed: Federation, site: str) -> bool:
    return condition(fed.get("hospitalsite", site), "Ready").get("status") == "True"


@pytest.fixture(scope="module")
def fed(hub_cluster: Cluster, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory,
        owner_token: str) -> Iterator[Federation]:
    """A hub running rounds against S3, and two Ready sites that serve namespace OWNER only,
    registered as the README says (`deeprad site register --study-namespace`)."""
    work = tmp_path_factory.mktemp("tenancy")
    federation = start_hub(hub_cluster, s3_server, work, owner_token)
    try:
        for ns in (OWNER, INTRUDER, FRIEND):
            federation.hub.kubectl("create", "namespace", ns)
        for site in SITES:
            _deeprad("keys", "generate", "--out", str(work / "keys" / site), "--name", site)
            docs = yaml.safe_load_all(_deeprad("site", "register", site, "--keys",
                                               str(work / "keys" / site),
                                               "--study-namespace", OWNER))
            hsite = next(d for d in docs if d["kind"] == "HospitalSite")
            assert hsite["spec"]["studyNamespaces"] == [OWNER]
            hsite["spec"]["data"] = {"modality": "mri", "sampleCount": 100}
            hsite["spec"]["connection"] = {"mode": "pull", "heartbeatTimeout": "30m"}
            hsite["spec"]["limits"] = {"maxConcurrentTasks": 8}
            federation.hub.kubectl("apply", "-f", "-", input=json.dumps(hsite))
        for site in SITES:
            _heartbeat(federation, site)
            federation.wait(f"HospitalSite {site} Ready", lambda s=site: _ready(federation, s))
        yield federation
    finally:
        federation.stop()
        hub_cluster.kubectl("delete", "namespace", OWNER, INTRUDER, FRIEND,
                            "--ignore-not-found", "--wait=false")
        hub_cluster.kubectl("delete", "hospitalsite", *SITES, "--ignore-not-found",
                            "--wait=false")


def _hand_round(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "deeprad.io/v1alpha1", "kind": "FederatedRound",
            "metadata": {"name": name},
            "spec": {"round": 1, "model": {"name": "tumor-cnn"}, "sites": list(SITES),
                     "minSites": 1, "deadline": "10m", "training": {"localEpochs": 1},
                     "privacy": {"secureAggregation": False}, **spec}}


def _study(seed: int) -> dict[str, Any]:
    return {"apiVersion": "deeprad.io/v1alpha1", "kind": "FederatedStudy",
            "metadata": {"name": STUDY},
            "spec": {"model": {"name": "tumor-cnn"}, "sites": list(SITES), "rounds": 1,
                     "shareCheckpointsWith": [FRIEND],
                     "roundTemplate": {"minSites": 2, "deadline": "10m",
                                       "training": {"localEpochs": 1, "seed": seed},
                                       "privacy": {"secureAggregation": False}}}}


def _apply(fed: Federation, ns: str, manifest: dict[str, Any]) -> dict[str, Any]:
    fed.hub.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(manifest))
    obj = fed.get(manifest["kind"].lower(), manifest["metadata"]["name"], "-n", ns)
    assert obj is not None
    return obj


def _ended(fed: Federation, ns: str, name: str) -> dict[str, Any] | None:
    r = fed.get("federatedround", name, "-n", ns) or {}
    return r if (r.get("status") or {}).get("state") in ("Succeeded", "Failed") else None


def _tasks(fed: Federation, round_namespace: str) -> list[dict[str, Any]]:
    """Every SiteTask of rounds in `round_namespace`, in every site's hub namespace."""
    return [t for site in SITES for t in items(
        fed, "sitetasks", "-n", f"deeprad-site-{site}", "-l",
        f"deeprad.io/round-namespace={round_namespace}")]


def _keys(fed: Federation, prefix: str) -> list[str]:
    return sorted(o.object_name for o in fed.s3.client().list_objects(
        BUCKET, prefix=prefix, recursive=True))


def _manifest(fed: Federation, layout: StudyLayout, n: int) -> CheckpointManifest:
    return CheckpointManifest.model_validate(fed.store_json(layout.global_manifest(n)))


def _weights(fed: Federation, layout: StudyLayout) -> dict[str, list[float]]:
    """Round 0's tensors, as plain lists (the safetensors payload read from the real S3)."""
    from safetensors.torch import load

    data = fed.s3.client().get_object(BUCKET, layout.global_weights(0)).read()
    return {k: v.flatten().tolist() for k, v in load(data).items()}


def _job(fed: Federation, name: str) -> dict[str, Any] | None:
    return fed.get("job", name, "-n", JOBS_NAMESPACE)


def _message(obj: dict[str, Any] | None, type_: str) -> str:
    return str(condition(obj, type_).get("message", ""))


# ---- a site serves only the namespaces it lists ---------------------------------------------


def test_redteam_study_from_a_namespace_the_site_does_not_allow(fed: Federation) -> None:
    """A user of namespace INTRUDER points a study and a hand-made round at sites that serve
    only OWNER. The study waits, naming the site and the fix; the round excludes both sites
    with NamespaceNotAllowed and fails; no SiteTask exists for either, in any site namespace."""
    _apply(fed, INTRUDER, _study(seed=1))
    _apply(fed, INTRUDER, _hand_round("probe"))
    blocked = fed.wait("the intruder's study blocked", lambda: (
        c := condition(fed.get("federatedstudy", STUDY, "-n", INTRUDER), "Progressing"))
        .get("reason") == "NamespaceNotAllowed" and c, TIMEOUT)
    expected = (f"HospitalSite iso-a does not allow namespace {INTRUDER} (spec.studyNamespaces: "
                f"{OWNER}); add {INTRUDER} to HospitalSite iso-a spec.studyNamespaces")
    assert expected in blocked["message"]
    done = fed.wait("the intruder's round to end", lambda: _ended(fed, INTRUDER, "probe"),
                    TIMEOUT)
    by_site = {s["site"]: s for s in done["status"]["sites"]}
    assert {s: (e["state"], e["reason"]) for s, e in by_site.items()} == dict.fromkeys(
        SITES, ("Excluded", "NamespaceNotAllowed"))
    assert by_site["iso-a"]["message"] == expected
    assert done["status"]["state"] == "Failed"
    assert condition(done, "Failed")["reason"] == "InsufficientSites"
    # Nothing reached the sites: no work item, now or from the study, which made no round.
    assert _tasks(fed, INTRUDER) == []
    assert [r["metadata"]["name"] for r in items(fed, "federatedrounds", "-n", INTRUDER)] == \
        ["probe"]
    assert _keys(fed, f"{INTRUDER}/{STUDY}/") == []
    refused("study from a namespace the site does not allow (real hub)",
            "hub operator: study and round admission", by_site["iso-a"]["message"])


# ---- store keys carry the owner's uid ------------------------------------------------------


@dataclass(frozen=True)
class Incarnation:
    """One life of study OWNER/tumor: its uid, its round's work items and input digest."""

    uid: str
    layout: StudyLayout
    tasks: list[dict[str, Any]]
    parent: CheckpointManifest


def _run_until_tasks(fed: Federation, seed: int) -> Incarnation:
    """Apply the owner's study and wait until its round 1 has a SiteTask at every site."""
    study = _apply(fed, OWNER, _study(seed))
    uid = study["metadata"]["uid"]
    tasks = fed.wait(f"SiteTasks of {STUDY}-r1 (study uid {uid})", lambda: (
        t := [t for t in _tasks(fed, OWNER) if t["spec"]["studyUid"] == uid])
        and len(t) == len(SITES) and t, TIMEOUT)
    layout = StudyLayout(OWNER, STUDY, uid)
    return Incarnation(uid, layout, tasks, _manifest(fed, layout, 0))


@pytest.fixture(scope="module")
def incarnations(fed: Federation) -> tuple[Incarnation, Incarnation]:
    """The owner's study runs until its work items exist, is deleted, and is created again
    under the same name (another seed, so another initial model)."""
    first = _run_until_tasks(fed, seed=1)
    fed.hub.kubectl("delete", "federatedstudy", STUDY, "-n", OWNER, "--wait=true")
    fed.wait("the first study's round and work items gone", lambda: not list(
        items(fed, "federatedrounds", "-n", OWNER)) and not _tasks(fed, OWNER), TIMEOUT)
    return first, _run_until_tasks(fed, seed=2)


def test_redteam_recreated_study_does_not_read_the_old_studys_objects(
        fed: Federation, incarnations: tuple[Incarnation, Incarnation]) -> None:
    """Before keys carried the uid, a study re-created under an old name found the old round 0
    (and every later object) in the store and trained from it. Now its prepare Job writes its
    own round 0, its work items grant only keys of the new uid, and the old objects stay as
    they were."""
    old, new = incarnations
    assert new.uid != old.uid
    new_round = fed.get("federatedround", f"{STUDY}-r1", "-n", OWNER)
    assert new_round is not None
    # Its own prepare Job wrote its round 0 (the Job may still be finishing: its pod wrote the
    # checkpoint, which is what let the round go on).
    assert _job(fed, f"{STUDY}-r1-{new_round['metadata']['uid'][:8]}-prepare") is not None
    assert new.parent.producer.startswith("deeprad-prepare/")
    # Each incarnation started from its own model, and its sites were told that digest.
    assert new.parent.payload_sha256 != old.parent.payload_sha256
    assert {t["spec"]["parentDigest"] for t in new.tasks} == {new.parent.payload_sha256}
    assert {t["spec"]["parentDigest"] for t in old.tasks} == {old.parent.payload_sha256}
    granted = [o["key"] for t in new.tasks for o in t["spec"]["objects"]]
    assert granted and all(k.startswith(f"{OWNER}/{STUDY}/{new.uid}/") for k in granted)
    assert not any(old.uid in k for k in granted)
    # The old objects are untouched, and nothing lives under the uid-less prefix.
    assert _manifest(fed, old.layout, 0) == old.parent
    assert [k for k in _keys(fed, f"{OWNER}/{STUDY}/") if not k.startswith(
        (f"{OWNER}/{STUDY}/{old.uid}/", f"{OWNER}/{STUDY}/{new.uid}/"))] == []
    refused("re-created study reading its predecessor's objects (real hub, real S3)",
            "store keys <namespace>/<study>/<uid>/",
            f"FederatedStudy {OWNER}/{STUDY} uid {new.uid[:8]} starts from its own round 0 "
            f"({new.parent.payload_sha256[:12]}), not uid {old.uid[:8]}'s "
            f"({old.parent.payload_sha256[:12]})")


# ---- another namespace's checkpoints --------------------------------------------------------


def _uri(layout: StudyLayout) -> str:
    return f"s3://{BUCKET}/{layout.global_weights(0)}"


def test_redteam_cross_namespace_input_checkpoint_without_a_grant(
        fed: Federation, incarnations: tuple[Incarnation, Incarnation]) -> None:
    """INTRUDER names the owner's checkpoint as its round's input: refused before any prepare
    Job exists, nothing written under its name. FRIEND, whom the current study shares with,
    imports it; but not the checkpoint of the study's deleted predecessor."""
    old, new = incarnations
    steal = _apply(fed, INTRUDER, _hand_round("steal", inputCheckpoint={"uri": _uri(new.layout)}))
    done = fed.wait("round steal to fail", lambda: _ended(fed, INTRUDER, "steal"), TIMEOUT)
    failed = condition(done, "Failed")
    assert (done["status"]["state"], failed["reason"]) == ("Failed", "InvalidInputCheckpoint")
    assert failed["message"] == (
        f"FederatedRound steal: spec.inputCheckpoint: {_uri(new.layout)} is in namespace "
        f"{OWNER}, not this round's namespace {INTRUDER}, and FederatedStudy {OWNER}/{STUDY} "
        f"does not share its checkpoints with {INTRUDER}; ask its owner to add {INTRUDER} to "
        f"FederatedStudy {OWNER}/{STUDY} spec.shareCheckpointsWith")
    assert _job(fed, f"steal-{steal['metadata']['uid'][:8]}-prepare") is None
    assert _keys(fed, f"{INTRUDER}/steal/") == [] and _tasks(fed, INTRUDER) == []
    refused("cross-namespace spec.inputCheckpoint without a grant (real hub, real S3)",
            "hub operator: round input check (no prepare Job)", failed["message"])

    # The grant covers the current study only: its predecessor's checkpoint stays unshared.
    stale = _apply(fed, FRIEND, _hand_round("stale", inputCheckpoint={"uri": _uri(old.layout)}))
    gone = fed.wait("round stale to fail", lambda: _ended(fed, FRIEND, "stale"), TIMEOUT)
    assert condition(gone, "Failed")["reason"] == "InvalidInputCheckpoint"
    assert f"belongs to an earlier object named {STUDY} (uid {old.uid})" in _message(
        gone, "Failed")
    assert _job(fed, f"stale-{stale['metadata']['uid'][:8]}-prepare") is None

    # A namespace the owner shares with imports the checkpoint, re-signed for its round. A
    # round prepares its input once admitted: the sites now serve FRIEND too, with room for
    # its round beside the owner's unfinished ones (no agent runs here).
    for site in SITES:
        fed.hub.kubectl("patch", "hospitalsite", site, "--type", "merge", "-p", json.dumps(
            {"spec": {"studyNamespaces": [OWNER, FRIEND], "limits": {"maxConcurrentTasks": 10}}}))
    borrow = _apply(fed, FRIEND, _hand_round("borrow", inputCheckpoint={
        "uri": _uri(new.layout), "digest": new.parent.payload_sha256}))
    mine = StudyLayout(FRIEND, "borrow", borrow["metadata"]["uid"])
    imported = fed.wait("the shared checkpoint imported", lambda: _keys(
        fed, mine.global_manifest(0)) and _manifest(fed, mine, 0), TIMEOUT)
    assert imported.parent_sha256 == new.parent.payload_sha256
    # The same weights, in a payload of its own (the importing round's uid is signed into it).
    assert imported.payload_sha256 != new.parent.payload_sha256
    assert _weights(fed, mine) == _weights(fed, new.layout)
