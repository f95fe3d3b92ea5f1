"""The Kubernetes side of the operator's *act* layer: the client configuration, the few API
calls the hub makes, and the error handling every reconcile pass shares."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import kopf
import kubernetes
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from pydantic import BaseModel

from deeprad.operator import metrics
from deeprad.operator.render.meta import FIELD_MANAGER, Manifest

_SA_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
M = TypeVar("M", bound=BaseModel)


# ---- the API client ---------------------------------------------------------------------------


def load_configuration(kubeconfig: str | None = None, context: str | None = None
                       ) -> kubernetes.client.Configuration:
    """Client configuration: the given kubeconfig/context, else in-cluster when running in a
    pod, else $KUBECONFIG or ~/.kube/config."""
    cfg = kubernetes.client.Configuration()
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and _SA_TOKEN.exists()
    if kubeconfig or context or not in_cluster:
        kubernetes.config.load_kube_config(config_file=kubeconfig, context=context,
                                           client_configuration=cfg, persist_config=False)
    else:
        kubernetes.config.load_incluster_config(client_configuration=cfg)
    return cfg


def token_expiry(cfg: kubernetes.client.Configuration) -> datetime | None:
    """When the configuration's bearer token expires: the JWT's `exp` claim, read but not
    verified (the API server verifies; this is for warnings). None without a readable one."""
    header = cfg.get_api_key_with_prefix("BearerToken") or \
        cfg.get_api_key_with_prefix("authorization") or ""
    try:
        payload = header.split()[-1].split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return datetime.fromtimestamp(int(claims["exp"]), UTC)
    except (IndexError, ValueError, KeyError, TypeError):
        return None


def connection_info(cfg: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials from a loaded client configuration (as kopf's own client login
    does, but for the configuration we chose rather than the process default)."""
    header = cfg.get_api_key_with_prefix("BearerToken") or \
        cfg.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else \
        (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return kopf.ConnectionInfo(
        server=cfg.host, ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl,
        username=cfg.username or None, password=cfg.password or None, scheme=scheme,
        token=token, certificate_path=cfg.cert_file, private_key_path=cfg.key_file)


class Kube:
    """The few API calls the hub makes, on the kubernetes client's dynamic client."""

    def __init__(self, cfg: kubernetes.client.Configuration) -> None:
        self._dyn = DynamicClient(kubernetes.client.ApiClient(cfg))

    @classmethod
    def of(cls, api: kubernetes.client.ApiClient) -> Kube:
        """A Kube on an existing API client (its configuration and connections). Like the
        constructor, it reads the server's discovery documents, so the server must answer."""
        kube = cls.__new__(cls)
        kube._dyn = DynamicClient(api)
        return kube

    def _resource(self, manifest: Manifest) -> Any:
        return self._dyn.resources.get(api_version=manifest["apiVersion"],
                                       kind=manifest["kind"])

    def apply(self, manifest: Manifest) -> dict[str, Any]:
        """Server-side apply as `deeprad-operator`, taking over fields others set."""
        meta = manifest["metadata"]
        out = self._dyn.server_side_apply(self._resource(manifest), body=manifest,
                                          name=meta["name"], namespace=meta.get("namespace"),
                                          field_manager=FIELD_MANAGER, force_conflicts=True)
        return dict(out.to_dict())

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None
            ) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        res = self._dyn.resources.get(api_version=api_version, kind=kind)
        try:
            return dict(self._dyn.get(res, name=name, namespace=namespace).to_dict())
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None
               ) -> None:
        """Delete the object (children in the background); a missing object is fine."""
        res = self._dyn.resources.get(api_version=api_version, kind=kind)
        try:
            self._dyn.delete(res, name=name, namespace=namespace,
                             body={"propagationPolicy": "Background"})
        except ApiException as exc:
            if exc.status != 404:
                raise

    def patch_status(self, api_version: str, kind: str, name: str, namespace: str | None,
                     status: dict[str, Any]) -> None:
        """Merge-patch fields of another object's status."""
        res = self._dyn.resources.get(api_version=api_version, kind=kind).subresources["status"]
        self._dyn.patch(res, body={"status": status}, name=name, namespace=namespace,
                        content_type="application/merge-patch+json")

    def list_objects(self, api_version: str, kind: str, namespace: str | None = None,
                     label_selector: str | None = None) -> list[dict[str, Any]]:
        """The objects of a kind (in `namespace`, matching `label_selector`, when given).
        Parsed as plain JSON: the dynamic client's wrappers, for a LIST of a thousand
        HospitalSites, cost tens of MiB of short-lived objects for nothing."""
        res = self._dyn.resources.get(api_version=api_version, kind=kind)
        out = self._dyn.get(res, namespace=namespace, label_selector=label_selector,
                            serialize=False)
        return [dict(item) for item in json.loads(out.data).get("items") or ()]

    def create(self, manifest: Manifest) -> bool:
        """Create the object; False when its name is taken (the existing one is left alone)."""
        meta = manifest["metadata"]
        try:
            self._dyn.create(self._resource(manifest), body=manifest,
                             namespace=meta.get("namespace"), field_manager=FIELD_MANAGER)
        except ApiException as exc:
            if exc.status != 409:
                raise
            return False
        return True

    def replace(self, manifest: Manifest) -> dict[str, Any]:
        """Write the object back whole; the server refuses it (409) when its resourceVersion
        is no longer current. For Roles that grant `update` but not `patch`."""
        meta = manifest["metadata"]
        out = self._dyn.replace(self._resource(manifest), body=manifest, name=meta["name"],
                                namespace=meta.get("namespace"), field_manager=FIELD_MANAGER)
        return dict(out.to_dict())

    def job_log(self, namespace: str, job: str, phase: str | None = None,
                tail_lines: int = 40) -> str:
        """The log tail of a Job's newest pod (in `phase`, when one is); a note when
        unreadable. What `job_pod_log` reads, through this client."""
        try:
            pods = self.list_objects("v1", "Pod", namespace,
                                     label_selector=f"batch.kubernetes.io/job-name={job}")
            if not pods:
                return "(no pod)"
            chosen = [p for p in pods if (p.get("status") or {}).get("phase") == phase] or pods
            newest = max(chosen, key=lambda p: str(p["metadata"].get("creationTimestamp") or ""))
            # serialize=False: a log that happens to be one JSON document stays text.
            out = self._dyn.request(
                "GET", f"/api/v1/namespaces/{namespace}/pods/{newest['metadata']['name']}/log",
                query_params=[("tailLines", tail_lines)], serialize=False)
            return bytes(out.data).decode("utf-8", errors="replace")
        except ApiException as exc:
            return f"(log unavailable: {exc.status} {exc.reason})"

    def create_or_get(self, manifest: Manifest) -> tuple[dict[str, Any], bool]:
        """Create the object; if the name is taken, the existing one. True when created."""
        meta = manifest["metadata"]
        try:
            out = self._dyn.create(self._resource(manifest), body=manifest,
                                   namespace=meta.get("namespace"),
                                   field_manager=FIELD_MANAGER)
            return dict(out.to_dict()), True
        except ApiException as exc:
            if exc.status != 409:
                raise
        existing = self.get(manifest["apiVersion"], manifest["kind"], meta["name"],
                            meta.get("namespace"))
        if existing is None:  # deleted between the two calls: the next pass creates it
            raise kopf.TemporaryError(f"{manifest['kind']} {meta['name']} was deleted while "
                                      "being created; retrying", delay=1)
        return existing, False


@contextlib.contextmanager
def reconciling(kind: str, name: str) -> Iterator[None]:
    """Count errors of one reconcile pass; API errors become a TemporaryError naming the
    object, the call and the server's answer."""
    start = time.perf_counter()
    try:
        yield
    except ApiException as exc:
        metrics.RECONCILE_ERRORS.labels(kind=kind).inc()
        raise kopf.TemporaryError(f"{kind} {name}: API call failed ({exc.status} {exc.reason}):"
                                  f" {(exc.body or '')[:500]}", delay=5) from exc
    except Exception:
        metrics.RECONCILE_ERRORS.labels(kind=kind).inc()
        raise
    finally:
        metrics.RECONCILE_DURATION.labels(kind=kind).observe(time.perf_counter() - start)


def parse(model: type[M], data: Any) -> M:
    """A spec or status dict as its typed model; unknown status keys (other writers) are
    dropped, since the schema prunes them anyway."""
    raw = dict(data or {})
    keys = {f.alias or n for n, f in model.model_fields.items()} | set(model.model_fields)
    return model.model_validate({k: v for k, v in raw.items() if k in keys})






def job_pod_log(core: kubernetes.client.CoreV1Api, namespace: str, job: str,
                phase: str | None = None, tail_lines: int = 40) -> str:
    """The log tail of a Job's newest pod (in `phase`, when one is); a note when unreadable."""
    try:
        pods = core.list_namespaced_pod(
            namespace, label_selector=f"batch.kubernetes.io/job-name={job}").to_dict()["items"]
        if not pods:
            return "(no pod)"
        chosen = [p for p in pods if (p.get("status") or {}).get("phase") == phase] or pods
        newest = max(chosen, key=lambda p: str(p["metadata"].get("creation_timestamp") or ""))
        return str(core.read_namespaced_pod_log(str(newest["metadata"]["name"]), namespace,
                                                tail_lines=tail_lines))
    except ApiException as exc:
        return f"(log unavailable: {exc.status} {exc.reason})"
