"""A real Kueue controller on a hospital cluster, for e2e tests: Kueue v0.17 built from source by
tools/build-tools.sh (its CRDs installed beside it), run as a process against the cluster's API
server, with the hospital's quota as a ResourceFlavor, a ClusterQueue and a LocalQueue.

What a Helm install of Kueue would add is left out on purpose: no Kueue webhooks are registered
with the API server (the site agent creates its Jobs suspended and labelled, which is all the
mutating webhook would do) and no certificates are managed by Kueue itself. Kueue v0.17 then reads
a metrics certificate from the fixed path /etc/kueue/metrics/certs; rather than write into the
machine's /etc, the controller runs in its own user and mount namespace where a read-only overlay
adds that folder to /etc.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from deeprad_processes import wait

from deeprad.devenv.binaries import ToolsMissing, tool, tools_bin_dir
from deeprad.devenv.cluster import Cluster
from deeprad.devenv.pki import CertificateAuthority
from deeprad.devenv.ports import free_port
from deeprad.devenv.processes import ManagedProcess

KUEUE_API = "kueue.x-k8s.io/v1beta2"
GPU = "nvidia.com/gpu"
FLAVOR = "default-flavor"
# Mount the overlay, then become Kueue (same pid, so stopping the process group stops Kueue).
_IN_NAMESPACE = ('mount -t overlay deeprad-kueue-etc -o "lowerdir=$1:/etc" /etc && shift && '
                 'exec "$@"')


def kueue_binary() -> str:
    """The built controller; skips the test (with the command to build it) when missing."""
    try:
        return tool("kueue")
    except ToolsMissing as exc:
        pytest.skip(f"{exc}")


def kueue_crds() -> Path:
    """Kueue's CRDs, as the build script installs them from the kueue module."""
    return tools_bin_dir().parent / "share" / "kueue-crds"


class KueueController:
    """Kueue on `cluster`: start() installs the CRDs and runs the controller until stop()."""

    def __init__(self, cluster: Cluster, workdir: Path, owner_token: str) -> None:
        self.cluster = cluster
        self.dir = workdir / f"kueue-{cluster.name}"
        self.owner_token = owner_token
        self.health_port = free_port()
        self.process: ManagedProcess | None = None

    def start(self, timeout: float = 120.0) -> KueueController:
        binary = kueue_binary()
        if shutil.which("unshare") is None:
            pytest.skip("unshare (util-linux) is needed to run Kueue without writing to /etc")
        self.cluster.kubectl("apply", "--server-side", "-f", str(kueue_crds()))
        wait("Kueue's CRDs established", lambda: _established(self.cluster), 60.0)
        self.cluster.kubectl("create", "namespace", "kueue-system", check=False)
        config = self._write_files()
        argv = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", _IN_NAMESPACE,
                "sh", str(self.dir / "etc"), binary, f"--config={config}"]
        env = {"KUBECONFIG": str(self.cluster.kubeconfig), "PATH": "/usr/bin:/bin"}
        self.process = ManagedProcess(f"kueue-{self.cluster.name}", argv,
                                      self.dir / "kueue.log", self.owner_token, env=env,
                                      cwd=self.dir).start()
        wait(f"Kueue on {self.cluster.name} ready", self._ready, timeout,
             diagnostics=lambda: f"\n--- kueue log ---\n{self.log_tail()}")
        return self

    def _write_files(self) -> Path:
        """Serving certificates (webhook server and metrics; no client calls them) and the
        controller's configuration file."""
        ca = CertificateAuthority(f"deeprad-test-kueue-{self.cluster.name}")
        serving = ca.issue("kueue", dns_names=("localhost",), ip_addresses=("127.0.0.1",),
                           server=True)
        serving.write(self.dir / "webhook-certs", "tls")
        serving.write(self.dir / "etc" / "kueue" / "metrics" / "certs", "tls")
        config = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
            "namespace": "kueue-system",
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.health_port}"},
            "metrics": {"bindAddress": "0"},  # not scraped by these tests
            "webhook": {"host": "127.0.0.1", "port": free_port(),
                        "certDir": str(self.dir / "webhook-certs")},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "manageJobsWithoutQueueName": False,
            "integrations": {"frameworks": ["batch/job"]},
            # Its aggregated API server would need a port and certificates of its own.
            "featureGates": {"VisibilityOnDemand": False},
        }
        path = self.dir / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def _ready(self) -> bool:
        assert self.process is not None
        if not self.process.alive():
            pytest.fail(f"Kueue on {self.cluster.name} exited:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/readyz",
                                        timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def add_queue(self, namespace: str, name: str, gpus: int = 1, cpu: str = "16",
                  memory: str = "64Gi") -> None:
        """A LocalQueue `name` in `namespace` whose ClusterQueue (also `name`) admits Jobs
        within `gpus` GPUs (and `cpu`, `memory`): the hospital's quota."""
        quota = {"cpu": cpu, "memory": memory, GPU: str(gpus)}
        self.apply(
            {"apiVersion": KUEUE_API, "kind": "ResourceFlavor", "metadata": {"name": FLAVOR}},
            {"apiVersion": KUEUE_API, "kind": "ClusterQueue", "metadata": {"name": name},
             "spec": {"namespaceSelector": {}, "resourceGroups": [{
                 "coveredResources": list(quota),
                 "flavors": [{"name": FLAVOR, "resources": [
                     {"name": r, "nominalQuota": q} for r, q in quota.items()]}]}]}},
            {"apiVersion": KUEUE_API, "kind": "LocalQueue",
             "metadata": {"name": name, "namespace": namespace},
             "spec": {"clusterQueue": name}})
        wait(f"ClusterQueue {name} active", lambda: _active(self.cluster, name), 60.0,
             diagnostics=lambda: f"\n--- kueue log ---\n{self.log_tail()}")

    def apply(self, *objects: dict[str, Any]) -> None:
        self.cluster.kubectl("apply", "-f", "-",
                             input=json.dumps({"apiVersion": "v1", "kind": "List",
                                               "items": list(objects)}))

    def workloads(self, namespace: str) -> list[dict[str, Any]]:
        out = self.cluster.kubectl("get", "workloads.kueue.x-k8s.io", "-n", namespace,
                                   "-o", "json")
        return list(json.loads(out.stdout).get("items") or ())

    def log_tail(self, lines: int = 60) -> str:
        return self.process.log_tail(lines) if self.process else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def _active(cluster: Cluster, name: str) -> bool:
    out = cluster.kubectl("get", "clusterqueues.kueue.x-k8s.io", name, "-o", "json",
                          check=False)
    if out.returncode != 0:
        return False
    conditions = (json.loads(out.stdout).get("status") or {}).get("conditions") or ()
    return any(c["type"] == "Active" and c["status"] == "True" for c in conditions)


def _established(cluster: Cluster) -> bool:
    """Every Kueue CRD serves (kubectl wait fails on a CRD whose status is not written yet)."""
    out = cluster.kubectl("get", "crd", "-o", "json", check=False)
    if out.returncode != 0:
        return False
    crds = [c for c in json.loads(out.stdout).get("items") or ()
            if c["spec"]["group"] == "kueue.x-k8s.io"]
    return bool(crds) and all(
        any(c["type"] == "Established" and c["status"] == "True"
            for c in (crd.get("status") or {}).get("conditions") or ()) for crd in crds)
