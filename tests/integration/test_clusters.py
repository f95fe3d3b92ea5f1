"""Hub and hospital clusters are independent control planes with GPU nodes."""

from __future__ import annotations

import json

import pytest

from deeprad.devenv.cluster import Cluster

pytestmark = pytest.mark.integration


def test_each_cluster_has_its_own_gpu_nodes(clusters: dict[str, Cluster]) -> None:
    for name, cluster in clusters.items():
        out = cluster.kubectl("get", "nodes", "-l", "nvidia.com/gpu.present=true", "-o", "json")
        nodes = json.loads(out.stdout)["items"]
        assert [n["metadata"]["name"] for n in nodes] == [f"{name}-gpu-0"]
        node = nodes[0]
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "2"
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"].startswith("NVIDIA-")
        assert node["metadata"]["labels"]["nvidia.com/gpu.count"] == "2"


def test_clusters_do_not_share_state(clusters: dict[str, Cluster]) -> None:
    hub, site = clusters["hub"], clusters["site-1"]
    hub.kubectl("create", "namespace", "only-on-hub")
    assert site.kubectl("get", "namespace", "only-on-hub", check=False).returncode != 0
    assert len({c.server for c in clusters.values()}) == len(clusters)


def test_kubectl_version_reports_the_pinned_release(hub_cluster: Cluster) -> None:
    out = json.loads(hub_cluster.kubectl("version", "-o", "json").stdout)
    assert out["serverVersion"]["gitVersion"] == "v1.37.2"
    assert out["clientVersion"]["gitVersion"] == "v1.37.2"
