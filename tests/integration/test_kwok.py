"""kwok simulates many GPU nodes beside the real ones, for scale tests."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from deeprad.devenv.cluster import Cluster
from deeprad.devenv.kube_wait import condition, wait_for_object
from deeprad.devenv.kwok_controller import FAKE_TOLERATION, KwokController, fake_gpu_node

pytestmark = pytest.mark.integration


def test_fake_gpu_nodes_become_ready_and_complete_jobs(hub_cluster: Cluster) -> None:
    client = hub_cluster.client()
    kwok = KwokController(hub_cluster).start()
    try:
        names = [f"fake-gpu-{i:03d}" for i in range(50)]
        for name in names:
            client.create("/api/v1/nodes", fake_gpu_node(name))

        def all_ready(listing: dict[str, Any]) -> bool:
            ready = {n["metadata"]["name"] for n in listing["items"]
                     if (condition(n, "Ready") or {}).get("status") == "True"}
            return set(names) <= ready

        wait_for_object(client, "/api/v1/nodes?labelSelector=type%3Dkwok", all_ready,
                        timeout=60, what="50 kwok nodes Ready")
        ns = f"t-{uuid.uuid4().hex[:8]}"
        client.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                             "metadata": {"name": ns}})
        job = {
            "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "sim"},
            "spec": {"completions": 20, "parallelism": 20, "template": {"spec": {
                "restartPolicy": "Never",
                "nodeSelector": {"type": "kwok"},
                "tolerations": [FAKE_TOLERATION],
                "containers": [{"name": "train", "image": "trainer",
                                "resources": {"limits": {"nvidia.com/gpu": "8"}}}],
            }}},
        }
        client.create(f"/apis/batch/v1/namespaces/{ns}/jobs", job)
        wait_for_object(client, f"/apis/batch/v1/namespaces/{ns}/jobs/sim",
                        lambda j: (condition(j, "Complete") or {}).get("status") == "True",
                        timeout=120, what="job on kwok nodes Complete")
    finally:
        kwok.stop()
        for node in client.get("/api/v1/nodes?labelSelector=type%3Dkwok")["items"]:
            client.delete(f"/api/v1/nodes/{node['metadata']['name']}")
