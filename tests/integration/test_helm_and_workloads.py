"""Helm installs charts into the real apiserver; Deployments and Services behave."""

from __future__ import annotations

import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest

from deeprad.devenv.binaries import tool, tool_env
from deeprad.devenv.cluster import Cluster
from deeprad.devenv.kube_wait import wait_for_object
from deeprad.devenv.ports import free_port

pytestmark = pytest.mark.integration


def _chart(folder: Path, port: int) -> Path:
    chart = folder / "echo"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(
        "apiVersion: v2\nname: echo\nversion: 0.1.0\nkubeVersion: '>=1.30.0-0'\n"
    )
    (chart / "values.yaml").write_text(f"port: {port}\n")
    (chart / "templates" / "deployment.yaml").write_text("""\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}
spec:
  replicas: 1
  selector:
    matchLabels: {app: {{ .Release.Name }}}
  template:
    metadata:
      labels: {app: {{ .Release.Name }}}
    spec:
      containers:
        - name: web
          image: python:3.11
          command: ["python", "-m", "http.server", "{{ .Values.port }}", "--bind", "127.0.0.1"]
          ports: [{containerPort: {{ .Values.port }}}]
""")
    return chart


def test_helm_installs_a_deployment_that_becomes_available(hub_cluster: Cluster,
                                                            tmp_path: Path) -> None:
    ns = f"t-{uuid.uuid4().hex[:8]}"
    port = free_port()
    chart = _chart(tmp_path, port)
    result = subprocess.run(
        [tool("helm"), "install", "echo", str(chart), "--namespace", ns, "--create-namespace",
         f"--kubeconfig={hub_cluster.kubeconfig}", "--wait", "--timeout=90s"],
        capture_output=True, text=True, env=tool_env() | {"HOME": str(tmp_path)}, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    deployment = wait_for_object(
        hub_cluster.client(), f"/apis/apps/v1/namespaces/{ns}/deployments/echo",
        lambda d: d.get("status", {}).get("availableReplicas") == 1, timeout=30,
    )
    assert deployment["status"]["readyReplicas"] == 1
    # The pod is a local process: its server answers on loopback.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
        assert resp.status == 200
    listing = subprocess.run(
        [tool("helm"), "list", "-n", ns, f"--kubeconfig={hub_cluster.kubeconfig}", "-q"],
        capture_output=True, text=True, env=tool_env() | {"HOME": str(tmp_path)}, check=True,
    )
    assert listing.stdout.strip() == "echo"
