"""The Helm charts render what users and the operator's contracts expect: `helm lint` and the
values schemas, the site agent's config file, CRDs taken from crds/, alerts and dashboards
from their one source, restricted pods, least-privilege RBAC and the command lines of
`deeprad operator`. Rendering only (`helm template`); tests/integration/test_helm_charts.py
sends the same objects to a real apiserver."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from deeprad.devenv.binaries import ToolsMissing, tool
from deeprad.operator.api.crdgen import render_all as render_crds
from deeprad.operator.dashboards import ALERTS_FILE
from deeprad.operator.dashboards.gen import render_all as render_dashboards
from deeprad.operator.render import admission
from deeprad.operator.render.jobs import OPERATOR_COMMAND
from deeprad.operator.render.site import AGENT, site_objects
from deeprad.operator.site.config import AgentConfig

ROOT = Path(__file__).resolve().parents[2]
HUB = ROOT / "helm" / "deeprad"
SITE = ROOT / "helm" / "deeprad-site"
HUB_EXAMPLE = HUB / "examples" / "values-lab.yaml"
SITE_EXAMPLE = SITE / "examples" / "values-st-marys.yaml"
CASES = [(HUB, None), (HUB, HUB_EXAMPLE), (SITE, None), (SITE, SITE_EXAMPLE)]
IDS = ["hub-defaults", "hub-lab", "site-defaults", "site-st-marys"]
POLICY_KINDS = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding",
                "MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding")
Obj = dict[str, Any]


def _helm_bin() -> str:
    try:
        return tool("helm")
    except ToolsMissing as exc:
        pytest.skip(f"{exc}")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the pinned helm; raises with its output when check and it fails."""
    result = subprocess.run([_helm_bin(), *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}{result.stdout}")
    return result


def render(chart: Path, values: Path | None = None, *sets: str, release: str = "st-marys",
           namespace: str = "deeprad") -> list[Obj]:
    """The objects `helm template` renders."""
    args = ["template", release, str(chart), "-n", namespace]
    if values:
        args += ["-f", str(values)]
    for item in sets:
        args += ["--set", item]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def by_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def pod_specs(objs: list[Obj]) -> list[Obj]:
    return [o["spec"]["template"]["spec"] for o in objs
            if o["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}]


@pytest.mark.parametrize(("chart", "values"), CASES, ids=IDS)
def test_helm_lint_passes(chart: Path, values: Path | None) -> None:
    args = ["lint", "--strict", str(chart)] + (["-f", str(values)] if values else [])
    out = helm(*args)
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("values", [None, SITE_EXAMPLE], ids=IDS[2:])
def test_site_agent_config_is_an_agent_config(values: Path | None) -> None:
    objs = render(SITE, values, release="st-marys")
    (cm,) = [o for o in by_kind(objs, "ConfigMap") if "config.yaml" in o.get("data", {})]
    config = AgentConfig.model_validate(yaml.safe_load(cm["data"]["config.yaml"]))
    assert config.site == "st-marys"  # the release name by default
    (deployment,) = by_kind(objs, "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
    if values is None:
        assert config.training.namespace == "deeprad"  # the release namespace
        assert config.training.data_claim is None
        assert config.training.image == "ghcr.io/deeprad/trainer:0.1.0"
    else:
        assert config.training.namespace == "deeprad-training"
        assert config.training.data_claim == "st-marys-deeprad-site-data"
        assert config.training.gpu.runtime_class_name == "nvidia"
        assert config.training.gpu.tolerations and config.training.gpu.node_selector
        assert config.training.max_task_duration == "2h"
        assert config.training.dataset.image_size == 128
        assert config.hub_signing_key
        assert config.store.endpoint == "https://minio.hub.example.org"
        (pvc,) = by_kind(objs, "PersistentVolumeClaim")
        assert pvc["metadata"]["namespace"] == "deeprad-training"
        assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


@pytest.mark.parametrize(("chart", "sets", "message"), [
    (HUB, ["storee.bucket=x"], "additional properties 'storee' not allowed"),
    (HUB, ["store.secure=yes"], "/store/secure"),
    (HUB, ["operator.image.pullPolicy=Sometimes"], "/operator/image/pullPolicy"),
    (HUB, ["hubIdentity.signingKey=not-a-key"], "/hubIdentity/signingKey"),
    (HUB, ["store.endpoint=http://minio:9000"], "/store/endpoint"),
    (HUB, ["networkPolicy.store.cidrs[0]=everywhere"], "/networkPolicy/store/cidrs/0"),
    (SITE, ["training.gpu.count=0"], "/training/gpu/count"),
    (SITE, ["site=St_Marys"], "/site"),
    (SITE, ["rbac.readNodes=maybe"], "/rbac/readNodes"),
    (SITE, ["heartbeatSeconds=0"], "/heartbeatSeconds"),
    (SITE, ["training.dataset.kind=dicom-server"], "/training/dataset/kind"),
    (SITE, ["store.endpoint=ftp://minio.hub.example.org"], "/store/endpoint"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_schema_refuses_wrong_values(chart: Path, sets: list[str], message: str) -> None:
    args = ["template", "x", str(chart)]
    for item in sets:
        args += ["--set", item]
    out = helm(*args, check=False)
    assert out.returncode != 0
    assert "values don't meet the specifications of the schema" in out.stderr
    assert message in out.stderr, out.stderr


def test_crds_are_the_generated_ones_with_a_keep_policy() -> None:
    rendered = {c["metadata"]["name"]: c for c in by_kind(render(HUB), "CustomResourceDefinition")}
    generated = {}
    for text in render_crds().values():
        crd = yaml.safe_load(text)
        generated[crd["metadata"]["name"]] = crd
    assert sorted(rendered) == sorted(generated)
    for name, crd in rendered.items():
        assert crd["spec"] == generated[name]["spec"], f"{name} differs from crds/"
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert crd["metadata"]["labels"]["app.kubernetes.io/part-of"] == "deeprad"
    assert not by_kind(render(HUB, None, "crds.install=false"), "CustomResourceDefinition")
    unkept = by_kind(render(HUB, None, "crds.keep=false"), "CustomResourceDefinition")
    assert all("annotations" not in c["metadata"] for c in unkept)


def test_prometheus_rule_is_the_alerts_file_with_additional_labels() -> None:
    assert not by_kind(render(HUB), "PrometheusRule")
    (rule,) = by_kind(render(HUB, HUB_EXAMPLE), "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(ALERTS_FILE.read_text())
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (monitor,) = by_kind(render(HUB, HUB_EXAMPLE), "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (service,) = by_kind(render(HUB, HUB_EXAMPLE), "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"][
        "labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts == {"DeepRadRoundStalled", "DeepRadSiteUnreachable",
                      "DeepRadReconcileErrorsRising", "DeepRadPrivacyBudgetNearlySpent"}


def test_dashboards_are_configmaps_for_the_grafana_sidecar() -> None:
    generated = render_dashboards()
    maps = [c for c in by_kind(render(HUB), "ConfigMap") if "grafana_dashboard" in
            c["metadata"]["labels"]]
    assert {k for c in maps for k in c["data"]} == set(generated)
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        for key, text in cm["data"].items():
            assert json.loads(text) == json.loads(generated[key])
    custom = render(HUB, HUB_EXAMPLE, "dashboards.label=dashboards",
                    "dashboards.labelValue=deeprad")
    maps = [c for c in by_kind(custom, "ConfigMap") if "dashboards" in c["metadata"]["labels"]]
    assert len(maps) == len(generated)
    assert {c["metadata"]["namespace"] for c in maps} == {"monitoring"}
    assert {c["metadata"]["labels"]["dashboards"] for c in maps} == {"deeprad"}
    assert {c["metadata"]["annotations"]["grafana_folder"] for c in maps} == {"Deep-Rad"}


@pytest.mark.parametrize(("chart", "values"), CASES, ids=IDS)
def test_every_pod_is_restricted(chart: Path, values: Path | None) -> None:
    specs = pod_specs(render(chart, values))
    assert specs
    for spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in spec["containers"] + spec.get("initContainers", []):
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["readOnlyRootFilesystem"] is True
            assert ctx["runAsNonRoot"] is True
            assert ctx["capabilities"] == {"drop": ["ALL"]}
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
            assert container["livenessProbe"] and container["readinessProbe"]
        assert {"name": "tmp", "emptyDir": {}} in spec["volumes"]  # the only writable path


def _args(objs: list[Obj]) -> tuple[list[str], Obj]:
    (deployment,) = by_kind(objs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == OPERATOR_COMMAND
    return container["args"], deployment["spec"]["template"]["spec"]


def _flags(args: list[str]) -> dict[str, list[str]]:
    """flag -> its values; a flag followed by another flag (or nothing) is a switch: [""]."""
    flags: dict[str, list[str]] = {}
    i = 0
    while i < len(args):
        flag = args[i]
        value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("-") else None
        flags.setdefault(flag, []).append(value or "")
        i += 1 if value is None else 2
    return flags


def test_hub_operator_follows_the_cli_contract() -> None:
    args, pod = _args(render(HUB, HUB_EXAMPLE, namespace="deeprad-system"))
    assert args[:2] == ["--mode", "hub"]
    flags = _flags(args)
    assert flags["--mode"] == ["hub"]
    assert flags["--store"] == [
        "s3://deeprad-lab/hub?endpoint=minio.minio.svc.cluster.local:9000&secure=false"]
    assert flags["--jobs-namespace"] == ["deeprad-system"]
    assert flags["--job-image"] == ["ghcr.io/deeprad/aggregator:0.1.0"]
    assert flags["--image-pull-policy"] == ["IfNotPresent"]
    assert flags["--store-credentials-secret"] == ["deeprad-minio"]
    assert flags["--hub-identity-secret"] == ["deeprad-hub-identity"]
    assert flags["--public-store-endpoint"] == ["minio.lab.example.org:443"]
    assert flags["--aggregator-cpu"] == ["2"] and flags["--aggregator-memory"] == ["8Gi"]
    assert flags["--liveness"] == ["http://0.0.0.0:8080/healthz"]
    assert flags["--metrics-port"] == ["9090"]
    assert flags["-n"] == ["research", "research-*"]
    assert flags["--record-study-creator"] == [""]  # the creator policies are installed
    off = _flags(_args(render(HUB, HUB_EXAMPLE, "admissionPolicies.studyCreator=false"))[0])
    assert "--record-study-creator" not in off  # unguarded annotations are never recorded
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    keys = volumes[mounts[flags["--hub-keys"][0]]]["configMap"]["name"]
    (cm,) = [c for c in by_kind(render(HUB, HUB_EXAMPLE), "ConfigMap")
             if c["metadata"]["name"] == keys]
    assert set(cm["data"]) == {"name", "role", "signing.pub", "key-agreement.pub"}
    assert cm["data"]["role"] == "hub"
    # The hub's private keys reach aggregator Jobs only, never the operator pod.
    assert not [v for v in pod["volumes"] if "secret" in v]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in pod["containers"][0]["env"]
           if "secretKeyRef" in e.get("valueFrom", {})}
    assert env == {"DEEPRAD_S3_ACCESS_KEY": {"name": "deeprad-minio", "key": "access-key"},
                   "DEEPRAD_S3_SECRET_KEY": {"name": "deeprad-minio", "key": "secret-key"}}


@pytest.mark.parametrize(("chart", "values"), CASES, ids=IDS)
def test_command_lines_parse_with_the_real_cli(chart: Path, values: Path | None) -> None:
    import argparse

    from deeprad.operator import cli

    parser = argparse.ArgumentParser(prog="python -m deeprad.operator")
    cli.add_arguments(parser)
    args, _ = _args(render(chart, values, namespace="deeprad-system"))
    parsed = parser.parse_args(args)
    assert parsed.mode == ("hub" if chart == HUB else "site")
    if chart == HUB:
        assert parsed.jobs_namespace == "deeprad-system"
        assert parsed.store and parsed.hub_keys and parsed.hub_identity_secret
    else:
        assert parsed.config and parsed.hub_kubeconfig


def test_hub_store_secret_is_created_only_from_given_keys() -> None:
    assert not by_kind(render(HUB), "Secret")
    (secret,) = by_kind(render(HUB, None, "store.credentials.accessKey=a",
                               "store.credentials.secretKey=b"), "Secret")
    assert secret["stringData"] == {"access-key": "a", "secret-key": "b"}
    out = helm("template", "x", str(HUB), "--set", "store.credentials.accessKey=a",
               check=False)
    assert "store.credentials.secretKey is required" in out.stderr


def test_site_agent_follows_the_cli_contract() -> None:
    objs = render(SITE, None, "hub.kubeconfig=apiVersion: v1")
    args, pod = _args(objs)
    flags = _flags(args)
    assert flags["--mode"] == ["site"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert flags["--config"] == [f"{mounts['config']}/config.yaml"]
    assert flags["--hub-kubeconfig"] == [f"{mounts['hub-kubeconfig']}/kubeconfig"]
    (secret,) = by_kind(objs, "Secret")
    assert secret["stringData"] == {"kubeconfig": "apiVersion: v1"}
    hub_volume = next(v for v in pod["volumes"] if v["name"] == "hub-kubeconfig")
    assert hub_volume["secret"]["secretName"] == secret["metadata"]["name"]
    existing = _args(render(SITE, SITE_EXAMPLE))[1]
    hub_volume = next(v for v in existing["volumes"] if v["name"] == "hub-kubeconfig")
    assert hub_volume["secret"]["secretName"] == "deeprad-hub-kubeconfig"


def _rules(obj: Obj) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in obj["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_site_rbac_is_limited_to_the_training_namespace() -> None:
    objs = render(SITE, SITE_EXAMPLE)
    (role,) = [r for r in by_kind(objs, "Role") if "leader-election" not in r["metadata"]["name"]]
    assert role["metadata"]["namespace"] == "deeprad-training"
    assert _rules(role) == {
        *(("batch", "jobs", v) for v in ("create", "get", "list", "watch", "delete")),
        *(("", "pods", v) for v in ("get", "list", "watch")), ("", "pods/log", "get"),
        ("", "configmaps", "create"), ("", "configmaps", "get"), ("", "configmaps", "update")}
    # The privacy ledger is read and rewritten by name only (create cannot be limited so).
    by_name = [r for r in role["rules"] if r.get("resourceNames")]
    assert by_name == [{"apiGroups": [""], "resources": ["configmaps"],
                        "resourceNames": ["deeprad-privacy-ledger"], "verbs": ["get", "update"]}]
    (cluster_role,) = by_kind(objs, "ClusterRole")
    assert _rules(cluster_role) == {("", "nodes", "get"), ("", "nodes", "list")}
    assert not by_kind(render(SITE, None, "rbac.readNodes=false"), "ClusterRole")


def test_hub_rbac_grants_what_the_site_roles_need_and_aggregates() -> None:
    from deeprad.operator.render.site import role

    objs = render(HUB)
    operator = next(o for o in by_kind(objs, "ClusterRole")
                    if o["metadata"]["name"].endswith("-operator"))
    held = _rules(operator)
    # The operator grants the site agent's Role: RBAC lets it only if it holds every rule.
    for group, resource, verb in _rules(role("st-marys", "uid-1")):
        assert (group, resource, verb) in held, (group, resource, verb)
    assert not {v for _, _, v in held} & {"bind", "escalate", "impersonate", "*"}
    assert not {r for _, r, _ in held} & {"secrets", "jobs"}  # only in the jobs namespace
    (jobs_role,) = by_kind(objs, "Role")
    assert jobs_role["metadata"]["namespace"] == "deeprad"
    # Secrets: `get` on the push-mode kubeconfigs the values name, and on nothing else.
    assert not [r for r in _rules(jobs_role) if r[1] == "secrets"]
    (named,) = by_kind(render(HUB, None, "rbac.pushKubeconfigSecrets={lab-a,lab-b}"), "Role")
    assert ("", "secrets", "get") in _rules(named)
    assert [r for r in named["rules"] if "secrets" in r["resources"]] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["lab-a", "lab-b"],
         "verbs": ["get"]}]
    aggregated = {o["metadata"]["name"].rsplit("-", 1)[-1]: o for o in by_kind(objs, "ClusterRole")
                  if any(k.startswith("rbac.authorization.k8s.io/aggregate-to-")
                         for k in o["metadata"]["labels"])}
    assert ("deeprad.io", "sitetasks", "get") in _rules(aggregated["view"])
    assert not [r for r in _rules(aggregated["edit"]) if r[1] == "sitetasks"]
    assert ("deeprad.io", "hospitalsites", "create") in _rules(aggregated["admin"])
    assert "rbac.authorization.k8s.io/aggregate-to-edit" not in aggregated["admin"][
        "metadata"]["labels"]


def _policies(objs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs if o["kind"] in POLICY_KINDS}


def test_chart_ships_the_generated_policy_with_its_labels() -> None:
    rendered = _policies(render(HUB))
    source = _policies(admission.policies())
    assert rendered.keys() == source.keys()
    for key, want in source.items():
        got = rendered[key]
        assert got["spec"] == want["spec"], key
        assert got["metadata"]["labels"]["app.kubernetes.io/instance"] == "st-marys"
        assert got["metadata"]["labels"]["app.kubernetes.io/part-of"] == "deeprad"
    for kind in ("ValidatingAdmissionPolicyBinding", "MutatingAdmissionPolicyBinding"):
        for (k, name), binding in rendered.items():
            if k == kind:
                assert binding["spec"]["policyName"] == name
                assert (kind.removesuffix("Binding"), name) in rendered
                assert "matchResources" not in binding["spec"]  # every namespace
    for (kind, _), binding in rendered.items():
        if kind == "ValidatingAdmissionPolicyBinding":
            assert binding["spec"]["validationActions"] == ["Deny"]
    for value, policy in (("siteLease", admission.SITE_LEASE_POLICY),
                          ("studyCreator", admission.STUDY_CREATOR_POLICY)):
        names = {name for _, name in _policies(render(HUB, None,
                                                      f"admissionPolicies.{value}=false"))}
        assert policy not in names and names, value  # only that value's policies go


def test_hub_rbac_reaches_only_the_site_objects_by_name() -> None:
    """The operator's cluster-wide writes to ServiceAccounts, Roles, RoleBindings and Leases
    carry resourceNames: the names render.site gives every object it reserves."""
    named = {m["kind"]: m["metadata"]["name"] for m in site_objects("st-marys", "uid-1")}
    assert {named[k] for k in ("ServiceAccount", "Role", "RoleBinding", "Lease")} == {AGENT}
    operator = next(o for o in by_kind(render(HUB), "ClusterRole")
                    if o["metadata"]["name"].endswith("-operator"))
    for rule in operator["rules"]:
        if set(rule["resources"]) & {"serviceaccounts", "roles", "rolebindings", "leases"}:
            assert rule["resourceNames"] == [AGENT], rule
    leases = [r for r in operator["rules"] if "leases" in r["resources"]]
    # list and watch too: the heartbeat watch selects metadata.name=deeprad-agent (hub/sites.py)
    assert [sorted(r["verbs"]) for r in leases] == [
        ["create", "get", "list", "patch", "update", "watch"]]


def _documented_rbac() -> set[tuple[str, str, str, str]]:
    """(where, apiGroup, resource, verb) from the table in the hub README's RBAC section."""
    text = (HUB / "README.md").read_text().split("\n## RBAC\n", 1)[1].split("\n## ", 1)[0]
    out = set()
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 5 or cells[0] not in ("cluster", "release namespace"):
            continue
        group, resources, verbs = ([w.strip("`") for w in c.split(", ")] for c in cells[1:4])
        out |= {(cells[0], "" if g == '""' else g, r, v)
                for g in group for r in resources for v in verbs}
    return out


def test_every_verb_the_hub_chart_grants_is_justified_in_the_readme() -> None:
    objs = render(HUB, None, "rbac.pushKubeconfigSecrets={lab-a}")
    operator = next(o for o in by_kind(objs, "ClusterRole")
                    if o["metadata"]["name"].endswith("-operator"))
    (jobs_role,) = by_kind(objs, "Role")
    granted = {("cluster", *rule) for rule in _rules(operator)} | {
        ("release namespace", *rule) for rule in _rules(jobs_role)}
    assert granted == _documented_rbac()


@pytest.mark.parametrize(("chart", "values"), CASES, ids=IDS)
def test_network_policies_cover_every_pod(chart: Path, values: Path | None) -> None:
    objs = render(chart, values)
    policies = by_kind(objs, "NetworkPolicy")
    for deployment in by_kind(objs, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert any(p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
                   for p in policies), deployment["metadata"]["name"]
    for policy in policies:
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        dns = policy["spec"]["egress"][0]["ports"]
        assert {"port": 53, "protocol": "UDP"} in dns
    if chart == SITE:
        agent = next(p for p in policies if p["metadata"]["name"].endswith("-agent"))
        assert not agent["spec"].get("ingress") or values is not None


# ---- high availability: replicas, leader election, disruption budget, spreading --------------

HA = [(HUB, "operator", "operator", 2), (SITE, "agent", "agent", 1)]


@pytest.mark.parametrize(("chart", "key", "lease_suffix", "replicas"), HA, ids=["hub", "site"])
def test_replicas_elect_a_leader_on_a_lease_they_alone_may_renew(
        chart: Path, key: str, lease_suffix: str, replicas: int) -> None:
    """Each replica runs with --leader-election on a Lease in the release namespace, named
    after the release; its identity is the pod's name; only that Lease may be renewed."""
    objs = render(chart, None, f"{key}.replicas=2", f"{key}.leaderElection.enabled=true",
                  namespace="deeprad")
    (deployment,) = by_kind(objs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    pod = deployment["spec"]["template"]["spec"]
    flags = _flags(pod["containers"][0]["args"])
    lease = f"st-marys-{chart.name}-{lease_suffix}"
    assert flags["--leader-election"] == [""]
    assert flags["--leader-election-namespace"] == ["deeprad"]
    assert flags["--leader-election-lease-name"] == [lease]
    assert (flags["--leader-election-lease-duration"], flags["--leader-election-renew-deadline"],
            flags["--leader-election-retry-period"]) == (["10"], ["7"], ["2"])
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # Create cannot be limited by name; reading and renewing can, and are.
    lease_rules = [r for role in by_kind(objs, "Role") if role["metadata"]["namespace"] ==
                   "deeprad" for r in role["rules"] if "leases" in r["resources"]]
    assert sorted((tuple(r["verbs"]), tuple(r.get("resourceNames", ()))) for r in lease_rules
                  ) == [(("create",), ()), (("get", "update"), (lease,))]
    # A drain leaves one replica; replicas prefer different nodes.
    (pdb,) = by_kind(objs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == \
        deployment["spec"]["selector"]["matchLabels"]
    # The chart's own default: two elected hub operators, one site agent without election (HA
    # opt-in at hospitals: an elected agent cannot report its own cluster's API outage).
    (default,) = by_kind(render(chart), "Deployment")
    assert default["spec"]["replicas"] == replicas
    assert any(a == "--leader-election" for a in
               default["spec"]["template"]["spec"]["containers"][0]["args"]) is (replicas > 1)
    assert bool(by_kind(render(chart), "PodDisruptionBudget")) is (replicas > 1)
    # A user's affinity replaces the default spreading.
    own = by_kind(render(chart, None, f"{key}.replicas=2", f"{key}.leaderElection.enabled=true",
                         f"{key}.affinity.nodeAffinity.x=y"), "Deployment")[0]
    assert own["spec"]["template"]["spec"]["affinity"] == {"nodeAffinity": {"x": "y"}}


@pytest.mark.parametrize(("chart", "key"), [(HUB, "operator"), (SITE, "agent")],
                         ids=["hub", "site"])
def test_without_leader_election_one_replica_is_recreated(chart: Path, key: str) -> None:
    objs = render(chart, None, f"{key}.replicas=1", f"{key}.leaderElection.enabled=false")
    (deployment,) = by_kind(objs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert not any(a.startswith("--leader-election")
                   for a in deployment["spec"]["template"]["spec"]["containers"][0]["args"])
    assert not [r for role in by_kind(objs, "Role") for r in role["rules"]
                if "leases" in r["resources"]]
    assert not by_kind(objs, "PodDisruptionBudget")
    assert "affinity" not in deployment["spec"]["template"]["spec"]
    out = helm("template", "x", str(chart), "--set", f"{key}.replicas=2", "--set",
               f"{key}.leaderElection.enabled=false", check=False)
    assert out.returncode != 0
    assert f"{key}.replicas > 1 needs {key}.leaderElection.enabled: true" in out.stderr
