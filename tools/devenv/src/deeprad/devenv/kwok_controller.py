"""kwok for scale tests: thousands of fake (GPU) Nodes whose pods only pretend to run.

kwok manages Nodes annotated `kwok.x-k8s.io/node=fake`; the fake nodes carry a taint of the
same key, so the node agent's real pods never land there and a scale test opts in with a
toleration. kwok's default stages make nodes Ready and move pods through Running to completion
(Job pods end Succeeded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deeprad.devenv import binaries
from deeprad.devenv.cluster import Cluster
from deeprad.devenv.ports import free_port
from deeprad.devenv.processes import ManagedProcess

FAKE_KEY = "kwok.x-k8s.io/node"
FAKE_TOLERATION = {"key": FAKE_KEY, "operator": "Exists", "effect": "NoSchedule"}


def fake_gpu_node(name: str, gpus: int = 8, product: str = "NVIDIA-H100-80GB-HBM3"
                  ) -> dict[str, Any]:
    """A Node manifest kwok will manage: GPU capacity, discovery labels, the fake taint."""
    capacity = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {FAKE_KEY: "fake"},
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", "type": "kwok",
                       "nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": product,
                       "nvidia.com/gpu.count": str(gpus)},
        },
        "spec": {"taints": [{"key": FAKE_KEY, "value": "fake", "effect": "NoSchedule"}]},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


class KwokController:
    """The kwok controller attached to one cluster; stop() ends it."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.port = free_port()
        self.process: ManagedProcess | None = None

    def start(self) -> KwokController:
        """Start kwok against the cluster's admin kubeconfig."""
        argv = [
            binaries.tool("kwok"),
            f"--kubeconfig={self.cluster.kubeconfig}",
            f"--manage-nodes-with-annotation-selector={FAKE_KEY}=fake",
            "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{self.port}",
            f"--config={self._config()}",
        ]
        self.process = ManagedProcess("kwok", argv, self.cluster.logs / "kwok.log",
                                      self.cluster.owner_token, cwd=self.cluster.dir).start()
        return self

    def _config(self) -> Path:
        # kwok has no built-in lifecycle: the config holds the upstream Stage manifests
        # (installed by tools/build-tools.sh). An explicit file also keeps ~/.kwok out.
        stages = sorted(binaries.kwok_stages_dir().glob("*.yaml"))
        if not stages:
            raise binaries.ToolsMissing("kwok stages missing; run `make tools`")
        path = self.cluster.dir / "kwok.yaml"
        path.write_text("\n---\n".join(p.read_text() for p in stages))
        return path

    def stop(self) -> None:
        """Stop kwok (the fake objects stay in the API until deleted)."""
        if self.process is not None:
            self.process.stop()
            self.process = None
