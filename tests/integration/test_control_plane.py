"""The control plane behaves like a real cluster: CRDs, Jobs, scheduling, GC, admission."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from deeprad.devenv.cluster import Cluster
from deeprad.devenv.kube_rest import ApiError
from deeprad.devenv.kube_wait import condition, pod_phase, wait_for_gone, wait_for_object

pytestmark = pytest.mark.integration

MANIFESTS = Path(__file__).parent / "manifests"


def _namespace(cluster: Cluster, labels: dict[str, str] | None = None) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.client().create("/api/v1/namespaces", {
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": labels or {}},
    })
    return name


def _job(name: str, script: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {"backoffLimit": 0, **spec, "template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "python:3.11-slim",
                            "command": ["python", "-c", script]}],
        }}},
    }


def test_server_side_apply_establishes_crd(hub_cluster: Cluster) -> None:
    hub_cluster.kubectl("apply", "--server-side", "-f", str(MANIFESTS / "test-crd"))
    hub_cluster.kubectl("wait", "--for=condition=Established", "--timeout=30s",
                        "crd/widgets.test.deeprad.io")
    ns = _namespace(hub_cluster)
    widget = {"apiVersion": "test.deeprad.io/v1alpha1", "kind": "Widget",
              "metadata": {"name": "w1", "namespace": ns}, "spec": {"size": 3}}
    hub_cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(widget))
    out = hub_cluster.kubectl("get", "widgets", "-n", ns).stdout
    assert "w1" in out and "SIZE" in out
    widget["spec"] = {"size": 11}  # the CEL rule rejects it
    refused = hub_cluster.kubectl("apply", "--server-side", "-f", "-",
                                  input=json.dumps(widget), check=False)
    assert refused.returncode != 0 and "size must be at most 10" in refused.stderr


def test_job_runs_python_and_logs_are_readable(hub_cluster: Cluster) -> None:
    ns = _namespace(hub_cluster)
    client = hub_cluster.client()
    client.create(f"/apis/batch/v1/namespaces/{ns}/jobs",
                  _job("hello", "import sys; print('hello from', sys.version_info[:2])"))
    wait_for_object(client, f"/apis/batch/v1/namespaces/{ns}/jobs/hello",
                    lambda j: (condition(j, "Complete") or {}).get("status") == "True",
                    timeout=90, what="job hello Complete")
    logs = hub_cluster.kubectl("logs", "-n", ns, "job/hello").stdout
    assert "hello from (3, 11)" in logs


def test_failing_job_reports_exit_code(hub_cluster: Cluster) -> None:
    ns = _namespace(hub_cluster)
    client = hub_cluster.client()
    client.create(f"/apis/batch/v1/namespaces/{ns}/jobs",
                  _job("fails", "import sys; print('bad input', file=sys.stderr); sys.exit(3)"))
    wait_for_object(client, f"/apis/batch/v1/namespaces/{ns}/jobs/fails",
                    lambda j: (condition(j, "Failed") or {}).get("status") == "True",
                    timeout=90, what="job fails Failed")
    pods = client.get(f"/api/v1/namespaces/{ns}/pods")["items"]
    assert len(pods) == 1 and pod_phase(pods[0]) == "Failed"
    terminated = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3
    assert "bad input" in hub_cluster.kubectl("logs", "-n", ns, pods[0]["metadata"]["name"]
                                              ).stdout


def test_pod_asking_for_too_many_gpus_stays_pending(hub_cluster: Cluster) -> None:
    ns = _namespace(hub_cluster)
    client = hub_cluster.client()
    client.create(f"/api/v1/namespaces/{ns}/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "greedy"},
        "spec": {"containers": [{"name": "main", "image": "trainer",
                                 "command": ["python", "-c", "pass"],
                                 "resources": {"limits": {"nvidia.com/gpu": "64"}}}]},
    })
    pod = wait_for_object(
        client, f"/api/v1/namespaces/{ns}/pods/greedy",
        lambda p: (condition(p, "PodScheduled") or {}).get("reason") == "Unschedulable",
        timeout=60, what="greedy unschedulable",
    )
    assert pod_phase(pod) == "Pending"
    assert "Insufficient nvidia.com/gpu" in condition(pod, "PodScheduled")["message"]  # type: ignore[index]


def test_deleting_a_job_garbage_collects_its_pods(hub_cluster: Cluster) -> None:
    ns = _namespace(hub_cluster)
    client = hub_cluster.client()
    client.create(f"/apis/batch/v1/namespaces/{ns}/jobs",
                  _job("sleepy", "import time; time.sleep(300)"))
    wait_for_object(client, f"/api/v1/namespaces/{ns}/pods",
                    lambda lst: any(pod_phase(p) == "Running" for p in lst["items"]),
                    timeout=60, what="sleepy pod Running")
    client.delete(f"/apis/batch/v1/namespaces/{ns}/jobs/sleepy",
                  {"propagationPolicy": "Background"})
    wait_for_object(client, f"/api/v1/namespaces/{ns}/pods",
                    lambda lst: not lst["items"], timeout=90, what="pods of sleepy gone")


def test_restricted_namespace_refuses_privileged_pod(hub_cluster: Cluster) -> None:
    ns = _namespace(hub_cluster, {"pod-security.kubernetes.io/enforce": "restricted"})
    privileged = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "root"},
        "spec": {"containers": [{"name": "main", "image": "busybox",
                                 "command": ["sleep", "1"],
                                 "securityContext": {"privileged": True}}]},
    }
    with pytest.raises(ApiError) as refused:
        hub_cluster.client().create(f"/api/v1/namespaces/{ns}/pods", privileged)
    assert refused.value.status == 403
    assert "violates PodSecurity" in str(refused.value)


def test_namespace_deletion_finishes(hub_cluster: Cluster) -> None:
    ns = _namespace(hub_cluster)
    client = hub_cluster.client()
    client.create(f"/api/v1/namespaces/{ns}/configmaps",
                  {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}})
    client.delete(f"/api/v1/namespaces/{ns}")
    wait_for_gone(client, f"/api/v1/namespaces/{ns}", timeout=90)
