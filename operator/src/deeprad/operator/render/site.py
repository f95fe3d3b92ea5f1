"""What the hub reserves for one site: namespace `deeprad-site-<site>` (PodSecurity
restricted), the agent's ServiceAccount, a Role that lets it read its SiteTasks, patch their
status and renew its heartbeat Lease (nothing else), the RoleBinding, and the Lease itself
(created here because `create` cannot be limited to one name)."""

from __future__ import annotations

from deeprad.operator.api.names import site_namespace
from deeprad.operator.render.meta import LABEL_SITE, Manifest, labels, owner_reference

AGENT = "deeprad-agent"  # name of the agent's ServiceAccount, Role, RoleBinding and Lease
COMPONENT = "site-agent"
POD_SECURITY = "restricted"


def namespace(site: str, uid: str) -> Manifest:
    """The site's hub namespace; only its agent's Role reaches into it."""
    pod_security = {f"pod-security.kubernetes.io/{mode}": POD_SECURITY
                    for mode in ("enforce", "audit", "warn")}
    pod_security["pod-security.kubernetes.io/enforce-version"] = "latest"
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": site_namespace(site),
        "labels": {**labels(COMPONENT, **{LABEL_SITE: site}), **pod_security},
        "ownerReferences": [owner_reference("HospitalSite", site, uid)]}}


def _meta(site: str, uid: str, name: str = AGENT) -> Manifest:
    return {"name": name, "namespace": site_namespace(site),
            "labels": labels(COMPONENT, **{LABEL_SITE: site}),
            "ownerReferences": [owner_reference("HospitalSite", site, uid)]}


def service_account(site: str, uid: str) -> Manifest:
    """The identity the site agent uses against the hub."""
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(site, uid),
            "automountServiceAccountToken": False}


def role(site: str, uid: str) -> Manifest:
    """Read its SiteTasks, patch their status, get and update its Lease; nothing else. RBAC
    cannot limit an update to some fields: the `deeprad-site-lease` admission policy
    (render/admission.py) lets the agent change only its heartbeat and report there."""
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": _meta(site, uid), "rules": [
                {"apiGroups": ["deeprad.io"], "resources": ["sitetasks"],
                 "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["deeprad.io"], "resources": ["sitetasks/status"],
                 "verbs": ["patch"]},
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                 "resourceNames": [AGENT], "verbs": ["get", "update"]},
            ]}


def role_binding(site: str, uid: str) -> Manifest:
    """Binds the Role to the agent's ServiceAccount, in the site's namespace only."""
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": _meta(site, uid),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": AGENT},
            "subjects": [{"kind": "ServiceAccount", "name": AGENT,
                          "namespace": site_namespace(site)}]}


def lease(site: str, uid: str) -> Manifest:
    """The heartbeat Lease; the agent owns its spec (renewTime) and its report annotations,
    the hub only its labels, so server-side apply never fights over it."""
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": _meta(site, uid)}


def site_objects(site: str, uid: str) -> list[Manifest]:
    """Everything reserved for a site, in apply order (namespace first)."""
    return [namespace(site, uid), service_account(site, uid), role(site, uid),
            role_binding(site, uid), lease(site, uid)]
