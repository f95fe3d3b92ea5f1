"""The site policy on a real API server: the real site agent (observe, decide, act), with the
site chart's own Role on its cluster, keeps its privacy ledger in a ConfigMap and refuses the
tasks its policy forbids, reporting them PolicyViolation and creating no Job.

One cluster plays both sides (the hub namespace deeprad-site-<site> holds the SiteTasks, the
training namespace the agent's Jobs and ledger), as the hub chart's push labs do. The agent
reaches its own cluster with a token for the chart's ServiceAccount, so the chart's RBAC is
what lets it read and write the ledger; on the hub side it uses the admin's kubeconfig
(tests/integration/test_hub_rbac.py covers the site's hub Role).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from redteam import refused

from deeprad.core.identity import Identity
from deeprad.core.layout import StudyLayout
from deeprad.core.privacy import DPSteps, epsilon_of
from deeprad.core.site_policy import LedgerEntry, SitePolicy
from deeprad.core.store.presigned import site_grants
from deeprad.devenv.binaries import tool, tool_env
from deeprad.devenv.cluster import Cluster
from deeprad.devenv.kubeconfig import kubeconfig_dict, write_kubeconfig
from deeprad.operator.api.names import site_namespace
from deeprad.operator.site.agent import SiteAgent
from deeprad.operator.site.config import AgentConfig, AllowedStore, TrainingPlacement
from deeprad.operator.site.decide import RecordPrivacy
from deeprad.operator.site.ledger import LEDGER_CONFIGMAP, ledger_key, read_ledger

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SITE_CHART = ROOT / "helm" / "deeprad-site"
SITE = "polsite"
AGENT_NS = "policy-agent"  # the site chart's release namespace
TRAINING = "policy-training"
STORE = "https://s3.policy.example"
HUB = Identity.generate("hub", "hub").public()
RUN = DPSteps(noise_multiplier=1.0, sample_rate=0.25, steps=40)


def _get(cluster: Cluster, *args: str) -> dict[str, Any] | None:
    out = cluster.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def _chart_rbac(home: Path) -> list[dict[str, Any]]:
    """The site chart's ServiceAccount, Role and RoleBinding, as `helm template` renders them."""
    out = subprocess.run([tool("helm"), "template", SITE, str(SITE_CHART), "-n", AGENT_NS,
                          "--set", f"training.namespace={TRAINING}", "--set",
                          "rbac.readNodes=false"], capture_output=True, text=True, timeout=120,
                         env=tool_env() | {"HOME": str(home)})
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout)
            if d and d["kind"] in ("ServiceAccount", "Role", "RoleBinding")]


@pytest.fixture(scope="module")
def agent(hub_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SiteAgent]:
    cluster, work = hub_cluster, tmp_path_factory.mktemp("site-policy")
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    "crd/sitetasks.deeprad.io")
    for ns in (site_namespace(SITE), AGENT_NS, TRAINING):
        cluster.kubectl("create", "namespace", ns, check=False)
    rbac = _chart_rbac(work)
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(o) for o in rbac))
    account = next(o for o in rbac if o["kind"] == "ServiceAccount")["metadata"]["name"]
    token = cluster.kubectl("create", "token", account, "-n", AGENT_NS, "--duration",
                            "1h").stdout.strip()
    local = write_kubeconfig(work / "local.kubeconfig", kubeconfig_dict(
        "site-local", cluster.server, (cluster.dir / "pki" / "ca.crt").read_bytes(),
        token=token))
    config = AgentConfig(
        site=SITE, store=AllowedStore(endpoint=STORE),
        training=TrainingPlacement(namespace=TRAINING, image="deeprad:test"),
        policy=SitePolicy(studies=["research/*"], require_differential_privacy=True,
                          max_epsilon_per_study=epsilon_of([RUN, RUN], 1e-5)))
    yield SiteAgent(config, hub=kubernetes.config.new_client_from_config(str(cluster.kubeconfig)),
                    local=kubernetes.config.new_client_from_config(str(local)))
    cluster.kubectl("delete", "namespace", site_namespace(SITE), TRAINING, "--wait=false",
                    check=False)


def _task(name: str, namespace: str, study: str) -> dict[str, Any]:
    grants = site_grants(StudyLayout(namespace, study, f"uid-{study}"), 3, SITE,
                         secure_aggregation=False)
    spec: dict[str, Any] = {
        "roundRef": {"namespace": namespace, "name": f"{study}-r3", "uid": f"u-{name}"},
        "study": study, "round": 3, "site": SITE, "model": {"name": "tumor-cnn"},
        "privacy": {"secureAggregation": False,
                    "differentialPrivacy": {"noiseMultiplier": 1.0, "maxGradNorm": 1.0}},
        "parentDigest": "1" * 64,
        "hub": {"name": "hub", "signingKey": HUB.signing_key,
                "keyAgreementKey": HUB.key_agreement_key},
        "objects": [{"key": k, "method": m, "url": f"{STORE}/deeprad/{k}?X-Amz-Signature=1"}
                    for k, m in grants.items()],
        "deadline": "2099-01-01T00:00:00Z", "studyUid": f"uid-{study}"}
    return {"apiVersion": "deeprad.io/v1alpha1", "kind": "SiteTask",
            "metadata": {"name": name, "namespace": site_namespace(SITE)}, "spec": spec}


def _record_two_runs(agent: SiteAgent) -> None:
    """Two finished DP runs of research/brain, recorded as the agent records them (create,
    then replace at the version read), the second twice (a restarted agent)."""
    key = ledger_key("research", "brain")
    for uid, round_no in (("t-1", 1), ("t-2", 2), ("t-2", 2)):
        agent.record_privacy(RecordPrivacy(key, LedgerEntry(task=uid, round=round_no,
                                                              steps=RUN)))


def test_the_agent_keeps_its_ledger_with_the_charts_role(agent: SiteAgent,
                                                         hub_cluster: Cluster) -> None:
    _record_two_runs(agent)
    cm = _get(hub_cluster, "configmap", LEDGER_CONFIGMAP, "-n", TRAINING)
    assert cm is not None
    ledger = read_ledger(cm, "ledger")
    assert [e.task for e in ledger.runs("research", "brain")] == ["t-1", "t-2"]


def test_redteam_the_running_agent_refuses_policy_violations_and_creates_no_job(
        agent: SiteAgent, hub_cluster: Cluster) -> None:
    """A study whose ε at this site is spent and a study from a namespace the site does not
    allow: the whole pass (observe, decide, act) against the API server reports both Failed
    with reason PolicyViolation, and the training namespace holds no Job and no pod."""
    _record_two_runs(agent)  # ε of research/brain now at the ceiling
    tasks = [_task("brain-r3-polsite", "research", "brain"),
             _task("lung-r3-polsite", "elsewhere", "lung")]
    hub_cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(t) for t in tasks))
    agent.sync()
    status = {t["metadata"]["name"]: (_get(hub_cluster, "sitetask", t["metadata"]["name"], "-n",
                                           site_namespace(SITE)) or {}).get("status") or {}
              for t in tasks}
    spent, foreign = status["brain-r3-polsite"], status["lung-r3-polsite"]
    for got in (spent, foreign):
        assert (got.get("state"), got.get("reason")) == ("Failed", "PolicyViolation"), got
    assert spent["message"].startswith("PolicyViolation: policy.maxEpsilonPerStudy: study "
                                       "research/brain round 3: the study already spent ε=")
    assert foreign["message"].startswith("PolicyViolation: policy.studies: study elsewhere/lung "
                                         "round 3 is from hub namespace elsewhere, this site "
                                         "allows research/*")
    jobs = _get(hub_cluster, "jobs", "-n", TRAINING) or {}
    pods = _get(hub_cluster, "pods", "-n", TRAINING) or {}
    assert jobs.get("items") == [] and pods.get("items") == []
    refused("ε over the per-study ceiling (real agent, real API server)",
            "site agent: no Job created", spent["message"])
    refused("a study from a namespace the site does not allow (real agent, real API server)",
            "site agent: no Job created", foreign["message"])
