"""Issue 6's install acceptance: the charts, installed with Helm, run a study end to end.

Three clusters of this module's own (a hub and two hospitals; the session's `clusters` belong to
test_operator_study.py), the shared S3 server (bucket and prefix of values-lab.yaml) and the
shared Prometheus. helm_install.py installs the hub chart with examples/values-lab.yaml and the
site chart with examples/values-st-marys.yaml on each hospital, adding only loopback values.
The tests run in order, on one installation:

1. the operator and both site agents run as pods, and the example FederatedStudy (3 rounds,
   secure aggregation) succeeds; every namespace that runs pods (the hub's release and jobs
   namespace, each hospital's agent and training namespaces) enforces the `restricted` Pod
   Security Standard, and the operator's prepare/aggregator Jobs and trainer Jobs ran there;
2. Prometheus scraped the operator: every dashboard and alert expression is valid and those
   the study must fill return data;
3. `helm upgrade` rolls the operator Deployment and the new pod reconciles;
4. `helm uninstall` of the hub keeps the CRDs, the study and its rounds, and the store's data.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helm_install import (
    HUB_NAMESPACE,
    HUB_RELEASE,
    PLURALS,
    ROOT,
    SITE_NAMESPACE,
    HelmFederation,
    condition,
    get,
    hospital_nodes,
    items,
    pods,
    promql,
    start,
)

from deeprad.core.layout import StudyLayout
from deeprad.core.protocol import AggregateReport, CheckpointManifest
from deeprad.devenv.cluster import Cluster, start_clusters
from deeprad.devenv.prometheus_server import PrometheusServer
from deeprad.devenv.s3_server import S3Server
from deeprad.operator.dashboards import promql_expressions

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

STUDY = "tumor-detection"
STUDY_NAMESPACE = "research-helm"  # values-lab.yaml watches research and research-*
HOSPITALS = ("st-marys", "charite")
STUDY_TIMEOUT = 900.0
OPERATOR = "app.kubernetes.io/component=operator"
AGENT = "app.kubernetes.io/component=site-agent"

# Dashboard panels and alerts that must return nothing after this study, and why:
MUST_BE_EMPTY = {
    # Alerts that must not fire: no round ran past its deadline, both sites stayed reachable,
    # the study has no privacy budget.
    "alert/deeprad.rounds/DeepRadRoundStalled",
    "alert/deeprad.sites/DeepRadSiteUnreachable",
    "alert/deeprad.privacy/DeepRadPrivacyBudgetNearlySpent",
    # No privacy budget in the example study: deeprad_study_epsilon_budget is absent, and so
    # is ε spent per site (tests/integration/test_prometheus.py shows these with data).
    "deeprad-study-progress/Privacy budget used/A",
    "deeprad-study-progress/ε spent against budget/B",
    "deeprad-study-progress/ε spent per site/A",
    "deeprad-study-progress/ε spent per site/B",
    # The example study classifies slices: no Dice exists (a segmentation study's test, in
    # tests/e2e/test_segmentation_study.py, reads Dice from status).
    "deeprad-study-progress/Global Dice/A",
    # Counters that only exist once something goes wrong: no site dropped, no update rejected.
    "deeprad-round-timeline/Dropouts/A",
    "deeprad-round-timeline/Rejected updates/A",
}
MAY_BE_EMPTY = {
    # ε spent exists only with differential privacy (the example study has none).
    "deeprad-study-progress/ε spent against budget/A",
    # Reconcile errors (e.g. a write conflict retried) may or may not have happened.
    "deeprad-operator-health/Reconcile errors (1h)/A",
    "deeprad-operator-health/Reconcile errors/A",
    "alert/deeprad.operator/DeepRadReconcileErrorsRising",
    # A deadline in the future exists only while a round runs: sampled during the study.
    "deeprad-round-timeline/Time to deadline/A",
}
DURING_STUDY = "deeprad-round-timeline/Time to deadline/A"


@pytest.fixture(scope="module")
def helm_fed(kube_tools: None, owner_token: str, s3_server: S3Server,
             prometheus: PrometheusServer, devenv_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[HelmFederation]:
    # Under /tmp on purpose: the charts' pods mount an emptyDir at /tmp, and the node agent
    # must leave its own host paths (the pod's KUBECONFIG) alone.
    base = devenv_dir / "helm-clusters"
    hub = Cluster("helm-hub", base, owner_token=owner_token)
    sites = {h: Cluster(f"helm-{h}", base, nodes=hospital_nodes(f"helm-{h}"),
                        owner_token=owner_token) for h in HOSPITALS}
    start_clusters([hub, *sites.values()])
    try:
        fed = start(hub, sites, s3_server, tmp_path_factory.mktemp("helm-install"),
                    [STUDY_NAMESPACE])
        prometheus.set_targets([f"127.0.0.1:{fed.ports.operator_metrics}"])
        yield fed
    finally:
        prometheus.set_targets([])
        for cluster in (*sites.values(), hub):
            cluster.stop()


def _study_done(fed: HelmFederation) -> dict[str, Any] | None:
    study = get(fed.hub, "federatedstudy", STUDY, "-n", STUDY_NAMESPACE)
    state = ((study or {}).get("status") or {}).get("state")
    if state == "Failed":
        rounds = "\n".join(f"{r['metadata']['name']}: {json.dumps(r.get('status'))[:1500]}"
                           for r in items(fed.hub, "federatedrounds", "-n", STUDY_NAMESPACE))
        pytest.fail(f"study failed: {json.dumps((study or {})['status'])[:3000]}\n{rounds}\n"
                    f"{fed.diagnostics()}")
    return study if state == "Succeeded" else None


def _owner_kind(pod: dict[str, Any]) -> str:
    return next((o["kind"] for o in pod["metadata"].get("ownerReferences") or ()), "")


def _assert_restricted(cluster: Cluster, namespace: str) -> None:
    labels = (get(cluster, "namespace", namespace) or {})["metadata"].get("labels") or {}
    assert labels.get("pod-security.kubernetes.io/enforce") == "restricted", (namespace, labels)
    refused = [e for e in items(cluster, "events", "-n", namespace)
               if e.get("reason") == "FailedCreate"]
    assert not refused, [e.get("message") for e in refused]


def _assert_jobs_ran(cluster: Cluster, namespace: str, jobs: list[dict[str, Any]]) -> None:
    """Each Job succeeded once, through a pod the namespace admitted."""
    for job in jobs:
        name = job["metadata"]["name"]
        assert job["status"].get("succeeded") == 1 and not job["status"].get("failed"), \
            (name, job["status"])
        (pod,) = [p for p in items(cluster, "pods", "-n", namespace, "-l",
                                   f"batch.kubernetes.io/job-name={name}")]
        assert pod["status"]["phase"] == "Succeeded", (name, pod["status"])
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_study_runs_on_the_installed_charts(helm_fed: HelmFederation,
                                            prometheus: PrometheusServer) -> None:
    fed = helm_fed
    # The operator and the agents are pods of the charts' Deployments.
    (operator,) = list(pods(fed.hub, HUB_NAMESPACE, OPERATOR))
    assert operator["status"]["phase"] == "Running" and _owner_kind(operator) == "ReplicaSet"
    assert operator["spec"]["containers"][0]["args"][:2] == ["--mode", "hub"]
    for cluster in fed.sites.values():
        (agent,) = list(pods(cluster, SITE_NAMESPACE, AGENT))
        assert agent["status"]["phase"] == "Running" and _owner_kind(agent) == "ReplicaSet"
        assert agent["spec"]["nodeName"].endswith("-cpu-0"), agent["spec"]["nodeName"]
    # values-lab.yaml: a ServiceMonitor and a PrometheusRule for the Prometheus Operator and
    # the dashboards in `monitoring`.
    assert get(fed.hub, "servicemonitor", f"{HUB_RELEASE}-operator", "-n", HUB_NAMESPACE)
    assert get(fed.hub, "prometheusrule", f"{HUB_RELEASE}-alerts", "-n", HUB_NAMESPACE)
    assert len(items(fed.hub, "configmaps", "-n", "monitoring", "-l",
                     "grafana_dashboard=1")) == 4

    fed.hub.kubectl("apply", "-n", STUDY_NAMESPACE, "-f",
                    str(ROOT / "examples" / "federatedstudy-tumor-cnn.yaml"))
    during: list[list[dict[str, Any]]] = []

    def done() -> dict[str, Any] | None:
        study = _study_done(fed)
        if study is None and not any(during):
            during.append(promql(prometheus.url, promql_expressions()[DURING_STUDY])[1])
        return study

    study = fed.wait("the study to succeed", done, STUDY_TIMEOUT, interval=2.0)
    assert any(during), "Time to deadline never had data while rounds ran"

    every = sorted(items(fed.hub, "federatedrounds", "-n", STUDY_NAMESPACE),
                   key=lambda r: r["spec"]["round"])
    # the training rounds, then one evaluation round scoring the final model (no updates)
    rounds = [r for r in every if r["spec"]["mode"] == "train"]
    assert [r["spec"]["mode"] for r in every] == ["train"] * len(rounds) + ["evaluate"]
    assert every[-1]["status"]["state"] == "Succeeded", every[-1]["status"]
    assert study["status"]["finalMetrics"]["auroc"] is not None
    assert study["status"]["completedRounds"] == len(rounds) >= 2
    if len(rounds) < 3:
        assert condition(study, "Succeeded")["reason"] == "TargetReached"
    layout = StudyLayout(STUDY_NAMESPACE, STUDY, study["metadata"]["uid"])
    for r in rounds:
        n, st = r["spec"]["round"], r["status"]
        assert st["state"] == "Succeeded", st
        assert {s["site"]: s["state"] for s in st["sites"]} == dict.fromkeys(HOSPITALS,
                                                                             "Reported")
        manifest = CheckpointManifest.model_validate(fed.store_json(layout.global_manifest(n)))
        assert sorted(c.site for c in manifest.contributors) == sorted(HOSPITALS)
        report = AggregateReport.model_validate(fed.store_json(layout.aggregate(n)))
        assert report.secagg is not None and sorted(report.secagg.survivors) == sorted(HOSPITALS)
    aurocs = [r["status"]["inputMetrics"]["auroc"] for r in rounds]
    assert all(b > a for a, b in itertools.pairwise(aurocs)), aurocs

    # Pod Security: every namespace that ran pods enforces `restricted`, and the Jobs the
    # operator created (prepare + one aggregator per round on the hub; one trainer per round
    # and site) ran there, as did the charts' own pods.
    _assert_restricted(fed.hub, HUB_NAMESPACE)
    hub_jobs = items(fed.hub, "jobs", "-n", HUB_NAMESPACE)
    names = sorted(j["metadata"]["name"] for j in hub_jobs)
    # one aggregator per round, the evaluation round's pooling its scores
    assert sum(n.endswith("-aggregate") for n in names) == len(every), names
    assert any(n.endswith("-prepare") for n in names), names
    _assert_jobs_ran(fed.hub, HUB_NAMESPACE, hub_jobs)
    for cluster in fed.sites.values():
        _assert_restricted(cluster, SITE_NAMESPACE)
        _assert_restricted(cluster, fed.training_namespace)  # made by the site chart
        trainers = items(cluster, "jobs", "-n", fed.training_namespace)
        assert len(trainers) == len(every), [j["metadata"]["name"] for j in trainers]
        _assert_jobs_ran(cluster, fed.training_namespace, trainers)
        for pod in items(cluster, "pods", "-n", fed.training_namespace):
            assert pod["spec"]["nodeName"].endswith("-gpu-0")  # the example's H100 placement
            assert pod["spec"].get("runtimeClassName") == "nvidia"


def test_prometheus_scraped_every_dashboard_and_alert(helm_fed: HelmFederation,
                                                      prometheus: PrometheusServer) -> None:
    fed = helm_fed
    target = f"http://127.0.0.1:{fed.ports.operator_metrics}/metrics"
    assert prometheus.target_health().get(target) == "up", prometheus.target_health()

    def final_state_scraped() -> bool:
        result = promql(prometheus.url, "sum(deeprad_rounds_total)")[1]
        done = promql(prometheus.url, "max(deeprad_study_rounds_completed)")[1]
        # every training round counted, and the final model's evaluation round after them
        return bool(result and done and float(result[0]["value"][1]) ==
                    float(done[0]["value"][1]) + 1 >= 3)

    fed.wait("Prometheus to scrape the finished study", final_state_scraped, 60)
    invalid, empty, unexpected = [], [], []
    exprs = promql_expressions()
    assert set(MUST_BE_EMPTY | MAY_BE_EMPTY) <= set(exprs)
    for where, expr in exprs.items():
        status, result = promql(prometheus.url, expr)
        if status != "success":
            invalid.append(f"{where}: {expr} -> {status}")
        elif where in MUST_BE_EMPTY and result:
            unexpected.append(f"{where}: {expr} -> {result}")
        elif where not in MUST_BE_EMPTY | MAY_BE_EMPTY and not result:
            empty.append(f"{where}: {expr}")
    assert not invalid, "\n".join(invalid)
    if empty:  # what the operator itself exports, and what the store holds, for the report
        exported = [line for line in fed.operator_metrics().splitlines()
                    if line.startswith("deeprad_update_bytes_count")]
        updates = [k for k in fed.store_keys(f"{STUDY_NAMESPACE}/{STUDY}/") if "/updates/" in k]
        empty += [f"operator exports: {exported}", f"store updates: {updates}"]
    assert not empty, "no data:\n" + "\n".join(empty)
    assert not unexpected, "data where none is expected:\n" + "\n".join(unexpected)


def test_helm_upgrade_rolls_the_operator(helm_fed: HelmFederation) -> None:
    fed = helm_fed
    name = f"{HUB_RELEASE}-operator"
    before = get(fed.hub, "deployment", name, "-n", HUB_NAMESPACE)
    assert before is not None
    (old_pod,) = list(pods(fed.hub, HUB_NAMESPACE, OPERATOR))
    fed.helm_hub("upgrade", HUB_RELEASE, str(ROOT / "helm" / "deeprad"), "--reuse-values",
                 "--set", "operator.verbose=true")

    def rolled() -> dict[str, Any] | None:
        now = [p for p in pods(fed.hub, HUB_NAMESPACE, OPERATOR)]
        fresh = [p for p in now if p["metadata"]["uid"] != old_pod["metadata"]["uid"]]
        if len(now) == 1 and fresh and fresh[0]["status"].get("phase") == "Running":
            return fresh[0]
        return None

    pod = fed.wait("the operator Deployment to roll", rolled, 180)
    after = get(fed.hub, "deployment", name, "-n", HUB_NAMESPACE)
    assert after is not None
    assert after["metadata"]["generation"] > before["metadata"]["generation"]
    assert after["status"].get("observedGeneration") == after["metadata"]["generation"]
    assert "--verbose" in pod["spec"]["containers"][0]["args"]
    assert json.loads(fed.helm_hub("status", HUB_RELEASE, "-o", "json").stdout)["version"] == 2

    # The new process reconciles: gauges it can only know by reading the sites and the study.
    def reconciled() -> bool:
        if not fed.operator_healthy():
            return False
        try:
            text = fed.operator_metrics()
        except OSError:
            return False
        return all(f'deeprad_site_ready{{site="{h}"}} 1.0' in text for h in HOSPITALS) and \
            (f'deeprad_study_rounds_completed{{namespace="{STUDY_NAMESPACE}",'
             f'study="{STUDY}"}}') in text
    fed.wait("the upgraded operator to reconcile sites and the study", reconciled, 120)
    for h in HOSPITALS:
        assert fed.site_ready(h)


def test_helm_uninstall_keeps_crds_studies_and_data(helm_fed: HelmFederation) -> None:
    fed = helm_fed
    rounds = items(fed.hub, "federatedrounds", "-n", STUDY_NAMESPACE)
    stored = fed.store_keys(f"{STUDY_NAMESPACE}/{STUDY}/")
    assert rounds and stored
    fed.helm_hub("uninstall", HUB_RELEASE, "--wait", "--timeout", "3m")
    assert get(fed.hub, "deployment", f"{HUB_RELEASE}-operator", "-n", HUB_NAMESPACE) is None
    fed.wait("the operator pod to go", lambda: not list(pods(fed.hub, HUB_NAMESPACE, OPERATOR)),
             120)
    for plural in PLURALS:
        crd = get(fed.hub, "crd", f"{plural}.deeprad.io")
        assert crd is not None, plural
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    study = get(fed.hub, "federatedstudy", STUDY, "-n", STUDY_NAMESPACE)
    assert study is not None and study["status"]["state"] == "Succeeded"
    assert sorted(r["metadata"]["uid"] for r in items(
        fed.hub, "federatedrounds", "-n", STUDY_NAMESPACE)) == \
        sorted(r["metadata"]["uid"] for r in rounds)
    assert {h["metadata"]["name"] for h in items(fed.hub, "hospitalsites")} == set(HOSPITALS)
    assert fed.store_keys(f"{STUDY_NAMESPACE}/{STUDY}/") == stored
