"""Least privilege on a real hub API server: the hub chart's RBAC for the operator's
ServiceAccount, the Role the operator gives each site, and the `deeprad-site-lease`
ValidatingAdmissionPolicy.

The chart's ServiceAccount, RBAC and policies are applied as `helm template` renders them (no
operator pod runs here: the hub cluster is shared with other tests' operators). Each site is
then reserved *as the operator's ServiceAccount* (impersonated), with the objects the operator
applies (`render.site.site_objects`): that proves the chart's RBAC is enough, escalation check
included. Sites act with a real token for their ServiceAccount, as the site chart's kubeconfig
carries it. `kubectl auth can-i` answers the matrix; the red-team tests try the writes and
re-read the Lease to show nothing changed.
"""

from __future__ import annotations

import base64
import copy
import json
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from deeprad_processes import wait
from kubernetes.client.exceptions import ApiException
from redteam import refused

from deeprad.devenv.binaries import tool, tool_env
from deeprad.devenv.cluster import Cluster
from deeprad.operator.api.hospitalsite import GpuCapacity
from deeprad.operator.api.names import site_namespace
from deeprad.operator.client import Kube
from deeprad.operator.decide.sites import read_lease
from deeprad.operator.render import admission
from deeprad.operator.render.site import AGENT, site_objects
from deeprad.operator.site.config import AgentConfig
from deeprad.operator.site.decide import renew_lease

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HUB_CHART = ROOT / "helm" / "deeprad"
RELEASE = "rbac"
NAMESPACE = "deeprad-rbac"  # the release namespace (the jobs namespace)
PUSH_SECRET = "lab-kubeconfig"  # named in rbac.pushKubeconfigSecrets
KEYS_SECRET = "deeprad-hub-identity"  # the hub's private keys: the operator must not read it
SITES = ("rbac-a", "rbac-b")
STUDIES = "research"  # a study namespace
LEASES = "coordination.k8s.io/v1"
APPLIED = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
           *(o["kind"] for o in admission.policies())}
PLURALS = ("hospitalsites", "federatedstudies", "federatedrounds", "sitetasks")


@dataclass
class Hub:
    cluster: Cluster
    operator: str  # the operator ServiceAccount's username
    site_kubeconfigs: dict[str, Path] = field(default_factory=dict)

    def site_api(self, name: str) -> kubernetes.client.ApiClient:
        """An API client with a site's token, as the site chart's kubeconfig carries it."""
        return kubernetes.config.new_client_from_config(str(self.site_kubeconfigs[name]))

    def site(self, name: str) -> Kube:
        """The hub as a site's agent reaches it: its token, the agent's client."""
        return Kube.of(self.site_api(name))

    def lease(self, site: str) -> dict[str, Any]:
        obj = get(self.cluster, "lease", AGENT, "-n", site_namespace(site))
        assert obj is not None, f"Lease {site_namespace(site)}/{AGENT} is gone"
        return obj


def get(cluster: Cluster, *args: str) -> dict[str, Any] | None:
    out = cluster.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def _as(cluster: Cluster, user: str, *args: str, input: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl(f"--as={user}", *args, input=input, check=False)


def _message(exc: ApiException) -> str:
    return str(json.loads(exc.body or "{}").get("message", exc.body))


def _kubectl_error(out: subprocess.CompletedProcess[str]) -> str:
    return out.stderr.strip().removeprefix("Error from server (Forbidden): ")


def _agent(site: str) -> str:
    return f"system:serviceaccount:{site_namespace(site)}:{AGENT}"


def _render(home: Path) -> list[dict[str, Any]]:
    out = subprocess.run([tool("helm"), "template", RELEASE, str(HUB_CHART), "-n", NAMESPACE,
                          "--set", f"rbac.pushKubeconfigSecrets={{{PUSH_SECRET}}}"],
                         capture_output=True, text=True, timeout=120,
                         env=tool_env() | {"HOME": str(home)})
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _register(cluster: Cluster, site: str, keys: Path) -> str:
    """The HospitalSite, as `deeprad site register` writes it; its uid."""
    def deeprad(*args: str) -> str:
        return subprocess.run(["deeprad", *args], capture_output=True, text=True, check=True,
                              cwd="/").stdout

    deeprad("keys", "generate", "--out", str(keys / site), "--name", site)
    docs = yaml.safe_load_all(deeprad("site", "register", site, "--keys", str(keys / site)))
    cluster.kubectl("apply", "-f", "-",
                    input=json.dumps(next(d for d in docs if d["kind"] == "HospitalSite")))
    site_obj = get(cluster, "hospitalsite", site)
    assert site_obj is not None
    return str(site_obj["metadata"]["uid"])


def _deeprad(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `deeprad` command with the hub admin's kubeconfig."""
    return subprocess.run(["deeprad", *args], capture_output=True, text=True, cwd="/",
                          timeout=120, env=tool_env() | {"KUBECONFIG": str(cluster.kubeconfig)})


def _site_token(cluster: Cluster, site: str, out: Path, *extra: str) -> Path:
    done = _deeprad(cluster, "site", "token", site, "-o", str(out), "--duration", "1h", *extra)
    assert done.returncode == 0, done.stderr
    return out


def _policy_enforced(hub: Hub) -> bool:
    """A dry run of a forbidden change is refused: the policy has reached the admission chain."""
    probe = hub.lease(SITES[0])
    probe["metadata"].setdefault("labels", {})["probe"] = "1"
    out = subprocess.run([tool("kubectl"), f"--kubeconfig={hub.site_kubeconfigs[SITES[0]]}",
                          "replace", "--dry-run=server", "-f", "-"], input=json.dumps(probe),
                         capture_output=True, text=True, env=tool_env(), timeout=60)
    return out.returncode != 0 and admission.SITE_LEASE_POLICY in out.stderr


@pytest.fixture(scope="module")
def hub(hub_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    cluster = hub_cluster
    work = tmp_path_factory.mktemp("rbac")
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    *(f"crd/{p}.deeprad.io" for p in PLURALS))
    for ns in (NAMESPACE, STUDIES):
        cluster.kubectl("create", "namespace", ns, check=False)
    objs = [o for o in _render(work) if o["kind"] in APPLIED]
    cluster.kubectl("apply", "--server-side", "--field-manager=helm-test", "-f", "-",
                    input="\n---\n".join(json.dumps(o) for o in objs))
    (account,) = [o for o in objs if o["kind"] == "ServiceAccount"]
    hub = Hub(cluster, f"system:serviceaccount:{NAMESPACE}:{account['metadata']['name']}")
    for secret in (PUSH_SECRET, KEYS_SECRET):
        cluster.kubectl("-n", NAMESPACE, "create", "secret", "generic", secret,
                        "--from-literal=key=not-for-the-operator", check=False)
    wait("the operator's ClusterRoleBinding in the RBAC cache", lambda: _as(
        cluster, hub.operator, "auth", "can-i", "create", "namespaces").returncode == 0)
    for site in SITES:
        uid = _register(cluster, site, work / "keys")
        # What HospitalSite reserve() applies, sent with the operator's identity.
        stream = "\n---\n".join(json.dumps(m) for m in site_objects(site, uid))
        out = _as(cluster, hub.operator, "apply", "--server-side",
                  "--field-manager=deeprad-operator", "-f", "-", input=stream)
        assert out.returncode == 0, f"the chart's RBAC cannot reserve {site}:\n{out.stderr}"
        # The site's hub kubeconfig as the hub admin issues it (bounded, revocable token).
        hub.site_kubeconfigs[site] = work / f"{site}.kubeconfig"
        _site_token(cluster, site, hub.site_kubeconfigs[site])
    wait("the deeprad-site-lease policy in the admission chain", lambda: _policy_enforced(hub))
    yield hub
    # The sites go (their namespaces with them, by ownerReference); the policy stays, as a
    # hub keeps it: later tests' agents renew their Leases under it.
    cluster.kubectl("delete", "hospitalsite", *SITES, "--ignore-not-found", "--wait=false")


# ---- the operator reserves sites, and a site renews its Lease --------------------------------


def test_operator_token_reserves_a_site_with_the_charts_rbac(hub: Hub) -> None:
    site = SITES[0]
    for kind in ("namespace", "serviceaccount", "role", "rolebinding", "lease"):
        args = [kind, site_namespace(site)] if kind == "namespace" else \
            [kind, AGENT, "-n", site_namespace(site)]
        assert get(hub.cluster, *args) is not None, args
    # A second pass (every resume does one) is a server-side apply that changes nothing.
    stream = "\n---\n".join(json.dumps(m) for m in site_objects(
        site, hub.lease(site)["metadata"]["ownerReferences"][0]["uid"]))
    out = _as(hub.cluster, hub.operator, "apply", "--server-side",
              "--field-manager=deeprad-operator", "-f", "-", input=stream)
    assert out.returncode == 0, out.stderr


def test_site_agent_renews_its_lease_under_the_policy(hub: Hub) -> None:
    site = SITES[0]
    kube = hub.site(site)
    now = datetime.now(UTC).replace(microsecond=0)
    for gpus in (GpuCapacity(allocatable=2, capacity=2), None):  # the two shapes it writes
        current = kube.get(LEASES, "Lease", AGENT, site_namespace(site))
        renewal = renew_lease(AgentConfig(site=site), current, gpus, now)
        assert renewal is not None
        kube.replace(renewal.lease)
    report = read_lease(site, hub.lease(site))
    assert report.problem is None
    assert report.heartbeat == now
    assert report.gpus == GpuCapacity(allocatable=2, capacity=2)
    assert hub.lease(site)["spec"]["holderIdentity"] == f"{site}-agent"


def test_policy_guards_every_lease_spec_field(hub: Hub) -> None:
    """The policy names LeaseSpec's fields one by one; this API server has no others."""
    doc = json.loads(hub.cluster.kubectl(
        "get", "--raw", "/openapi/v3/apis/coordination.k8s.io/v1").stdout)
    spec = doc["components"]["schemas"]["io.k8s.api.coordination.v1.LeaseSpec"]
    assert set(spec["properties"]) == {*admission.SITE_LEASE_SPEC_FIELDS,
                                       *admission.LEASE_SPEC_GUARDED}


# ---- red team: a site rewrites its Lease -------------------------------------------------------


def _set(*path: str, to: Any) -> Callable[[dict[str, Any]], None]:
    def change(lease: dict[str, Any]) -> None:
        node = lease
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = to
    return change


def _drop(*path: str) -> Callable[[dict[str, Any]], None]:
    def change(lease: dict[str, Any]) -> None:
        node = lease
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return change


# (attack, the rule that must refuse it, the change to the Lease)
LEASE_ATTACKS: list[tuple[str, str, Callable[[dict[str, Any]], None]]] = [
    ("site adds a finalizer to its Lease (the hub cannot delete it)", "finalizers",
     _set("metadata", "finalizers", to=["evil.example/keep"])),
    ("site relabels its Lease as another site's", "labels",
     _set("metadata", "labels", "deeprad.io/site", to=SITES[1])),
    ("site removes its Lease's ownerReference (outlives its HospitalSite)", "ownerReferences",
     _drop("metadata", "ownerReferences")),
    ("site annotates its Lease beyond its report", "annotations",
     _set("metadata", "annotations", "deeprad.io/agent-version-override", to="9.9.9")),
    ("site rewrites its Lease's acquireTime", "spec",
     _set("spec", "acquireTime", to="2020-01-01T00:00:00.000000Z")),
    ("site claims another site's agent as its Lease's holder", "holder",
     _set("spec", "holderIdentity", to=f"{SITES[1]}-agent")),
]


@pytest.mark.parametrize("index", range(len(LEASE_ATTACKS)),
                         ids=[rule for _, rule, _ in LEASE_ATTACKS])
def test_redteam_site_rewrites_its_lease(hub: Hub, index: int) -> None:
    attack, rule, change = LEASE_ATTACKS[index]
    site = SITES[0]
    kube = hub.site(site)
    before = hub.lease(site)
    body = copy.deepcopy(before)
    change(body)
    assert body != before
    with pytest.raises(ApiException) as exc:
        kube.replace(body)
    message = _message(exc.value)
    assert exc.value.status == 403, message
    assert f"{admission.SITE_LEASE_POLICY} ({rule}):" in message, message
    assert hub.lease(site) == before, "the Lease changed"
    refused(attack, f"ValidatingAdmissionPolicy {admission.SITE_LEASE_POLICY}",
            message.split("denied request: ", 1)[-1])


def test_redteam_site_rewrites_another_sites_lease(hub: Hub) -> None:
    me, other = SITES
    before = hub.lease(other)
    body = copy.deepcopy(before)
    body["spec"] = {**(body.get("spec") or {}), "holderIdentity": f"{me}-agent",
                    "renewTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
    with pytest.raises(ApiException) as exc:
        hub.site(me).replace(body)
    message = _message(exc.value)
    assert exc.value.status == 403
    assert f'cannot update resource "leases" in API group "coordination.k8s.io" in the ' \
           f'namespace "{site_namespace(other)}"' in message, message
    assert hub.lease(other) == before
    refused("site renews another site's Lease (fakes its heartbeat)",
            f"hub RBAC (Role {AGENT} of {site_namespace(me)} only)", message)


def test_redteam_site_patches_or_deletes_its_lease(hub: Hub) -> None:
    """`patch` and `delete` are not granted: the policy sees every write as a whole update."""
    site = SITES[0]
    before = hub.lease(site)
    leases = kubernetes.client.CoordinationV1Api(hub.site_api(site))
    ns = site_namespace(site)
    attempts: list[tuple[str, Callable[[], Any]]] = [
        ("site merge-patches a finalizer onto its Lease", lambda: leases.patch_namespaced_lease(
            AGENT, ns, {"metadata": {"finalizers": ["evil.example/keep"]}})),
        ("site deletes its Lease", lambda: leases.delete_namespaced_lease(AGENT, ns)),
    ]
    for attack, attempt in attempts:
        with pytest.raises(ApiException) as exc:
            attempt()
        message = _message(exc.value)
        assert exc.value.status == 403 and "cannot" in message, message
        assert hub.lease(site) == before
        refused(attack, f"hub RBAC (Role {AGENT}: get, update)", message)


# ---- red team: the operator's token -------------------------------------------------------------


def test_redteam_operator_token_reads_the_hub_private_keys(hub: Hub) -> None:
    out = _as(hub.cluster, hub.operator, "get", "secret", KEYS_SECRET, "-n", NAMESPACE)
    assert out.returncode != 0
    assert f'cannot get resource "secrets" in API group "" in the namespace "{NAMESPACE}"' \
        in out.stderr, out.stderr
    refused("operator token reads the hub's private keys Secret",
            "hub chart RBAC (Secrets by resourceNames)", _kubectl_error(out))
    # The one Secret it may read, by name (rbac.pushKubeconfigSecrets):
    assert _as(hub.cluster, hub.operator, "get", "secret", PUSH_SECRET, "-n",
               NAMESPACE).returncode == 0


def test_redteam_operator_token_takes_over_a_system_lease(hub: Hub) -> None:
    leases = json.loads(hub.cluster.kubectl("get", "leases", "-n", "kube-system", "-o",
                                            "json").stdout)["items"]
    target = leases[0]  # the API server's identity Lease, renewed every few seconds
    name = target["metadata"]["name"]
    holder = target["spec"]["holderIdentity"]
    body = copy.deepcopy(target)
    body["spec"]["holderIdentity"] = "deeprad-operator"
    out = _as(hub.cluster, hub.operator, "replace", "-f", "-", input=json.dumps(body))
    assert out.returncode != 0
    assert 'cannot update resource "leases"' in out.stderr, out.stderr
    after = get(hub.cluster, "lease", name, "-n", "kube-system")
    assert after is not None and after["spec"]["holderIdentity"] == holder
    refused("operator token takes over a kube-system Lease",
            "hub chart RBAC (Leases by resourceNames)", _kubectl_error(out))


# ---- kubectl auth can-i -------------------------------------------------------------------------

_A, _B = (site_namespace(s) for s in SITES)
_NEW = site_namespace("rbac-new")  # a site not registered yet
_T = "deeprad.io"
# The operator's ServiceAccount: what helm/deeprad/README.md ("RBAC") lists, then what it must
# not do. Each entry is `kubectl auth can-i` arguments.
OPERATOR_ALLOWED = [
    f"list hospitalsites.{_T}", f"watch hospitalsites.{_T}", f"patch hospitalsites.{_T}",
    f"patch hospitalsites.{_T} --subresource=status",
    f"watch federatedstudies.{_T} -n {STUDIES}", f"patch federatedstudies.{_T} -n {STUDIES}",
    f"patch federatedstudies.{_T} --subresource=status -n {STUDIES}",
    f"create federatedrounds.{_T} -n {STUDIES}", f"patch federatedrounds.{_T} -n {STUDIES}",
    f"patch federatedrounds.{_T} --subresource=status -n {STUDIES}",
    f"list sitetasks.{_T} --all-namespaces", f"create sitetasks.{_T} -n {_A}",
    f"delete sitetasks.{_T} -n {_A}", f"patch sitetasks.{_T} --subresource=status -n {_A}",
    "create namespaces", f"patch namespaces/{_NEW}", "watch namespaces",
    f"create serviceaccounts/{AGENT} -n {_NEW}", f"patch serviceaccounts/{AGENT} -n {_NEW}",
    f"create roles.rbac.authorization.k8s.io/{AGENT} -n {_NEW}",
    f"create rolebindings.rbac.authorization.k8s.io/{AGENT} -n {_NEW}",
    *(f"{verb} leases.coordination.k8s.io/{AGENT} -n {ns}"
      for verb in ("get", "create", "patch", "update") for ns in (_A, _NEW)),
    f"create events -n {STUDIES}", f"create events.events.k8s.io -n {_A}",
    "watch customresourcedefinitions.apiextensions.k8s.io",
    f"create jobs.batch -n {NAMESPACE}", f"delete jobs.batch -n {NAMESPACE}",
    f"list pods -n {NAMESPACE}", f"get pods --subresource=log -n {NAMESPACE}",
    f"get secrets/{PUSH_SECRET} -n {NAMESPACE}",
]
OPERATOR_DENIED = [
    "update leases.coordination.k8s.io -n kube-system",
    "update leases.coordination.k8s.io/kube-controller-manager -n kube-system",
    "create leases.coordination.k8s.io -n kube-node-lease",
    "list leases.coordination.k8s.io --all-namespaces", f"list leases.coordination.k8s.io -n {_A}",
    f"delete leases.coordination.k8s.io/{AGENT} -n {_A}",
    f"get secrets -n {NAMESPACE}", f"list secrets -n {NAMESPACE}",
    f"get secrets/{KEYS_SECRET} -n {NAMESPACE}", f"get secrets/{PUSH_SECRET} -n kube-system",
    "watch secrets --all-namespaces",
    f"create pods -n {NAMESPACE}", "create pods -n kube-system",
    f"create pods --subresource=exec -n {NAMESPACE}", f"patch jobs.batch -n {NAMESPACE}",
    f"create jobs.batch -n {STUDIES}",
    f"create hospitalsites.{_T}", f"delete hospitalsites.{_T}",
    f"create federatedstudies.{_T} -n {STUDIES}", f"delete federatedstudies.{_T} -n {STUDIES}",
    f"update sitetasks.{_T} -n {_A}", f"deletecollection sitetasks.{_T} -n {_A}",
    "create serviceaccounts -n kube-system", f"create serviceaccounts -n {_A}",
    f"create serviceaccounts/{AGENT} --subresource=token -n {_A}",
    "create rolebindings.rbac.authorization.k8s.io -n kube-system",
    "create roles.rbac.authorization.k8s.io -n kube-system",
    "create clusterrolebindings.rbac.authorization.k8s.io",
    "bind clusterroles.rbac.authorization.k8s.io",
    f"escalate roles.rbac.authorization.k8s.io -n {_A}",
    "impersonate serviceaccounts --all-namespaces", "delete namespaces/kube-system",
    f"patch validatingadmissionpolicies.admissionregistration.k8s.io/"
    f"{admission.SITE_LEASE_POLICY}",
    f"delete validatingadmissionpolicybindings.admissionregistration.k8s.io/"
    f"{admission.SITE_LEASE_POLICY}",
]
# A site's hub token (its agent's ServiceAccount): the Role in render/site.py.
SITE_ALLOWED = [
    f"get sitetasks.{_T} -n {_A}", f"list sitetasks.{_T} -n {_A}",
    f"watch sitetasks.{_T} -n {_A}", f"patch sitetasks.{_T} --subresource=status -n {_A}",
    f"get leases.coordination.k8s.io/{AGENT} -n {_A}",
    f"update leases.coordination.k8s.io/{AGENT} -n {_A}",
]
SITE_DENIED = [
    f"list sitetasks.{_T} -n {_B}", f"get sitetasks.{_T} -n {_B}",
    f"patch sitetasks.{_T} --subresource=status -n {_B}", f"list sitetasks.{_T} --all-namespaces",
    f"create sitetasks.{_T} -n {_A}", f"update sitetasks.{_T} -n {_A}",
    f"patch sitetasks.{_T} -n {_A}", f"delete sitetasks.{_T} -n {_A}",
    f"get leases.coordination.k8s.io/{AGENT} -n {_B}",
    f"update leases.coordination.k8s.io/{AGENT} -n {_B}",
    f"patch leases.coordination.k8s.io/{AGENT} -n {_A}",
    f"delete leases.coordination.k8s.io/{AGENT} -n {_A}",
    f"create leases.coordination.k8s.io -n {_A}", f"list leases.coordination.k8s.io -n {_A}",
    "update leases.coordination.k8s.io -n kube-system",
    f"get secrets -n {_A}", f"create pods -n {_A}", f"list hospitalsites.{_T}",
    f"get namespaces/{_A}", f"create serviceaccounts/{AGENT} --subresource=token -n {_A}",
    f"create federatedstudies.{_T} -n {STUDIES}",
]


def _can_i(cluster: Cluster, user: str, check: str) -> bool:
    out = _as(cluster, user, "auth", "can-i", *check.split())
    answer = out.stdout.strip()
    assert answer in ("yes", "no"), f"can-i {check}: {out.stdout}{out.stderr}"
    return answer == "yes"


def test_rbac_can_i_matrix(hub: Hub) -> None:
    site = _agent(SITES[0])
    cases = ([(hub.operator, c, True) for c in OPERATOR_ALLOWED]
             + [(hub.operator, c, False) for c in OPERATOR_DENIED]
             + [(site, c, True) for c in SITE_ALLOWED]
             + [(site, c, False) for c in SITE_DENIED])
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda case: _can_i(hub.cluster, case[0], case[1]), cases))
    wrong = [f"{'operator' if user == hub.operator else 'site'}: can-i {check} -> "
             f"{'yes' if got else 'no'}, expected {'yes' if want else 'no'}"
             for (user, check, want), got in zip(cases, answers, strict=True) if got != want]
    assert not wrong, "\n".join(wrong)


# ---- the site's hub token: bounded lifetime, rotation, revocation ---------------------------


def _claims(kubeconfig: Path) -> dict[str, Any]:
    token = yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"]
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def _anchors(hub: Hub, site: str) -> set[str]:
    found = get(hub.cluster, "secrets", "-n", site_namespace(site), "-l",
                f"deeprad.io/agent-token={site}")
    return {item["metadata"]["name"] for item in (found or {}).get("items", [])}


def _list_tasks(kubeconfig: Path, site: str) -> int:
    """The HTTP status of a site listing its SiteTasks with this kubeconfig's token."""
    try:
        Kube.of(kubernetes.config.new_client_from_config(str(kubeconfig))).list_objects(
            "deeprad.io/v1alpha1", "SiteTask", site_namespace(site))
    except ApiException as exc:
        return int(exc.status)
    return 200


def test_site_token_has_a_bounded_lifetime_and_a_revocation_anchor(hub: Hub) -> None:
    site = SITES[0]
    claims = _claims(hub.site_kubeconfigs[site])
    assert claims["exp"] - claims["iat"] == 3600  # --duration 1h, as the API server granted
    anchor = claims["kubernetes.io"]["secret"]["name"]
    assert anchor in _anchors(hub, site)
    assert claims["sub"] == _agent(site)
    config = yaml.safe_load(hub.site_kubeconfigs[site].read_text())
    assert "certificate-authority-data" in config["clusters"][0]["cluster"]  # inline only
    assert oct(hub.site_kubeconfigs[site].stat().st_mode & 0o777) == "0o600"


def test_site_token_over_90_days_is_refused_before_anything_is_created(hub: Hub,
                                                                       tmp_path: Path) -> None:
    site, out = SITES[0], tmp_path / "long.kubeconfig"
    before = _anchors(hub, site)
    done = _deeprad(hub.cluster, "site", "token", site, "-o", str(out), "--duration", "91d")
    assert done.returncode == 2
    assert "between 10m and 90d" in done.stderr and "rotate it" in done.stderr
    assert _anchors(hub, site) == before and not out.exists()


def test_redteam_site_keeps_using_its_token_after_rotation(hub: Hub, tmp_path: Path) -> None:
    site = SITES[1]
    old = hub.site_kubeconfigs[site]
    assert _list_tasks(old, site) == 200
    lease_before = hub.lease(site)
    new = _site_token(hub.cluster, site, tmp_path / "rotated.kubeconfig", "--revoke-others")
    hub.site_kubeconfigs[site] = new  # later tests act as the site with its current token
    assert _anchors(hub, site) == {_claims(new)["kubernetes.io"]["secret"]["name"]}
    # The API server caches a token's review for a few seconds; then the old one is refused.
    wait("the rotated-out token to be refused", lambda: _list_tasks(old, site) == 401,
         timeout=60)
    renewal = renew_lease(AgentConfig(site=site), lease_before, None, datetime.now(UTC))
    assert renewal is not None
    with pytest.raises(ApiException) as caught:
        Kube.of(kubernetes.config.new_client_from_config(str(old))).replace(renewal.lease)
    assert caught.value.status == 401
    assert hub.lease(site)["spec"] == lease_before["spec"]  # nothing written with the old token
    assert _list_tasks(new, site) == 200
    refused("site keeps using its hub token after rotation",
            "kube-apiserver (token bound to a deleted anchor Secret)",
            f"{caught.value.status} {caught.value.reason}")
