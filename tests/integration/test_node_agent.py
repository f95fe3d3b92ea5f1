"""The node agent runs pods as local processes the way kubelet would run containers."""

from __future__ import annotations

import base64
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from deeprad.devenv.cluster import Cluster
from deeprad.devenv.kube_wait import pod_phase, wait_for_gone, wait_for_object

pytestmark = pytest.mark.integration


def _namespace(cluster: Cluster) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.client().create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                    "metadata": {"name": name}})
    return name


def _pod(name: str, script: str, **spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": "ghcr.io/example/trainer:1.0",
                 "command": ["python3", "-c", script]}
    container |= spec.pop("container", {})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "containers": [container], **spec}}


def _run_to_end(cluster: Cluster, ns: str, pod: dict[str, Any], timeout: float = 60
                ) -> dict[str, Any]:
    client = cluster.client()
    client.create(f"/api/v1/namespaces/{ns}/pods", pod)
    return wait_for_object(
        client, f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}",
        lambda p: pod_phase(p) in ("Succeeded", "Failed"), timeout=timeout,
        what=f"pod {pod['metadata']['name']} finished",
    )


def _logs(cluster: Cluster, ns: str, name: str) -> str:
    return cluster.kubectl("logs", "-n", ns, name).stdout


def test_env_from_secret_configmap_and_fields(hub_cluster: Cluster) -> None:
    ns = _namespace(hub_cluster)
    client = hub_cluster.client()
    client.create(f"/api/v1/namespaces/{ns}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
        "data": {"password": base64.b64encode(b"s3cr3t").decode()}})
    client.create(f"/api/v1/namespaces/{ns}/configmaps", {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
        "data": {"rounds": "7"}})
    script = ("import os; print(os.environ['PASSWORD'], os.environ['ROUNDS'], "
              "os.environ['MY_NS'], os.environ['GREETING'])")
    pod = _pod("envs", script, container={"env": [
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
        {"name": "ROUNDS", "valueFrom": {"configMapKeyRef": {"name": "settings",
                                                             "key": "rounds"}}},
        {"name": "MY_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "GREETING", "value": "rounds=$(ROUNDS)"},
    ]})
    assert pod_phase(_run_to_end(hub_cluster, ns, pod)) == "Succeeded"
    assert _logs(hub_cluster, ns, "envs").strip() == f"s3cr3t 7 {ns} rounds=7"


def test_volumes_map_to_folders_and_paths_are_rewritten(hub_cluster: Cluster) -> None:
    ns = _namespace(hub_cluster)
    client = hub_cluster.client()
    client.create(f"/api/v1/namespaces/{ns}/configmaps", {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"},
        "data": {"model.yaml": "layers: 3\n"}})
    script = "\n".join([
        "import os, pathlib, urllib.request, ssl, json",
        "pathlib.Path('/scratch/out.txt').write_text('written')",
        "print(open('/etc/model/model.yaml').read().strip())",
        "print(os.environ['OUT_DIR'] == os.path.dirname(os.path.realpath('/scratch/out.txt')))",
        "tok = open('/var/run/secrets/kubernetes.io/serviceaccount/token').read()",
        "ctx = ssl.create_default_context(",
        "    cafile='/var/run/secrets/kubernetes.io/serviceaccount/ca.crt')",
        "host, port = os.environ['KUBERNETES_SERVICE_HOST'], os.environ['KUBERNETES_SERVICE_PORT']",
        "req = urllib.request.Request(",
        "    f'https://{host}:{port}/apis/authentication.k8s.io/v1/selfsubjectreviews',",
        "    data=b'{\"apiVersion\":\"authentication.k8s.io/v1\",\"kind\":\"SelfSubjectReview\"}',",
        "    headers={'Authorization': 'Bearer ' + tok, 'Content-Type': 'application/json'})",
        "print(json.load(urllib.request.urlopen(req, context=ctx))['status']['userInfo']"
        "['username'])",
        "print(os.getcwd())",
    ])
    pod = _pod("vols", script, volumes=[
        {"name": "scratch", "emptyDir": {}},
        {"name": "model", "configMap": {"name": "cfg"}},
    ], container={
        "workingDir": "/scratch",
        "env": [{"name": "OUT_DIR", "value": "/scratch"}],
        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"},
                         {"name": "model", "mountPath": "/etc/model", "readOnly": True}],
    })
    done = _run_to_end(hub_cluster, ns, pod)
    logs = _logs(hub_cluster, ns, "vols").splitlines()
    assert pod_phase(done) == "Succeeded", logs
    assert logs[0] == "layers: 3"
    assert logs[1] == "True"
    assert logs[2] == f"system:serviceaccount:{ns}:default"
    assert logs[3].endswith("/volumes/scratch")
    assert (Path(logs[3]) / "out.txt").read_text() == "written"


def test_persistent_volume_claim_is_a_folder_that_outlives_the_pod(hub_cluster: Cluster) -> None:
    ns = _namespace(hub_cluster)
    client = hub_cluster.client()
    client.create(f"/api/v1/namespaces/{ns}/persistentvolumeclaims", {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": "1Gi"}}}})
    mount = {"volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}],
             "container": {"volumeMounts": [{"name": "d", "mountPath": "/data"}]}}
    write = _pod("writer", "open('/data/site.txt', 'w').write('patients stay here')", **mount)
    assert pod_phase(_run_to_end(hub_cluster, ns, write)) == "Succeeded"
    mount = {"volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}],
             "container": {"volumeMounts": [{"name": "d", "mountPath": "/data"}]}}
    read = _pod("reader", "print(open('/data/site.txt').read())", **mount)
    assert pod_phase(_run_to_end(hub_cluster, ns, read)) == "Succeeded"
    assert _logs(hub_cluster, ns, "reader").strip() == "patients stay here"


def test_on_failure_restarts_until_success(hub_cluster: Cluster) -> None:
    ns = _namespace(hub_cluster)
    script = ("import os, sys; p = '/state/tries'; n = int(open(p).read()) if os.path.exists(p) "
              "else 0; open(p, 'w').write(str(n + 1)); print('try', n); sys.exit(0 if n else 1)")
    pod = _pod("flaky", script, restartPolicy="OnFailure",
               volumes=[{"name": "state", "emptyDir": {}}],
               container={"volumeMounts": [{"name": "state", "mountPath": "/state"}]})
    done = _run_to_end(hub_cluster, ns, pod)
    status = done["status"]["containerStatuses"][0]
    assert pod_phase(done) == "Succeeded"
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 1
    previous = hub_cluster.kubectl("logs", "-n", ns, "flaky", "--previous").stdout
    assert previous.strip() == "try 0"


def test_active_deadline_fails_the_pod(hub_cluster: Cluster) -> None:
    ns = _namespace(hub_cluster)
    pod = _pod("slow", "import time; time.sleep(120)", activeDeadlineSeconds=2)
    done = _run_to_end(hub_cluster, ns, pod, timeout=30)
    assert pod_phase(done) == "Failed"
    assert done["status"]["reason"] == "DeadlineExceeded"


def test_deleting_a_running_pod_stops_its_process(hub_cluster: Cluster) -> None:
    ns = _namespace(hub_cluster)
    client = hub_cluster.client()
    client.create(f"/api/v1/namespaces/{ns}/pods",
                  _pod("sleeper", "import time; time.sleep(600)"))
    wait_for_object(client, f"/api/v1/namespaces/{ns}/pods/sleeper",
                    lambda p: pod_phase(p) == "Running", timeout=60)

    def processes() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get("DEEPRAD_DEVENV_POD") == f"{ns}/sleeper":
                    found.append(proc)
            except psutil.Error:
                pass
        return found

    assert processes(), "the pod's process should run on this machine"
    client.delete(f"/api/v1/namespaces/{ns}/pods/sleeper", {"gracePeriodSeconds": 5})
    wait_for_gone(client, f"/api/v1/namespaces/{ns}/pods/sleeper", timeout=30)
    deadline = time.monotonic() + 10
    while processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not processes()


def test_gpu_pod_lands_on_a_gpu_node_and_sees_its_devices(hub_cluster: Cluster) -> None:
    ns = _namespace(hub_cluster)
    pod = _pod("gpu", "import os; print(os.environ['NVIDIA_VISIBLE_DEVICES'])",
               container={"resources": {"limits": {"nvidia.com/gpu": "2"}}})
    done = _run_to_end(hub_cluster, ns, pod)
    assert done["spec"]["nodeName"] == "hub-gpu-0"
    assert _logs(hub_cluster, ns, "gpu").strip() == "GPU-hub-gpu-0-0,GPU-hub-gpu-0-1"


def test_follow_logs_stream_until_the_container_ends(hub_cluster: Cluster) -> None:
    ns = _namespace(hub_cluster)
    client = hub_cluster.client()
    script = "import time\nfor i in range(3):\n    print('tick', i, flush=True); time.sleep(0.5)"
    client.create(f"/api/v1/namespaces/{ns}/pods", _pod("ticker", script))
    wait_for_object(client, f"/api/v1/namespaces/{ns}/pods/ticker",
                    lambda p: pod_phase(p) in ("Running", "Succeeded"), timeout=60)
    out = hub_cluster.kubectl("logs", "-f", "-n", ns, "ticker", timeout=30).stdout
    assert out.split("\n")[:3] == ["tick 0", "tick 1", "tick 2"]


def test_an_emptydir_at_tmp_leaves_the_agents_own_paths_alone(hub_cluster: Cluster) -> None:
    """The charts mount an emptyDir at /tmp; the node agent's own paths (the pod's kubeconfig,
    TMPDIR) may lie under /tmp on the host and must not be rewritten into that volume, while
    the pod's own /tmp values are."""
    ns = _namespace(hub_cluster)
    script = ("import os; from pathlib import Path; "
              "print(Path(os.environ['KUBECONFIG']).is_file(), "
              "Path(os.environ['TMPDIR']).is_dir(), os.environ['SCRATCH'])")
    pod = _pod("tmpdir", script, volumes=[{"name": "tmp", "emptyDir": {}}],
               container={"volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                          "env": [{"name": "SCRATCH", "value": "/tmp/x"}]})
    done = _run_to_end(hub_cluster, ns, pod)
    assert pod_phase(done) == "Succeeded", _logs(hub_cluster, ns, "tmpdir")
    kubeconfig_ok, tmpdir_ok, scratch = _logs(hub_cluster, ns, "tmpdir").split()
    assert (kubeconfig_ok, tmpdir_ok) == ("True", "True")
    assert scratch.endswith("/volumes/tmp/x")  # the pod's own /tmp value, in the emptyDir
