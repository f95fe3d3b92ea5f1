"""What the node agent is told to run: its nodes, its TLS files and the API server it serves.

Written as JSON by the cluster harness, read by `python -m deeprad.devenv.node_agent`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class NodeSpec:
    """One simulated node: capacity, GPUs and labels."""

    name: str
    cpu: str = "8"
    memory: str = "32Gi"
    pods: int = 110
    gpus: int = 0
    gpu_product: str = "NVIDIA-A100-SXM4-40GB"
    gpu_memory_mib: int = 40960
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[dict[str, str]] = field(default_factory=list)

    def all_labels(self) -> dict[str, str]:
        """Standard node labels plus GPU discovery labels (as NVIDIA's GPU feature discovery)."""
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "deeprad.io/devenv-node": "true",
        }
        if self.gpus:
            labels |= {
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": self.gpu_product,
                "nvidia.com/gpu.count": str(self.gpus),
                "nvidia.com/gpu.memory": str(self.gpu_memory_mib),
            }
        return labels | self.labels


def default_nodes(cluster: str) -> list[NodeSpec]:
    """One GPU node with two GPUs and one CPU-only node."""
    return [NodeSpec(name=f"{cluster}-gpu-0", gpus=2), NodeSpec(name=f"{cluster}-cpu-0")]


@dataclass(frozen=True)
class AgentConfig:
    """Everything the node agent process needs."""

    cluster: str
    kubeconfig: str
    api_host: str
    api_port: int
    state_dir: str
    tls_cert: str
    tls_key: str
    client_ca: str
    owner_token: str
    nodes: list[NodeSpec]
    storage_class: str = "standard"

    def write(self, path: Path) -> Path:
        """Serialise to JSON at path."""
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def read(cls, path: Path) -> AgentConfig:
        """Load what write() wrote."""
        raw = json.loads(path.read_text())
        raw["nodes"] = [NodeSpec(**n) for n in raw["nodes"]]
        return cls(**raw)
