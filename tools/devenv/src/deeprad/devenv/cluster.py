"""One real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and the node agent, with its own CA, service-account keys and admin kubeconfig.

Several clusters run side by side; each lives in its own folder and on its own free ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deeprad.devenv import binaries
from deeprad.devenv.kube_rest import ApiError, KubeClient
from deeprad.devenv.kubeconfig import kubeconfig_dict, write_kubeconfig
from deeprad.devenv.node_config import AgentConfig, NodeSpec, default_nodes
from deeprad.devenv.pki import CertificateAuthority, service_account_key_pair
from deeprad.devenv.ports import free_port
from deeprad.devenv.processes import ManagedProcess, new_owner_token, wait_until

SERVICE_CIDR = "10.0.0.0/24"
_API_SANS_DNS = ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 "kubernetes.default.svc.cluster.local")


@dataclass
class ClusterPorts:
    """The loopback ports one cluster listens on."""

    etcd_client: int = field(default_factory=free_port)
    etcd_peer: int = field(default_factory=free_port)
    apiserver: int = field(default_factory=free_port)
    controller_manager: int = field(default_factory=free_port)
    scheduler: int = field(default_factory=free_port)


class ClusterStartError(RuntimeError):
    """A component did not come up; the message carries the tail of its log."""


class Cluster:
    """A loopback Kubernetes cluster; start() brings it up, stop() leaves nothing behind."""

    def __init__(
        self,
        name: str,
        base_dir: Path,
        nodes: list[NodeSpec] | None = None,
        owner_token: str | None = None,
    ) -> None:
        self.name = name
        self.dir = base_dir / name
        self.nodes = default_nodes(name) if nodes is None else nodes
        self.owner_token = owner_token or new_owner_token()
        self.ports = ClusterPorts()
        self.pki = self.dir / "pki"
        self.logs = self.dir / "logs"
        self.kubeconfig = self.dir / "admin.kubeconfig"
        self.server = f"https://127.0.0.1:{self.ports.apiserver}"
        self.processes: dict[str, ManagedProcess] = {}
        self.started_seconds: float | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> Cluster:
        """Start every component and wait until Pods can be scheduled and run.

        A free port can be taken by someone else before a component binds it; that start is
        retried once on fresh ports.
        """
        begin = time.monotonic()
        try:
            self._start_once(timeout)
        except ClusterStartError as exc:
            if "address already in use" not in str(exc):
                raise
            self.ports = ClusterPorts()
            self.server = f"https://127.0.0.1:{self.ports.apiserver}"
            self._start_once(timeout)
        self.started_seconds = time.monotonic() - begin
        return self

    def _start_once(self, timeout: float) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.logs.mkdir(parents=True)
        try:
            self._write_pki()
            self._start("etcd", self._etcd_args())
            wait_until(self._etcd_healthy, timeout, f"{self.name}: etcd health")
            self._start("kube-apiserver", self._apiserver_args())
            wait_until(self._apiserver_ready, timeout, f"{self.name}: kube-apiserver /readyz",
                       interval=0.2)
            self._start("kube-controller-manager", self._controller_manager_args())
            self._start("kube-scheduler", self._scheduler_args())
            self._start("node-agent", self._node_agent_args(), binary=sys.executable,
                        env=python_env())
            client = self.client()
            wait_until(lambda: self._default_service_account(client), timeout,
                       f"{self.name}: controller-manager (default ServiceAccount)", interval=0.2)
            wait_until(self._scheduler_healthy, timeout, f"{self.name}: kube-scheduler /healthz")
            wait_until(lambda: self._nodes_ready(client), timeout,
                       f"{self.name}: nodes Ready", interval=0.2)
        except Exception as exc:
            detail = self._failure_detail()
            self.stop()
            message = f"cluster {self.name} failed to start: {exc}\n{detail}"
            raise ClusterStartError(message) from exc

    def stop(self) -> None:
        """Stop every component (node agent first, so pods end cleanly), etcd last."""
        order = ["node-agent", "kube-scheduler", "kube-controller-manager", "kube-apiserver",
                 "etcd"]
        for name in order:
            proc = self.processes.pop(name, None)
            if proc is not None:
                proc.stop(grace=10.0 if name == "node-agent" else 5.0)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- use -----------------------------------------------------------------------------------

    def client(self) -> KubeClient:
        """A dict-based API client with the admin (system:masters) identity."""
        return KubeClient(self.kubeconfig)

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; raises with stderr when check and it fails."""
        result = subprocess.run(
            [binaries.tool("kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input, capture_output=True, text=True, timeout=timeout,
            env=binaries.tool_env(),
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n"
                               f"{result.stderr}{result.stdout}")
        return result

    def pids(self) -> dict[str, int]:
        """Process-group id of each running component."""
        return {name: p.pid for name, p in self.processes.items() if p.alive()}

    def info(self) -> dict[str, Any]:
        """A JSON-ready summary: kubeconfig, context, server and ports."""
        return {
            "name": self.name,
            "kubeconfig": str(self.kubeconfig),
            "context": self.name,
            "server": self.server,
            "etcd": f"http://127.0.0.1:{self.ports.etcd_client}",
            "nodes": [n.name for n in self.nodes],
            "pids": self.pids(),
        }

    # -- pieces --------------------------------------------------------------------------------

    def _write_pki(self) -> None:
        ca = CertificateAuthority(f"deeprad-devenv-{self.name}-ca")
        ca.pair.write(self.pki, "ca")
        ca.issue(
            "kube-apiserver", dns_names=_API_SANS_DNS, ip_addresses=("127.0.0.1", "10.0.0.1"),
            server=True,
        ).write(self.pki, "apiserver")
        ca.issue("kube-apiserver-kubelet-client", organizations=("system:masters",),
                 client=True).write(self.pki, "apiserver-kubelet-client")
        node_names = tuple(n.name for n in self.nodes)
        ca.issue(f"system:node:{self.name}", organizations=("system:nodes",),
                 dns_names=("localhost", *node_names), ip_addresses=("127.0.0.1",),
                 server=True).write(self.pki, "node-agent")
        # Front proxy (requestheader) PKI: lets aggregated API servers trust the apiserver.
        front_ca = CertificateAuthority(f"deeprad-devenv-{self.name}-front-proxy-ca")
        front_ca.pair.write(self.pki, "front-proxy-ca")
        front_ca.issue("front-proxy-client", client=True).write(self.pki, "front-proxy-client")
        sa_key, sa_pub = service_account_key_pair()
        (self.pki / "sa.key").write_bytes(sa_key)
        (self.pki / "sa.pub").write_bytes(sa_pub)
        users = {
            "admin": ("deeprad-admin", ("system:masters",)),
            "controller-manager": ("system:kube-controller-manager", ()),
            "scheduler": ("system:kube-scheduler", ()),
        }
        for stem, (cn, orgs) in users.items():
            pair = ca.issue(cn, organizations=orgs, client=True)
            config = kubeconfig_dict(self.name, self.server, ca.cert_pem, user=pair)
            write_kubeconfig(self.dir / f"{stem}.kubeconfig", config)

    def _start(self, name: str, args: list[str], binary: str | None = None,
               env: dict[str, str] | None = None) -> None:
        argv = [binary or binaries.tool(name), *args]
        proc = ManagedProcess(name, argv, self.logs / f"{name}.log", self.owner_token,
                              env=env, cwd=self.dir)
        self.processes[name] = proc.start()

    def _etcd_args(self) -> list[str]:
        p = self.ports
        peer = f"http://127.0.0.1:{p.etcd_peer}"
        client = f"http://127.0.0.1:{p.etcd_client}"
        return [
            f"--name={self.name}", f"--data-dir={self.dir / 'etcd'}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={self.name}={peer}",
            "--unsafe-no-fsync=true",  # test data only; fsync dominates start-up on slow disks
            "--log-level=warn",
        ]

    def _apiserver_args(self) -> list[str]:
        pki = self.pki
        return [
            f"--etcd-servers=http://127.0.0.1:{self.ports.etcd_client}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.ports.apiserver}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--service-account-issuer={self.server}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction,PodSecurity",
            "--allow-privileged=true",
            # The `kubernetes` Service endpoints may not point at loopback; nothing needs them.
            "--endpoint-reconciler-type=none",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={pki / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
            f"--cert-dir={self.dir / 'apiserver-certs'}",
            "--profiling=false",
        ]

    def _controller_manager_args(self) -> list[str]:
        kubeconfig = self.dir / "controller-manager.kubeconfig"
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={self.ports.controller_manager}",
            f"--root-ca-file={self.pki / 'ca.crt'}",
            f"--service-account-private-key-file={self.pki / 'sa.key'}",
            "--use-service-account-credentials=true",
            f"--cluster-signing-cert-file={self.pki / 'ca.crt'}",
            f"--cluster-signing-key-file={self.pki / 'ca.key'}",
            "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
            "--leader-elect=false",  # one instance; election only delays start-up
            "--kube-api-qps=100", "--kube-api-burst=200",
            "--profiling=false",
        ]

    def _scheduler_args(self) -> list[str]:
        kubeconfig = self.dir / "scheduler.kubeconfig"
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={self.ports.scheduler}",
            "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
            "--leader-elect=false",
            "--profiling=false",
        ]

    def _node_agent_args(self) -> list[str]:
        config = AgentConfig(
            cluster=self.name,
            kubeconfig=str(self.kubeconfig),
            api_host="127.0.0.1",
            api_port=self.ports.apiserver,
            state_dir=str(self.dir / "node-agent"),
            tls_cert=str(self.pki / "node-agent.crt"),
            tls_key=str(self.pki / "node-agent.key"),
            client_ca=str(self.pki / "ca.crt"),
            owner_token=self.owner_token,
            nodes=self.nodes,
        )
        path = config.write(self.dir / "node-agent.json")
        return ["-m", "deeprad.devenv.node_agent", f"--config={path}"]

    # -- readiness -----------------------------------------------------------------------------

    def _check_alive(self) -> None:
        for name, proc in self.processes.items():
            if not proc.alive():
                raise ClusterStartError(f"{name} exited:\n{proc.log_tail()}")

    def _etcd_healthy(self) -> bool:
        self._check_alive()
        try:
            url = f"http://127.0.0.1:{self.ports.etcd_client}/health"
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(json.load(resp).get("health") == "true")
        except OSError:
            return False

    def _https_ok(self, port: int, path: str) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        if port != self.ports.apiserver:
            ctx.check_hostname = False  # self-signed serving certs of kcm and scheduler
            ctx.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", timeout=2,
                                        context=ctx) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def _apiserver_ready(self) -> bool:
        self._check_alive()
        return self._https_ok(self.ports.apiserver, "/readyz")

    def _scheduler_healthy(self) -> bool:
        self._check_alive()
        return self._https_ok(self.ports.scheduler, "/healthz")

    def _default_service_account(self, client: KubeClient) -> bool:
        self._check_alive()
        try:
            client.get("/api/v1/namespaces/default/serviceaccounts/default")
            return True
        except (ApiError, OSError):
            return False

    def _nodes_ready(self, client: KubeClient) -> bool:
        self._check_alive()
        try:
            items = client.get("/api/v1/nodes")["items"]
        except (ApiError, OSError):
            return False
        # Ready, and the node lifecycle controller has lifted the not-ready taint that
        # admission put on the new Node; before that the scheduler would skip the node.
        ready = {
            n["metadata"]["name"]
            for n in items
            if any(c["type"] == "Ready" and c["status"] == "True"
                   for c in n.get("status", {}).get("conditions", []))
            and not any(t["key"].startswith("node.kubernetes.io/")
                        for t in n.get("spec", {}).get("taints", []))
        }
        return all(n.name in ready for n in self.nodes)

    def _failure_detail(self) -> str:
        parts = []
        for name, proc in self.processes.items():
            state = "running" if proc.alive() else "exited"
            parts.append(f"--- {name} ({state}), {proc.log_path}:\n{proc.log_tail(15)}")
        return "\n".join(parts)


def start_clusters(clusters: list[Cluster], timeout: float = 180.0) -> list[Cluster]:
    """Start clusters in parallel; if one fails, stop all and re-raise."""
    with ThreadPoolExecutor(max_workers=max(1, len(clusters))) as pool:
        futures = [pool.submit(c.start, timeout) for c in clusters]
        errors = []
        for f in futures:
            try:
                f.result()
            except Exception as exc:
                errors.append(exc)
    if errors:
        for c in clusters:
            with contextlib.suppress(Exception):
                c.stop()
        raise errors[0]
    return clusters


def python_env() -> dict[str, str]:
    """Environment for the node agent: ours, so `deeprad` imports the same way.

    The checkout root is deliberately not put on PYTHONPATH: its `operator/` folder would
    shadow the standard library's `operator` module (the package maps it to deeprad.operator).
    """
    return dict(os.environ)
