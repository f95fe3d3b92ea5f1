"""Both charts against real binaries: every rendered object is accepted by a real
kube-apiserver (server-side dry run), every pod template passes the `restricted` Pod Security
Standard, `helm install --dry-run=server` prints the next step, promtool accepts the alerts and
a real Prometheus parses every PromQL expression of the dashboards and alerts."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_install import install_monitoring_crds

from deeprad.devenv.binaries import tool, tool_env
from deeprad.devenv.cluster import Cluster
from deeprad.devenv.prometheus_server import PrometheusServer, check_rules
from deeprad.operator.dashboards import ALERTS_FILE, promql_expressions

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
HUB = ROOT / "helm" / "deeprad"
SITE = ROOT / "helm" / "deeprad-site"
CASES = [(HUB, None), (HUB, HUB / "examples" / "values-lab.yaml"),
         (SITE, None), (SITE, SITE / "examples" / "values-st-marys.yaml")]
IDS = ["hub-defaults", "hub-lab", "site-defaults", "site-st-marys"]
RESTRICTED = {f"pod-security.kubernetes.io/{mode}": "restricted"
              for mode in ("enforce", "warn", "audit")}
# The Prometheus Operator's kinds are third-party: for a dry run a schema-less CRD is enough.
@pytest.fixture(scope="module")
def hub(hub_cluster: Cluster) -> Cluster:
    """The hub with deeprad's CRDs (from crds/, as a user without the chart installs them) and
    minimal monitoring.coreos.com CRDs, Established."""
    hub_cluster.kubectl("apply", "--server-side", "-f", str(CRDS))
    install_monitoring_crds(hub_cluster)
    hub_cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                        *(f"crd/{p}.deeprad.io" for p in
                          ("hospitalsites", "federatedstudies", "federatedrounds", "sitetasks")))
    return hub_cluster


def _helm(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([tool("helm"), *args], capture_output=True, text=True, timeout=180,
                            env=tool_env() | {"HOME": str(home)})
    assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stderr}{result.stdout}"
    return result


def _render(chart: Path, values: Path | None, namespace: str, home: Path) -> list[dict[str, Any]]:
    args = ["template", "t", str(chart), "-n", namespace]
    if values:
        args += ["-f", str(values)]
    return [d for d in yaml.safe_load_all(_helm(*args, home=home).stdout) if d]


def _ensure_namespace(cluster: Cluster, name: str) -> None:
    ns = {"apiVersion": "v1", "kind": "Namespace",
          "metadata": {"name": name, "labels": RESTRICTED}}
    cluster.kubectl("apply", "--server-side", "--field-manager=test-setup", "-f", "-",
                    input=json.dumps(ns))


def _dry_run(cluster: Cluster, objs: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    stream = "\n---\n".join(json.dumps(o) for o in objs)
    return cluster.kubectl("apply", "--server-side", "--dry-run=server", "--force-conflicts",
                           "--field-manager=helm-test", "-f", "-", input=stream, check=False)


@pytest.mark.parametrize(("chart", "values"), CASES, ids=IDS)
def test_every_rendered_object_is_accepted_by_the_apiserver(hub: Cluster, chart: Path,
                                                            values: Path | None,
                                                            tmp_path: Path) -> None:
    namespace = f"deeprad-{chart.name}"
    objs = _render(chart, values, namespace, tmp_path)
    for name in {o["metadata"]["namespace"] for o in objs if o["metadata"].get("namespace")}:
        _ensure_namespace(hub, name)  # the release's and any other namespace they name
    result = _dry_run(hub, objs)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "Warning" not in result.stderr, result.stderr  # e.g. a PodSecurity warning
    applied = [line for line in result.stdout.splitlines() if "(server dry run)" in line]
    assert len(applied) == len(objs), result.stdout


@pytest.mark.parametrize(("chart", "values"), CASES, ids=IDS)
def test_restricted_pod_security_admits_every_pod(hub: Cluster, chart: Path,
                                                  values: Path | None, tmp_path: Path) -> None:
    namespace = f"pss-{chart.name}"
    _ensure_namespace(hub, namespace)
    pods, accounts = [], []
    for obj in _render(chart, values, namespace, tmp_path):
        if obj["kind"] == "ServiceAccount":
            accounts.append(obj)  # Pod admission looks the ServiceAccount up: create it
        if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            template = obj["spec"]["template"]
            pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": {
                "name": obj["metadata"]["name"], "namespace": namespace,
                "labels": template["metadata"].get("labels", {})}, "spec": template["spec"]})
    assert pods
    hub.kubectl("apply", "--server-side", "--field-manager=test-setup", "-f", "-",
                input="\n---\n".join(json.dumps(a) for a in accounts))
    result = _dry_run(hub, pods)  # enforce=restricted: a violation is a denial
    assert result.returncode == 0, result.stderr + result.stdout
    assert "Warning" not in result.stderr, result.stderr


def test_a_pod_that_breaks_restricted_is_refused(hub: Cluster) -> None:
    """The check above has teeth: the same namespace refuses a privileged container."""
    _ensure_namespace(hub, "pss-control")
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bad", "namespace":
                                                            "pss-control"},
           "spec": {"containers": [{"name": "c", "image": "x", "command": ["true"],
                                    "securityContext": {"privileged": True}}]}}
    result = _dry_run(hub, [pod])
    assert result.returncode != 0
    assert "violates PodSecurity" in result.stderr


@pytest.mark.parametrize(("chart", "values", "adopt"), [
    (*CASES[1], "crds.install=false"), (*CASES[3], "training.createNamespace=false")],
    ids=[IDS[1], IDS[3]])
def test_helm_install_dry_run_prints_the_next_step(hub: Cluster, chart: Path, values: Path,
                                                   adopt: str, tmp_path: Path) -> None:
    # `adopt`: the CRDs and the training namespace already exist here, made without Helm,
    # which Helm refuses to take over.
    namespace = f"dry-{chart.name}"
    _ensure_namespace(hub, namespace)
    for obj in _render(chart, values, namespace, tmp_path):
        if obj["metadata"].get("namespace") and obj["metadata"]["namespace"] != namespace:
            _ensure_namespace(hub, obj["metadata"]["namespace"])
    out = _helm("install", "t", str(chart), "-n", namespace, "-f", str(values),
                "--set", adopt, "--dry-run=server", f"--kubeconfig={hub.kubeconfig}",
                home=tmp_path)
    notes = out.stdout.split("NOTES:", 1)[1]
    assert "Next step" in notes
    assert "kubectl" in notes


def test_promtool_accepts_the_alerts_file() -> None:
    result = check_rules(ALERTS_FILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout


def test_every_dashboard_and_alert_expression_parses(prometheus: PrometheusServer) -> None:
    failures = []
    exprs = promql_expressions()
    for where, expr in exprs.items():
        url = f"{prometheus.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                status = json.load(resp)["status"]
        except urllib.error.HTTPError as exc:
            status = json.load(exc).get("error", str(exc))
        if status != "success":
            failures.append(f"{where}: {expr}\n  -> {status}")
    assert not failures, "\n".join(failures)
    assert len(exprs) >= 40
