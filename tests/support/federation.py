"""A federation on loopback for e2e tests: the hub operator on the hub cluster and one site agent
per hospital, each on a hospital cluster, with a real S3 server, real keys and real Secrets.

Setup follows the README's steps: generate keys, `deeprad site register` each hospital (the
Secret goes to its own cluster, the HospitalSite to the hub), give the hub its store and key
Secrets and the hub chart's admission policies, start the operator, hand each agent a
token-based kubeconfig for its hub namespace.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from deeprad_processes import OperatorProcess, wait

from deeprad.core.data.phantoms import DEFAULT_PROFILES
from deeprad.core.identity import Identity
from deeprad.devenv.cluster import Cluster
from deeprad.devenv.kubeconfig import kubeconfig_dict, write_kubeconfig
from deeprad.devenv.s3_server import S3Server
from deeprad.operator.render.admission import ADMISSION_DIR

ROOT = Path(__file__).resolve().parents[2]
PLURALS = ("hospitalsites", "federatedstudies", "federatedrounds", "sitetasks")
BUCKET = "deeprad"
JOBS_NAMESPACE = "deeprad-system"
TRAINING_NAMESPACE = "deeprad-training"
HUB_IDENTITY_SECRET = "deeprad-hub-identity"
STORE_SECRET = "deeprad-store"
SAMPLES_PER_SITE = 240


@dataclass
class SitePlan:
    """One hospital: its name, the cluster it runs on, its data profile."""

    name: str
    cluster: Cluster
    profile: int
    namespace: str = TRAINING_NAMESPACE
    dataset: dict[str, Any] | None = None  # the agent's training.dataset; None: phantoms
    data: dict[str, Any] | None = None  # the HospitalSite's spec.data; None: 2D MRI slices


@dataclass
class Federation:
    hub: Cluster
    s3: S3Server
    workdir: Path
    owner_token: str
    operator: OperatorProcess
    sites: dict[str, SitePlan]
    agents: dict[str, OperatorProcess] = field(default_factory=dict)
    hub_public: Identity | None = None

    def get(self, *args: str, cluster: Cluster | None = None) -> dict[str, Any] | None:
        out = (cluster or self.hub).kubectl("get", *args, "-o", "json", check=False)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def processes(self) -> list[OperatorProcess]:
        return [self.operator, *self.agents.values()]

    def wait(self, what: str, check: Any, timeout: float = 120.0) -> Any:
        return wait(what, check, timeout, *self.processes(), interval=0.5)

    def store_json(self, key: str) -> dict[str, Any]:
        return read_json(self.s3, BUCKET, key)

    def stop(self) -> None:
        for proc in self.processes():
            proc.stop()


def read_json(s3: S3Server, bucket: str, key: str) -> dict[str, Any]:
    """A JSON object from the store, as the root account reads it."""
    response = s3.client().get_object(bucket, key)
    try:
        return dict(json.loads(response.read()))
    finally:
        response.close()
        response.release_conn()


def _deeprad(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "deeprad.cli", *args], capture_output=True,
                         text=True, check=True, cwd="/")
    return out.stdout


def start_federation(hub: Cluster, sites: list[SitePlan], s3: S3Server, workdir: Path,
                     owner_token: str) -> Federation:
    """CRDs, the hub chart's admission policies, keys, Secrets, HospitalSites, the hub operator
    and every site agent, all Ready."""
    fed = start_hub(hub, s3, workdir, owner_token)
    hub_signing = (workdir / "keys" / "hub" / "signing.pub").read_text().strip()
    for site in sites:
        fed.sites[site.name] = site
        add_site(fed, site, workdir / "keys", hub_signing)
    for site in sites:
        fed.wait(f"HospitalSite {site.name} Ready", lambda s=site.name: site_ready(fed, s))
    return fed


def start_hub(hub: Cluster, s3: S3Server, workdir: Path, owner_token: str) -> Federation:
    """A hub without sites: CRDs, the hub chart's admission policies, fresh hub keys, their and
    the store's Secrets, and the hub operator running rounds against the S3 server."""
    hub.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    # The chart's files, not a copy: the agents here renew their Leases under the same policy.
    # --force-conflicts: tests share the hub, and an earlier one may have applied the chart's
    # rendering of the same policies under another field manager.
    hub.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ADMISSION_DIR))
    hub.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                *(f"crd/{p}.deeprad.io" for p in PLURALS))
    s3.create_bucket(BUCKET)
    keys = workdir / "keys"
    _deeprad("keys", "generate", "--out", str(keys / "hub"), "--name", "hub", "--role", "hub")
    public = keys / "hub-public"  # what the operator gets: public files only
    public.mkdir(parents=True, exist_ok=True)
    for name in ("signing.pub", "key-agreement.pub", "name", "role"):
        shutil.copy(keys / "hub" / name, public / name)
    hub.kubectl("create", "namespace", JOBS_NAMESPACE, check=False)
    for secret in (HUB_IDENTITY_SECRET, STORE_SECRET):  # a shared hub's, from an earlier hub
        hub.kubectl("-n", JOBS_NAMESPACE, "delete", "secret", secret, "--ignore-not-found")
    hub.kubectl("-n", JOBS_NAMESPACE, "create", "secret", "generic", HUB_IDENTITY_SECRET,
                *(f"--from-file={keys / 'hub' / f}" for f in
                  ("signing.key", "key-agreement.key", "name", "role")), check=False)
    hub.kubectl("-n", JOBS_NAMESPACE, "create", "secret", "generic", STORE_SECRET,
                f"--from-literal=access-key={s3.root.access_key}",
                f"--from-literal=secret-key={s3.root.secret_key}", check=False)
    store = f"s3://{BUCKET}?endpoint={s3.endpoint}&secure=false"
    operator = OperatorProcess("hub-operator", "hub", [
        "--kubeconfig", str(hub.kubeconfig), "--site-interval", "1", "--study-interval", "1",
        "--round-interval", "1", "--store", store, "--jobs-namespace", JOBS_NAMESPACE,
        "--job-image", "deeprad:test", "--store-credentials-secret", STORE_SECRET,
        "--hub-identity-secret", HUB_IDENTITY_SECRET, "--hub-keys", str(public),
        "--record-study-creator"],  # the hub chart's policies are applied above
        workdir / "hub-operator", owner_token,
        env={"DEEPRAD_S3_ACCESS_KEY": s3.root.access_key,
             "DEEPRAD_S3_SECRET_KEY": s3.root.secret_key})
    fed = Federation(hub, s3, workdir, owner_token, operator, {})
    operator.start()
    return fed


def register_site(fed: Federation, site: SitePlan, keys: Path,
                  connection: dict[str, Any] | None = None,
                  study_namespaces: tuple[str, ...] = ("*",)) -> None:
    """Keys, `deeprad site register`, the HospitalSite on the hub, the Secret on its cluster.
    The site serves `study_namespaces` (every namespace by default: the tests make theirs on
    the fly)."""
    folder = keys / site.name
    _deeprad("keys", "generate", "--out", str(folder), "--name", site.name)
    served = [arg for ns in study_namespaces for arg in ("--study-namespace", ns)]
    docs = list(yaml.safe_load_all(_deeprad("site", "register", site.name, "--keys",
                                            str(folder), "--namespace", site.namespace,
                                            *served)))
    secret = next(d for d in docs if d["kind"] == "Secret")
    hsite = next(d for d in docs if d["kind"] == "HospitalSite")
    hsite["spec"]["data"] = site.data or {"modality": "mri", "labels": ["normal", "tumor"],
                                          "sampleCount": SAMPLES_PER_SITE}
    hsite["spec"]["connection"] = connection or {"mode": "pull", "heartbeatTimeout": "30s"}
    hsite["spec"]["limits"] = {"maxConcurrentTasks": 2}  # the dropout test runs two rounds
    fed.hub.kubectl("apply", "-f", "-", input=json.dumps(hsite))
    site.cluster.kubectl("create", "namespace", site.namespace, check=False)
    site.cluster.kubectl("apply", "-f", "-", input=json.dumps(secret))


def agent_config(site: SitePlan, hub_signing: str, s3: S3Server) -> dict[str, Any]:
    """The agent configuration the site chart would render: phantom data of its profile, and
    the loopback S3 server as the one store its presigned URLs may lead to."""
    profile = DEFAULT_PROFILES[site.profile % len(DEFAULT_PROFILES)]
    return {
        "site": site.name, "hubSigningKey": hub_signing,
        "store": {"endpoint": s3.url},
        "training": {
            "namespace": site.namespace, "image": "deeprad:test",
            "identitySecret": "deeprad-site-identity",
            "dataset": site.dataset or {"kind": "phantom", "options": {
                "profile": profile.as_dict(), "samples": SAMPLES_PER_SITE,
                "seed": 1000 + site.profile}},
            "resources": {"cpu": "1", "memory": "2Gi"},
        },
        "heartbeatSeconds": 2, "pollSeconds": 1,
    }


def add_site(fed: Federation, site: SitePlan, keys: Path, hub_signing: str,
             heartbeat_timeout: str = "30s") -> None:
    """Register a pull-mode hospital and start its agent with a token for its hub namespace."""
    register_site(fed, site, keys, {"mode": "pull", "heartbeatTimeout": heartbeat_timeout})
    ns = f"deeprad-site-{site.name}"
    fed.wait(f"ServiceAccount deeprad-agent in {ns}",
             lambda: fed.get("serviceaccount", "deeprad-agent", "-n", ns))
    token = fed.hub.kubectl("create", "token", "deeprad-agent", "-n", ns,
                            "--duration", "24h").stdout.strip()
    ca = (fed.hub.dir / "pki" / "ca.crt").read_bytes()
    hub_kubeconfig = write_kubeconfig(fed.workdir / site.name / "hub.kubeconfig", kubeconfig_dict(
        f"hub-{site.name}", fed.hub.server, ca, token=token))
    config_path = fed.workdir / site.name / "agent.yaml"
    config_path.write_text(yaml.safe_dump(agent_config(site, hub_signing, fed.s3)))
    agent = OperatorProcess(f"agent-{site.name}", "site", [
        "--config", str(config_path), "--hub-kubeconfig", str(hub_kubeconfig),
        "--kubeconfig", str(site.cluster.kubeconfig)], fed.workdir / site.name,
        fed.owner_token)
    fed.agents[site.name] = agent.start()


def site_ready(fed: Federation, site: str) -> bool:
    obj = fed.get("hospitalsite", site) or {}
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in (obj.get("status") or {}).get("conditions") or ())


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or ():
        if c["type"] == type_:
            return dict(c)
    return {}


def items(fed: Federation, *args: str, cluster: Cluster | None = None
          ) -> Iterator[dict[str, Any]]:
    yield from (fed.get(*args, cluster=cluster) or {}).get("items") or ()
