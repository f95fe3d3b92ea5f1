"""The devenv node agent: stands in for kubelet and a container runtime on machines without
containers. Test and development infrastructure, not product.

One agent process serves all simulated nodes of one cluster. It
- registers each Node with capacity (cpu, memory, pods, nvidia.com/gpu), GPU discovery labels,
  addresses (127.0.0.1) and its log endpoint in status.daemonEndpoints;
- keeps the Node's Lease (kube-node-lease) and Ready condition fresh;
- watches Pods bound to its nodes and runs each as local processes (pod_worker.py: images map to
  the local install, volumes to folders, mount paths are rewritten, see pod_volumes.py);
- serves container logs to the API server (node_log_server.py);
- provisions folder-backed PersistentVolumes for claims (pvc_provisioner.py).

It authenticates with the cluster's admin kubeconfig. Run: `python -m deeprad.devenv.node_agent
--config node-agent.json` (the cluster harness writes the file).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from deeprad.devenv.container_process import now_rfc3339
from deeprad.devenv.kube_rest import ApiError, KubeClient
from deeprad.devenv.node_config import AgentConfig, NodeSpec
from deeprad.devenv.node_log_server import LogSource, start_log_server
from deeprad.devenv.pod_worker import PodWorker
from deeprad.devenv.ports import free_port
from deeprad.devenv.pvc_provisioner import PvcProvisioner, ensure_storage_class

JSON = dict[str, Any]
log = logging.getLogger("deeprad.devenv.node_agent")

KUBELET_VERSION = "v1.37.2"
LEASE_SECONDS = 40
LEASE_RENEW_SECONDS = 10.0
STATUS_SECONDS = 20.0


def _micro_time() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


class NodeAgent:
    """Registers nodes, runs their pods, serves their logs; stop() ends every pod."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.client = KubeClient(Path(config.kubeconfig))
        self.state_dir = Path(config.state_dir)
        self.pods_dir = self.state_dir / "pods"
        self.pods_dir.mkdir(parents=True, exist_ok=True)
        self.nodes = {n.name: n for n in config.nodes}
        self.ports = {n.name: free_port() for n in config.nodes}
        self.stop_event = threading.Event()
        self._workers: dict[str, PodWorker] = {}
        self._lock = threading.Lock()
        self._gpus_in_use: dict[str, set[int]] = {n.name: set() for n in config.nodes}
        self._started = now_rfc3339()

    # -- pods ----------------------------------------------------------------------------------

    def find_pod(self, namespace: str, name: str) -> LogSource | None:
        """The worker of a pod on this agent, for the log server."""
        with self._lock:
            return next((w for w in self._workers.values()
                         if w.ns == namespace and w.pod_name == name), None)

    def forget(self, uid: str) -> None:
        """Called by a worker when its pod is gone."""
        with self._lock:
            self._workers.pop(uid, None)

    def allocate_gpus(self, node: str, count: int) -> list[int]:
        """Reserve `count` GPU indices on node (the scheduler already checked capacity)."""
        with self._lock:
            free = [i for i in range(self.nodes[node].gpus) if i not in self._gpus_in_use[node]]
            ids = free[:count]
            self._gpus_in_use[node].update(ids)
            return ids

    def release_gpus(self, node: str, ids: list[int]) -> None:
        """Return GPU indices reserved by allocate_gpus."""
        with self._lock:
            self._gpus_in_use[node].difference_update(ids)

    def _on_pod(self, pod: JSON | None, uid: str) -> None:
        with self._lock:
            worker = self._workers.get(uid)
            if worker is None and pod is not None:
                if pod.get("status", {}).get("phase") in ("Succeeded", "Failed") and \
                        not pod["metadata"].get("deletionTimestamp"):
                    return  # finished before this agent started; nothing to run
                worker = PodWorker(self, pod)
                self._workers[uid] = worker
                worker.start()
                return
        if worker is not None:
            worker.update(pod)

    def _watch_pods(self) -> None:
        path = "/api/v1/pods"
        selector = "spec.nodeName!="
        while not self.stop_event.is_set():
            try:
                listing = self.client.get(path, fieldSelector=selector)
                seen = set()
                for pod in listing["items"]:
                    if pod["spec"].get("nodeName") in self.nodes:
                        seen.add(pod["metadata"]["uid"])
                        self._on_pod(pod, pod["metadata"]["uid"])
                with self._lock:
                    vanished = [uid for uid in self._workers if uid not in seen]
                for uid in vanished:
                    self._on_pod(None, uid)
                rv = listing["metadata"]["resourceVersion"]
                for event in self.client.watch(path, rv, fieldSelector=selector):
                    if self.stop_event.is_set():
                        return
                    obj = event["object"]
                    if event["type"] == "BOOKMARK":
                        continue
                    if event["type"] == "ERROR":
                        break  # usually 410 Gone: relist
                    if obj["spec"].get("nodeName") not in self.nodes:
                        continue
                    uid = obj["metadata"]["uid"]
                    self._on_pod(None if event["type"] == "DELETED" else obj, uid)
            except (ApiError, OSError, ValueError) as exc:
                log.warning("pod watch: %s; relisting", exc)
                self.stop_event.wait(1.0)

    # -- nodes ---------------------------------------------------------------------------------

    def _node_status(self, spec: NodeSpec) -> JSON:
        capacity = {"cpu": spec.cpu, "memory": spec.memory, "pods": str(spec.pods),
                    "ephemeral-storage": "100Gi"}
        if spec.gpus:
            capacity["nvidia.com/gpu"] = str(spec.gpus)
        now = now_rfc3339()

        def cond(kind: str, status: str, reason: str, message: str) -> JSON:
            return {"type": kind, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": now, "lastTransitionTime": self._started}

        return {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "ok"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "ok"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "ok"),
                cond("Ready", "True", "KubeletReady", "deeprad devenv node agent is posting "
                     "ready status"),
            ],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": spec.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.ports[spec.name]}},
            "nodeInfo": {
                "machineID": spec.name, "systemUUID": spec.name, "bootID": self._started,
                "kernelVersion": "devenv", "osImage": "deeprad devenv (local processes)",
                "containerRuntimeVersion": "devenv://0.1", "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64",
            },
        }

    def _register(self, spec: NodeSpec) -> None:
        body = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": spec.name, "labels": spec.all_labels(),
                         "annotations": {"deeprad.io/devenv-agent": self.config.cluster}},
            "spec": {"taints": spec.taints} if spec.taints else {},
            "status": self._node_status(spec),
        }
        try:
            self.client.create("/api/v1/nodes", body)
        except ApiError as exc:
            if exc.status != 409:
                raise
            self.client.merge_patch(f"/api/v1/nodes/{spec.name}",
                                    {"metadata": {"labels": spec.all_labels()}})
        self._post_status(spec)

    def _post_status(self, spec: NodeSpec) -> None:
        self.client.merge_patch(f"/api/v1/nodes/{spec.name}/status",
                                {"status": self._node_status(spec)})

    def _renew_lease(self, spec: NodeSpec) -> None:
        path = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
        body: JSON = {"spec": {"holderIdentity": spec.name, "leaseDurationSeconds": LEASE_SECONDS,
                         "renewTime": _micro_time()}}
        try:
            self.client.merge_patch(f"{path}/{spec.name}", body)
        except ApiError as exc:
            if exc.status != 404:
                raise
            node = self.client.get(f"/api/v1/nodes/{spec.name}")
            body |= {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {
                "name": spec.name, "namespace": "kube-node-lease",
                "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": spec.name,
                                     "uid": node["metadata"]["uid"]}]}}
            self.client.create(path, body)

    def _heartbeat(self) -> None:
        last_status = time.monotonic()
        while not self.stop_event.wait(LEASE_RENEW_SECONDS):
            post_status = time.monotonic() - last_status >= STATUS_SECONDS
            for spec in self.nodes.values():
                try:
                    self._renew_lease(spec)
                    if post_status:
                        self._post_status(spec)
                except (ApiError, OSError) as exc:
                    log.warning("heartbeat of %s: %s", spec.name, exc)
            if post_status:
                last_status = time.monotonic()

    # -- run -----------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until stop_event is set; then stop every pod's processes."""
        servers = [
            start_log_server(self.ports[name], self.find_pod, self.config.tls_cert,
                             self.config.tls_key, self.config.client_ca)
            for name in self.nodes
        ]
        ensure_storage_class(self.client, self.config.storage_class)
        for spec in self.nodes.values():
            self._register(spec)
            self._renew_lease(spec)
        threads = [
            threading.Thread(target=self._watch_pods, name="pod-watch", daemon=True),
            threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True),
            PvcProvisioner(self.client, self.config.storage_class,
                           self.state_dir / "volumes", self.stop_event),
        ]
        for t in threads:
            t.start()
        log.info("node agent for %s serving %s", self.config.cluster, ", ".join(self.nodes))
        self.stop_event.wait()
        with self._lock:
            workers = list(self._workers.values())
        for w in workers:
            w.stop_processes(grace=2.0)
        for server in servers:
            server.shutdown()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m deeprad.devenv.node_agent`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--config", type=Path, required=True, help="agent JSON config")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    agent = NodeAgent(AgentConfig.read(args.config))

    def on_signal(signum: int, frame: object) -> None:
        agent.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
