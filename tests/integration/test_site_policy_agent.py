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

from deeprad.cli import main as deeprad_main
from deeprad.core.identity import Identity
from deeprad.core.layout import StudyLayout
from deeprad.core.privacy import DPSteps, epsilon_of
from deeprad.core.site_policy import LedgerEntry, SitePolicy, planned_steps
from deeprad.core.store.presigned import site_grants
from deeprad.devenv.binaries import tool, tool_env
from deeprad.devenv.cluster import Cluster
from deeprad.devenv.kubeconfig import kubeconfig_dict, write_kubeconfig
from deeprad.operator.api.names import site_namespace
from deeprad.operator.api.sitetask import SiteTaskSpec
from deeprad.operator.decide.timeutil import now
from deeprad.operator.site import observe
from deeprad.operator.site.agent import SiteAgent
from deeprad.operator.site.config import AgentConfig, AllowedStore, TrainingPlacement
from deeprad.operator.site.decide import RecordPrivacy, decide_task
from deeprad.operator.site.ledger import LEDGER_CONFIGMAP, Ledger, ledger_key, read_ledger
from deeprad.operator.site.training import training_task

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


def _chart_rbac(home: Path, training: str = TRAINING) -> list[dict[str, Any]]:
    """The site chart's ServiceAccount, Role and RoleBinding, as `helm template` renders them."""
    out = subprocess.run([tool("helm"), "template", SITE, str(SITE_CHART), "-n", AGENT_NS,
                          "--set", f"training.namespace={training}", "--set",
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


# ---- the hospital's ceiling per dataset ----------------------------------------------------

DATASET_TRAINING = "ledger-training"  # a training namespace of its own: a ledger of its own
DATASET = "brain-mri"


def _dataset_config(ceiling: float) -> AgentConfig:
    return AgentConfig(
        site=SITE, store=AllowedStore(endpoint=STORE),
        training=TrainingPlacement(namespace=DATASET_TRAINING, image="deeprad:test",
                                   dataset_name=DATASET, dataset_records=1000),
        policy=SitePolicy(studies=["research/*"], max_epsilon_per_dataset=ceiling))


@pytest.fixture(scope="module")
def dataset_agent(hub_cluster: Cluster, agent: SiteAgent,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[SiteAgent]:
    """An agent whose dataset has room for one run of the tasks below, not two; its local
    client is the chart's ServiceAccount again, with the chart's Role in its own namespace."""
    cluster, work = hub_cluster, tmp_path_factory.mktemp("site-dataset")
    cluster.kubectl("create", "namespace", DATASET_TRAINING, check=False)
    rbac = [o for o in _chart_rbac(work, DATASET_TRAINING) if o["kind"] != "ServiceAccount"]
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(o) for o in rbac))
    probe = _dataset_config(1.0)
    one = planned_steps(training_task(SiteTaskSpec.model_validate(
        _task("probe", "research", "alpha")["spec"]), probe), 1000)
    ceiling = (epsilon_of([one], 1e-5) + epsilon_of([one, one], 1e-5)) / 2
    yield SiteAgent(_dataset_config(ceiling), hub=agent._hub_api, local=agent._local_api)
    cluster.kubectl("delete", "namespace", DATASET_TRAINING, "--wait=false", check=False)


def _status(cluster: Cluster, name: str) -> dict[str, Any]:
    return (_get(cluster, "sitetask", name, "-n", site_namespace(SITE)) or {}).get("status") or {}


def test_redteam_ledger_a_crashed_run_counts_and_the_dataset_ceiling_refuses_the_next_study(
        dataset_agent: SiteAgent, hub_cluster: Cluster, capsys: pytest.CaptureFixture[str]
        ) -> None:
    """Study research/alpha's run is reserved in the ledger before its Job exists; the Job is
    lost before any report (a crash): the reservation stays spent. Study research/beta — a
    different study, allowed by every per-study rule — would take the dataset past the
    hospital's ceiling: the real agent refuses it (PrivacyCeiling), creating no Job and writing
    no reservation. `deeprad privacy ledger --site` shows the spent run."""
    agent, cluster = dataset_agent, hub_cluster
    first = _task("alpha-r3-polsite", "research", "alpha")
    cluster.kubectl("apply", "-f", "-", input=json.dumps(first))
    agent.sync()
    cm = _get(cluster, "configmap", LEDGER_CONFIGMAP, "-n", DATASET_TRAINING)
    assert cm is not None, "the reservation is written before the Job"
    (reserved,) = read_ledger(cm, "ledger").runs("research", "alpha")
    assert (reserved.reserved, reserved.dataset) == (True, DATASET)
    assert _get(cluster, "job", "alpha-r3-polsite", "-n", DATASET_TRAINING) is not None
    # The training crashes before any report: its Job is gone (or failed, if it ran at all).
    cluster.kubectl("delete", "job", "alpha-r3-polsite", "-n", DATASET_TRAINING,
                    "--cascade=foreground", "--wait=true", check=False)
    agent.sync()
    crashed = _status(cluster, "alpha-r3-polsite")
    assert crashed.get("state") == "Failed", crashed
    after_crash = read_ledger(_get(cluster, "configmap", LEDGER_CONFIGMAP, "-n",
                                   DATASET_TRAINING), "ledger")
    assert after_crash.runs("research", "alpha") == (reserved,)  # still spent

    second = _task("beta-r3-polsite", "research", "beta")
    cluster.kubectl("apply", "-f", "-", input=json.dumps(second))
    agent.sync()
    got = _status(cluster, "beta-r3-polsite")
    assert (got.get("state"), got.get("reason")) == ("Failed", "PrivacyCeiling"), got
    text = got["message"]
    assert text.startswith("PrivacyCeiling: policy.maxEpsilonPerDataset: study research/beta "
                           f"round 3 would take dataset {DATASET} from ε="), text
    assert "(1 recorded run(s) of every study and hub)" in text and "\n" not in text
    assert _get(cluster, "job", "beta-r3-polsite", "-n", DATASET_TRAINING) is None
    final = read_ledger(_get(cluster, "configmap", LEDGER_CONFIGMAP, "-n", DATASET_TRAINING),
                        "ledger")
    assert final.runs("research", "beta") == () and final.entries() == [reserved]
    refused("a second study spending a dataset past the hospital's ceiling after a crashed "
            "run (real agent, real API server)", "site agent: no Job, no reservation", text)

    capsys.readouterr()
    assert deeprad_main(["privacy", "ledger", "--site", "--kubeconfig", str(cluster.kubeconfig),
                         "-n", DATASET_TRAINING, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (dataset,) = report["datasets"]
    assert (dataset["dataset"], dataset["runs"], dataset["reserved"]) == (DATASET, 1, 1)
    assert dataset["epsilon"] == pytest.approx(epsilon_of([reserved.steps], 1e-5))
    assert [s["study"] for s in dataset["studies"]] == ["research/alpha"]
    assert deeprad_main(["privacy", "ledger", "--site", "--kubeconfig", str(cluster.kubeconfig),
                         "-n", "no-such-namespace"]) == 2
    assert "ConfigMap no-such-namespace/deeprad-privacy-ledger does not exist" in \
        capsys.readouterr().err


PASS_TRAINING = "ledger-pass-training"  # a ledger of its own, with room for one run


@pytest.fixture(scope="module")
def pass_agent(hub_cluster: Cluster, agent: SiteAgent,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[SiteAgent]:
    """An agent (the chart's Role, its own training namespace) whose dataset has room for one
    run of the tasks below, not two."""
    cluster, work = hub_cluster, tmp_path_factory.mktemp("site-pass")
    cluster.kubectl("create", "namespace", PASS_TRAINING, check=False)
    rbac = [o for o in _chart_rbac(work, PASS_TRAINING) if o["kind"] != "ServiceAccount"]
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(o) for o in rbac))
    probe = _dataset_config(1.0)
    one = planned_steps(training_task(SiteTaskSpec.model_validate(
        _task("probe", "research", "gamma")["spec"]), probe), 1000)
    ceiling = (epsilon_of([one], 1e-5) + epsilon_of([one, one], 1e-5)) / 2
    config = _dataset_config(ceiling)
    config = config.model_copy(update={"training": config.training.model_copy(
        update={"namespace": PASS_TRAINING})})
    yield SiteAgent(config, hub=agent._hub_api, local=agent._local_api)
    cluster.kubectl("delete", "namespace", PASS_TRAINING, "--wait=false", check=False)


def test_redteam_ledger_concurrent_reservations_cannot_pass_the_dataset_ceiling(
        pass_agent: SiteAgent, hub_cluster: Cluster) -> None:
    """Two studies' tasks in one pass, each within the ceiling alone: the second is checked
    with the first's reservation and refused (PrivacyCeiling), one Job, one reservation. Then
    a task decided on a stale ledger (as an agent of another hub sharing the dataset would
    have read it before the first reservation) is applied: its reservation is re-checked on
    the ConfigMap it would replace, refused, and its Job — next in the same action list — is
    never created. The DP Job that runs is never retried (backoffLimit 0, no Ignore rule)."""
    agent, cluster = pass_agent, hub_cluster
    names = ["delta-r3-polsite", "gamma-r3-polsite"]
    tasks = [_task(names[0], "research", "delta"), _task(names[1], "research", "gamma")]
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(t) for t in tasks))
    agent.sync()
    status = {n: _status(cluster, n) for n in names}
    jobs = {n: _get(cluster, "job", n, "-n", PASS_TRAINING) for n in names}
    started = [n for n in names if jobs[n] is not None]
    assert len(started) == 1, (status, started)
    (other,) = [n for n in names if n not in started]
    got = status[other]
    assert (got.get("state"), got.get("reason")) == ("Failed", "PrivacyCeiling"), got
    assert "(1 recorded run(s) of every study and hub)" in got["message"]
    ledger = read_ledger(_get(cluster, "configmap", LEDGER_CONFIGMAP, "-n", PASS_TRAINING),
                         "ledger")
    assert [e.reserved for e in ledger.entries()] == [True]  # the started task's only
    job = jobs[started[0]]
    assert job is not None and job["spec"]["backoffLimit"] == 0
    # Bad input fails it, a store outage's exit is counted against backoffLimit 0: one run.
    assert [r["action"] for r in job["spec"]["podFailurePolicy"]["rules"]] == ["FailJob",
                                                                               "Count"]
    refused("two tasks of one pass reserving past the dataset ceiling (real agent, real API "
            "server)", "site agent: one Job, one reservation", got["message"])

    # A stale read: decided on the ledger before any reservation, applied now.
    late = _task("eta-r3-polsite", "research", "eta")
    cluster.kubectl("apply", "-f", "-", input=json.dumps(late))
    (view,) = [t for t in observe.tasks(agent.hub, site_namespace(SITE))
               if t.name == "eta-r3-polsite"]
    actions = decide_task(agent.config, view, None, now(), Ledger())
    assert [type(a).__name__ for a in actions] == ["RecordPrivacy", "CreateJob", "ReportTask"]
    agent.apply(actions)
    got = _status(cluster, "eta-r3-polsite")
    assert (got.get("state"), got.get("reason")) == ("Failed", "PrivacyCeiling"), got
    assert _get(cluster, "job", "eta-r3-polsite", "-n", PASS_TRAINING) is None
    after = read_ledger(_get(cluster, "configmap", LEDGER_CONFIGMAP, "-n", PASS_TRAINING),
                        "ledger")
    assert after.entries() == ledger.entries()  # nothing written
    refused("a reservation decided on a stale ledger (another agent reserved first; real "
            "agent, real API server)", "site agent: no reservation, no Job", got["message"])
