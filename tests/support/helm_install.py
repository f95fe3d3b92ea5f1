"""A federation installed with Helm on its own loopback clusters: the hub chart (helm/deeprad)
on a hub cluster and the site chart (helm/deeprad-site) on two hospital clusters. The operator
and the site agents run as pods (the devenv node agent runs them as local processes).

Setup follows the charts' READMEs: keys and Secrets made by hand, the charts installed with
their example values files plus only what loopback needs (free ports, the S3 endpoint, the
keys and kubeconfigs generated here, phantom data instead of a hospital's images, short
intervals so a study takes minutes).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from deeprad_processes import wait
from federation import read_json

from deeprad.core.data.phantoms import DEFAULT_PROFILES
from deeprad.devenv.binaries import tool, tool_env
from deeprad.devenv.cluster import Cluster
from deeprad.devenv.kubeconfig import kubeconfig_dict, write_kubeconfig
from deeprad.devenv.node_config import NodeSpec
from deeprad.devenv.ports import free_port
from deeprad.devenv.s3_server import S3Server

ROOT = Path(__file__).resolve().parents[2]
HUB_CHART = ROOT / "helm" / "deeprad"
SITE_CHART = ROOT / "helm" / "deeprad-site"
HUB_VALUES = HUB_CHART / "examples" / "values-lab.yaml"
SITE_VALUES = SITE_CHART / "examples" / "values-st-marys.yaml"

HUB_RELEASE = "deeprad"
HUB_NAMESPACE = "deeprad-system"  # the release namespace = the jobs namespace
SITE_NAMESPACE = "deeprad"  # the agent's namespace on each hospital cluster
PLURALS = ("hospitalsites", "federatedstudies", "federatedrounds", "sitetasks")
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted",
              "pod-security.kubernetes.io/enforce-version": "latest",
              "pod-security.kubernetes.io/warn": "restricted",
              "pod-security.kubernetes.io/audit": "restricted"}
SAMPLES_PER_SITE = 240
# values-st-marys.yaml places trainer Jobs on H100 nodes tainted nvidia.com/gpu with the nvidia
# RuntimeClass: the hospital clusters here have such nodes (what NVIDIA's GPU operator sets up).
H100 = "NVIDIA-H100-80GB-HBM3"
MONITORING_KINDS = {"ServiceMonitor": "servicemonitors", "PrometheusRule": "prometheusrules"}


def hospital_nodes(cluster: str) -> list[NodeSpec]:
    return [NodeSpec(name=f"{cluster}-gpu-0", gpus=2, gpu_product=H100, gpu_memory_mib=81559,
                     taints=[{"key": "nvidia.com/gpu", "value": "present",
                              "effect": "NoSchedule"}]),
            NodeSpec(name=f"{cluster}-cpu-0")]


def helm(*args: str, home: Path, kubeconfig: Path | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    argv = [tool("helm"), *args] + ([f"--kubeconfig={kubeconfig}"] if kubeconfig else [])
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                            env=tool_env() | {"HOME": str(home)})
    assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stderr}{result.stdout}"
    return result


def deeprad(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "deeprad.cli", *args], capture_output=True,
                         text=True, check=True, cwd="/")
    return out.stdout


def get(cluster: Cluster, *args: str) -> dict[str, Any] | None:
    out = cluster.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def items(cluster: Cluster, *args: str) -> list[dict[str, Any]]:
    return list((get(cluster, *args) or {}).get("items") or ())


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or ():
        if c["type"] == type_:
            return dict(c)
    return {}


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def http_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


def promql(base_url: str, expr: str) -> tuple[str, list[dict[str, Any]]]:
    """(status or error text, result) of an instant query; a parse error is not raised."""
    url = f"{base_url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            answer = json.load(resp)
    except urllib.error.HTTPError as exc:
        answer = json.load(exc)
    if answer.get("status") != "success":
        return str(answer.get("error") or answer), []
    return "success", list(answer["data"]["result"])


@dataclass
class Ports:
    """Every pod shares 127.0.0.1: each listening port is distinct."""

    operator_health: int = field(default_factory=free_port)
    operator_metrics: int = field(default_factory=free_port)
    agent_health: dict[str, int] = field(default_factory=dict)
    agent_metrics: dict[str, int] = field(default_factory=dict)


@dataclass
class HelmFederation:
    hub: Cluster
    sites: dict[str, Cluster]  # hospital → its cluster
    s3: S3Server
    workdir: Path
    bucket: str
    prefix: str
    training_namespace: str
    study_namespaces: list[str]
    ports: Ports = field(default_factory=Ports)
    hub_public: dict[str, str] = field(default_factory=dict)
    hub_args: list[str] = field(default_factory=list)  # the loopback --set flags

    @property
    def home(self) -> Path:
        return self.workdir / "helm-home"

    def helm_hub(self, *args: str) -> subprocess.CompletedProcess[str]:
        return helm(*args, "-n", HUB_NAMESPACE, home=self.home, kubeconfig=self.hub.kubeconfig)

    def helm_site(self, site: str, *args: str) -> subprocess.CompletedProcess[str]:
        return helm(*args, "-n", SITE_NAMESPACE, home=self.home,
                    kubeconfig=self.sites[site].kubeconfig)

    def logs(self, cluster: Cluster, namespace: str, selector: str, tail: int = 40) -> str:
        out = cluster.kubectl("logs", "-n", namespace, "-l", selector, f"--tail={tail}",
                              "--prefix", "--all-containers", check=False)
        return out.stdout + out.stderr

    def diagnostics(self) -> str:
        parts = [f"--- operator ({self.hub.name}) ---",
                 self.logs(self.hub, HUB_NAMESPACE, "app.kubernetes.io/component=operator")]
        for site, cluster in self.sites.items():
            parts += [f"--- agent {site} ---",
                      self.logs(cluster, SITE_NAMESPACE, "app.kubernetes.io/component=site-agent")]
        return "\n".join(parts)

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 120.0,
             interval: float = 0.5) -> Any:
        return wait(what, check, timeout, interval=interval, diagnostics=self.diagnostics)

    def store_keys(self, prefix: str) -> list[str]:
        return [o.object_name for o in self.s3.client().list_objects(
            self.bucket, prefix=f"{self.prefix}/{prefix}", recursive=True)]

    def store_json(self, key: str) -> dict[str, Any]:
        return read_json(self.s3, self.bucket, f"{self.prefix}/{key}")

    def operator_healthy(self) -> bool:
        return http_ok(f"http://127.0.0.1:{self.ports.operator_health}/healthz")

    def operator_metrics(self) -> str:
        return http_text(f"http://127.0.0.1:{self.ports.operator_metrics}/metrics")

    def site_ready(self, site: str) -> bool:
        return condition(get(self.hub, "hospitalsite", site), "Ready").get("status") == "True"


def _restricted_namespace(cluster: Cluster, name: str) -> None:
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name,
                                                                "labels": RESTRICTED}}
    cluster.kubectl("apply", "--server-side", "--field-manager=test-setup", "-f", "-",
                    input=json.dumps(ns))


def install_monitoring_crds(cluster: Cluster) -> None:
    """The Prometheus Operator's ServiceMonitor and PrometheusRule kinds, schema-less (enough to
    accept the charts' objects), Established."""
    crds = [{"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
             "metadata": {"name": f"{plural}.monitoring.coreos.com"},
             "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                      "names": {"kind": kind, "plural": plural, "listKind": f"{kind}List",
                                "singular": kind.lower()},
                      "versions": [{"name": "v1", "served": True, "storage": True, "schema": {
                          "openAPIV3Schema": {"type": "object",
                                              "x-kubernetes-preserve-unknown-fields": True}}}]}}
            for kind, plural in MONITORING_KINDS.items()]
    cluster.kubectl("apply", "--server-side", "-f", "-",
                    input="\n---\n".join(json.dumps(c) for c in crds))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    *(f"crd/{p}.monitoring.coreos.com" for p in MONITORING_KINDS.values()))


def install_hub(fed: HelmFederation) -> None:
    """README step 1 (keys, namespace, Secrets) and step 2 (`helm install`)."""
    lab = yaml.safe_load(HUB_VALUES.read_text())
    hub_name = lab["hubIdentity"]["name"]
    keys = fed.workdir / "keys"
    deeprad("keys", "generate", "--out", str(keys / "hub"), "--name", hub_name, "--role", "hub")
    fed.hub_public = {f: (keys / "hub" / f).read_text().strip()
                      for f in ("signing.pub", "key-agreement.pub")}
    _restricted_namespace(fed.hub, HUB_NAMESPACE)
    fed.hub.kubectl("-n", HUB_NAMESPACE, "create", "secret", "generic",
                    lab["hubIdentity"]["secretName"],
                    *(f"--from-file={keys / 'hub' / f}" for f in
                      ("signing.key", "key-agreement.key", "name", "role")))
    fed.hub.kubectl("-n", HUB_NAMESPACE, "create", "secret", "generic",
                    lab["store"]["credentials"]["existingSecret"],
                    f"--from-literal=access-key={fed.s3.root.access_key}",
                    f"--from-literal=secret-key={fed.s3.root.secret_key}")
    install_monitoring_crds(fed.hub)  # values-lab.yaml turns on ServiceMonitor/PrometheusRule
    fed.hub.kubectl("create", "namespace", "monitoring", check=False)  # Grafana's
    fed.s3.create_bucket(fed.bucket)
    fed.hub_args = [
        "--set", f"store.endpoint={fed.s3.endpoint}",
        "--set", f"store.publicEndpoint={fed.s3.endpoint}",
        "--set-string", f"hubIdentity.signingKey={fed.hub_public['signing.pub']}",
        "--set-string", f"hubIdentity.keyAgreementKey={fed.hub_public['key-agreement.pub']}",
        "--set", f"operator.healthPort={fed.ports.operator_health}",
        "--set", f"metrics.port={fed.ports.operator_metrics}",
        # Speed, not function: 1 s passes instead of 15/10/5 s.
        "--set", "operator.intervals.site=1", "--set", "operator.intervals.study=1",
        "--set", "operator.intervals.round=1",
        # Pods here share 127.0.0.1, so two operator pods (replicas, or a rolling update's
        # surge) would bind the same ports: one operator, replaced with Recreate.
        # tests/e2e/test_failover.py runs two replicas as processes on ports of their own.
        "--set", "operator.replicas=1", "--set", "operator.leaderElection.enabled=false",
    ]
    fed.helm_hub("install", HUB_RELEASE, str(HUB_CHART), "-f", str(HUB_VALUES), *fed.hub_args)
    fed.hub.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    *(f"crd/{p}.deeprad.io" for p in PLURALS))
    fed.wait("the operator pod's /healthz", fed.operator_healthy, 180)


def _site_values(fed: HelmFederation, index: int) -> Path:
    """What a loopback hospital replaces in values-st-marys.yaml: phantom images (there are no
    brain MRIs here) and a trainer that fits a shared 2-core machine."""
    profile = DEFAULT_PROFILES[index % len(DEFAULT_PROFILES)]
    values = {"training": {
        # The example's path is ignored by the phantom reader; its image_size and
        # val_fraction are overridden by the round's spec.data.
        "dataset": {"kind": "phantom", "options": {
            "profile": profile.as_dict(), "samples": SAMPLES_PER_SITE, "seed": 1000 + index}},
        "resources": {"cpu": "1", "memory": "2Gi"}}}
    path = fed.workdir / f"site-{index}-values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def install_site(fed: HelmFederation, site: str, index: int) -> None:
    """The hub admin registers the hospital and hands over a kubeconfig; the hospital installs
    the site chart (site README), then puts its identity Secret in the training namespace."""
    cluster = fed.sites[site]
    example = yaml.safe_load(SITE_VALUES.read_text())
    folder = fed.workdir / "keys" / site
    deeprad("keys", "generate", "--out", str(folder), "--name", site)
    served = [arg for ns in fed.study_namespaces for arg in ("--study-namespace", ns)]
    docs = list(yaml.safe_load_all(deeprad("site", "register", site, "--keys", str(folder),
                                           "--namespace", fed.training_namespace, *served)))
    secret = next(d for d in docs if d["kind"] == "Secret")
    hsite = next(d for d in docs if d["kind"] == "HospitalSite")
    hsite["spec"]["data"] = {"modality": "mri", "labels": ["normal", "tumor"],
                             "sampleCount": SAMPLES_PER_SITE}
    hsite["spec"]["connection"] = {"mode": "pull", "heartbeatTimeout": "30s"}
    fed.hub.kubectl("apply", "-f", "-", input=json.dumps(hsite))
    hub_ns = f"deeprad-site-{site}"
    fed.wait(f"ServiceAccount deeprad-agent in {hub_ns} (made by the operator)",
             lambda: get(fed.hub, "serviceaccount", "deeprad-agent", "-n", hub_ns))
    token = fed.hub.kubectl("create", "token", "deeprad-agent", "-n", hub_ns,
                            "--duration", "24h").stdout.strip()
    kubeconfig = write_kubeconfig(fed.workdir / site / "hub.kubeconfig", kubeconfig_dict(
        f"hub-{site}", fed.hub.server, (fed.hub.dir / "pki" / "ca.crt").read_bytes(),
        token=token))
    # The GPU operator's RuntimeClass, which values-st-marys.yaml names.
    cluster.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
        "metadata": {"name": example["training"]["gpu"]["runtimeClassName"]},
        "handler": "nvidia"}))
    _restricted_namespace(cluster, SITE_NAMESPACE)
    cluster.kubectl("-n", SITE_NAMESPACE, "create", "secret", "generic",
                    example["hub"]["existingSecret"], f"--from-file=kubeconfig={kubeconfig}")
    fed.ports.agent_health[site] = free_port()
    fed.ports.agent_metrics[site] = free_port()
    fed.helm_site(site, "install", site, str(SITE_CHART), "-f", str(SITE_VALUES),
                  "-f", str(_site_values(fed, index)),
                  "--set", f"site={site}",
                  "--set-string", f"hubSigningKey={fed.hub_public['signing.pub']}",
                  "--set", f"store.endpoint={fed.s3.url}",
                  "--set", f"agent.healthPort={fed.ports.agent_health[site]}",
                  "--set", f"agent.metricsPort={fed.ports.agent_metrics[site]}",
                  # Speed: 2 s heartbeats and 1 s polls instead of 15 s / 5 s.
                  "--set", "heartbeatSeconds=2", "--set", "pollSeconds=1",
                  # the example's policy as it is, for this test's study namespaces
                  "--set-json", "policy.studies=" + json.dumps(
                      [f"{ns}/*" for ns in fed.study_namespaces]))
    # The training namespace exists now (the chart made it, labelled restricted).
    cluster.kubectl("apply", "-f", "-", input=json.dumps(secret))


def start(hub: Cluster, sites: dict[str, Cluster], s3: S3Server, workdir: Path,
          study_namespaces: list[str]) -> HelmFederation:
    lab = yaml.safe_load(HUB_VALUES.read_text())
    example = yaml.safe_load(SITE_VALUES.read_text())
    fed = HelmFederation(hub, sites, s3, workdir, bucket=lab["store"]["bucket"],
                         prefix=lab["store"]["prefix"],
                         training_namespace=example["training"]["namespace"],
                         study_namespaces=study_namespaces)
    fed.home.mkdir(parents=True, exist_ok=True)
    # The research namespaces exist before the operator starts. They must: an operator limited
    # to `-n` patterns (values-lab.yaml: research, research-*) does not watch the cluster-scoped
    # HospitalSites either while no namespace matches (kopf spawns one watcher per resource and
    # matching namespace), so sites would never become Ready.
    for ns in study_namespaces:
        hub.kubectl("create", "namespace", ns)
    install_hub(fed)
    for index, site in enumerate(sites):
        install_site(fed, site, index)
    for site in sites:
        fed.wait(f"HospitalSite {site} Ready", functools.partial(fed.site_ready, site), 180)
    return fed


def pods(cluster: Cluster, namespace: str, selector: str) -> Iterator[dict[str, Any]]:
    yield from items(cluster, "pods", "-n", namespace, "-l", selector)
