"""Who created a study, on a real kube-apiserver: the deeprad-study-creator admission policies
(as the hub chart ships them) set `deeprad.io/created-by` to the authenticated requester on
create and refuse any change to it afterwards. Two users, alice and mallory, act through
impersonation with the same namespace rights."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from deeprad_processes import wait
from redteam import refused

from deeprad.devenv.cluster import Cluster
from deeprad.operator.render import admission

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
POLICY_FILE = ROOT / "helm" / "deeprad" / "files" / "admission" / \
    f"{admission.STUDY_CREATOR_POLICY}.yaml"
API = "deeprad.io/v1alpha1"
PLURALS = ("hospitalsites", "federatedstudies", "federatedrounds", "sitetasks")
ANNOTATION = admission.CREATED_BY_ANNOTATION
USERS = ("alice", "mallory")


def _study(name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"apiVersion": API, "kind": "FederatedStudy", "metadata": meta,
            "spec": {"model": {"name": "tumor-cnn"}, "rounds": 3}}


def _round(name: str) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "FederatedRound", "metadata": {"name": name},
            "spec": {"round": 1, "model": {"name": "tumor-cnn"},
                     "sites": ["st-marys", "charite"], "minSites": 2}}


def _as(hub: Cluster, user: str, *args: str, body: dict[str, Any] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return hub.kubectl(f"--as={user}", *args, input=None if body is None else json.dumps(body),
                       check=False)


def _get(hub: Cluster, ns: str, kind: str, name: str) -> dict[str, Any] | None:
    out = hub.kubectl("get", kind, name, "-n", ns, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def _creator(hub: Cluster, ns: str, kind: str, name: str) -> str | None:
    return admission.created_by(_get(hub, ns, kind, name))


@pytest.fixture(scope="module")
def hub(hub_cluster: Cluster) -> Cluster:
    """The hub with the CRDs and the shipped deeprad-study-creator policies in force."""
    hub_cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    hub_cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                        *(f"crd/{p}.deeprad.io" for p in PLURALS))
    # --force-conflicts: tests share the hub, and an earlier one may have applied the chart.
    hub_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(POLICY_FILE))
    return hub_cluster


@pytest.fixture(scope="module")
def ns(hub: Cluster) -> str:
    """A namespace where alice and mallory may both create, edit and delete studies and
    rounds, and a probe that waits until the policies are in the admission chain."""
    name = f"creator-{uuid.uuid4().hex[:8]}"
    hub.kubectl("create", "namespace", name)
    hub.kubectl("create", "role", "study-author", "-n", name,
                "--verb=get,list,create,update,patch,delete",
                "--resource=federatedstudies.deeprad.io,federatedrounds.deeprad.io")
    hub.kubectl("create", "rolebinding", "study-authors", "-n", name, "--role=study-author",
                *(f"--user={u}" for u in USERS))

    def enforced() -> bool:
        out = _as(hub, "alice", "create", "--dry-run=server", "-n", name, "-o", "json",
                  "-f", "-", body=_study("probe"))
        return out.returncode == 0 and \
            admission.created_by(json.loads(out.stdout)) == "alice"

    wait("the deeprad-study-creator policies in the admission chain", enforced)
    return name


def test_the_shipped_file_holds_the_mutation_and_the_validation() -> None:
    kinds = [d["kind"] for d in admission.study_creator_policies()]
    assert kinds == ["MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding",
                     "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    assert admission.main(["--check"]) == 0, "run `make admission`"


@pytest.mark.parametrize("kind", ["FederatedStudy", "FederatedRound"])
def test_create_records_the_authenticated_user(hub: Cluster, ns: str, kind: str) -> None:
    name = f"by-alice-{kind.lower()}"
    body = _study(name) if kind == "FederatedStudy" else _round(name)
    out = _as(hub, "alice", "apply", "-n", ns, "-f", "-", body=body)
    assert out.returncode == 0, out.stderr
    assert _creator(hub, ns, kind, name) == "alice"
    # The author keeps working as before: a second apply (new spec) and a label are fine,
    # and the annotation stays.
    if kind == "FederatedStudy":
        body["spec"]["rounds"] = 5
        out = _as(hub, "alice", "apply", "-n", ns, "-f", "-", body=body)
        assert out.returncode == 0, out.stderr
    out = _as(hub, "alice", "label", kind.lower(), name, "-n", ns, "team=radiology")
    assert out.returncode == 0, out.stderr
    assert _creator(hub, ns, kind, name) == "alice"


def test_redteam_forged_creator_on_create_is_overwritten(hub: Cluster, ns: str) -> None:
    """mallory writes alice's name into the manifest: the API server records mallory."""
    out = _as(hub, "mallory", "apply", "-n", ns, "-f", "-",
              body=_study("forged", {ANNOTATION: "alice"}))
    assert out.returncode == 0, out.stderr
    assert _creator(hub, ns, "FederatedStudy", "forged") == "mallory"
    refused("study author forges deeprad.io/created-by on create",
            f"MutatingAdmissionPolicy {admission.STUDY_CREATOR_POLICY}",
            "the annotation is overwritten with the authenticated requester (mallory)")


@pytest.mark.parametrize("how", ["changed", "removed"])
def test_redteam_creator_rewritten_on_update_is_refused(hub: Cluster, ns: str, how: str
                                                        ) -> None:
    """mallory may edit alice's study (same namespace rights) but not the name on it."""
    name = f"alices-{how}"
    assert _as(hub, "alice", "apply", "-n", ns, "-f", "-", body=_study(name)).returncode == 0
    before = _get(hub, ns, "FederatedStudy", name)
    assert admission.created_by(before) == "alice"
    if how == "changed":
        out = _as(hub, "mallory", "annotate", "--overwrite", "federatedstudy", name, "-n", ns,
                  f"{ANNOTATION}=mallory")
    else:
        out = _as(hub, "mallory", "annotate", "federatedstudy", name, "-n", ns,
                  f"{ANNOTATION}-")
    assert out.returncode != 0, f"mallory {how} the creator annotation"
    message = out.stderr.strip()
    assert f"{admission.STUDY_CREATOR_POLICY} (update):" in message, message
    assert "cannot change or be removed; keep it as alice" in message, message
    after = _get(hub, ns, "FederatedStudy", name)
    assert after is not None and after["metadata"] == before["metadata"]  # nothing written
    refused(f"study author {how} another's deeprad.io/created-by",
            f"ValidatingAdmissionPolicy {admission.STUDY_CREATOR_POLICY}",
            message.split("denied request: ", 1)[-1])



def test_the_crds_own_validation_still_names_a_mistyped_field(hub: Cluster, ns: str) -> None:
    """The mutation runs before schema validation; it must not answer for the schema."""
    body = _study("mistyped")
    body["spec"]["rounds"] = "three"
    out = _as(hub, "alice", "apply", "-n", ns, "-f", "-", body=body)
    assert out.returncode != 0
    assert "spec.rounds" in out.stderr and "must be of type integer" in out.stderr, out.stderr
    assert admission.STUDY_CREATOR_POLICY not in out.stderr
    assert _get(hub, ns, "FederatedStudy", "mistyped") is None
