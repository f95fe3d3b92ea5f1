"""A container's environment and command line, resolved the way kubelet resolves them.

The image is not pulled or used: every image maps to the local install. `python`, `python3` and
`python3.X` (bare or as an absolute path) run this interpreter (`sys.executable`); any other
command is looked up on the agent's PATH when its absolute path does not exist on the host.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import sys
from collections.abc import Callable
from typing import Any

from deeprad.devenv.kube_rest import ApiError, KubeClient
from deeprad.devenv.pod_volumes import PodSetupError

JSON = dict[str, Any]

_PYTHON_NAMES = re.compile(r"^python(3(\.\d+)?)?$")
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubelet's $(VAR) expansion: known names are replaced, $$ escapes, unknown refs stay."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(repl, text)


def field_value(pod: JSON, path: str) -> str:
    """The value of a downward-API fieldPath of pod."""
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status", {})
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.hostIP": "127.0.0.1",
        "status.hostIPs": "127.0.0.1",
        "status.podIP": "127.0.0.1",
        "status.podIPs": "127.0.0.1",
    }
    if path in simple:
        return str(simple[path])
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    _ = status
    raise PodSetupError(f"fieldRef {path!r} is not supported by the devenv agent")


class EnvResolver:
    """Reads the ConfigMaps and Secrets a container's env refers to."""

    def __init__(self, client: KubeClient, pod: JSON) -> None:
        self.client = client
        self.pod = pod
        self.ns = pod["metadata"]["namespace"]
        self._cache: dict[tuple[str, str], dict[str, str] | None] = {}

    def _data(self, kind: str, name: str, optional: bool) -> dict[str, str] | None:
        key = (kind, name)
        if key not in self._cache:
            resource = "configmaps" if kind == "ConfigMap" else "secrets"
            try:
                obj = self.client.get(f"/api/v1/namespaces/{self.ns}/{resource}/{name}")
            except ApiError as exc:
                if exc.status != 404:
                    raise
                self._cache[key] = None
            else:
                raw = obj.get("data") or {}
                if kind == "Secret":
                    raw = {k: base64.b64decode(v).decode(errors="replace") for k, v in raw.items()}
                self._cache[key] = dict(raw)
        data = self._cache[key]
        if data is None and not optional:
            raise PodSetupError(f"{kind} {self.ns}/{name} not found (CreateContainerConfigError)")
        return data

    def _key_ref(self, kind: str, ref: JSON) -> str | None:
        data = self._data(kind, ref["name"], bool(ref.get("optional")))
        if data is None:
            return None
        if ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise PodSetupError(f"{kind} {self.ns}/{ref['name']} has no key {ref['key']!r}")
        return data[ref["key"]]

    def resolve(self, container: JSON, base: dict[str, str]) -> dict[str, str]:
        """base, then envFrom, then env (later wins), with $(VAR) expansion as kubelet does."""
        env = dict(base)
        for source in container.get("envFrom", []):
            prefix = source.get("prefix", "")
            for kind, ref_key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if ref_key in source:
                    ref = source[ref_key]
                    env |= {prefix + k: v for k, v in
                            (self._data(kind, ref["name"], bool(ref.get("optional"))) or {}
                             ).items()}
        for var in container.get("env", []):
            value: str | None
            if "valueFrom" not in var:
                value = expand(var.get("value", ""), env)
            else:
                source = var["valueFrom"]
                if "fieldRef" in source:
                    value = field_value(self.pod, source["fieldRef"]["fieldPath"])
                elif "secretKeyRef" in source:
                    value = self._key_ref("Secret", source["secretKeyRef"])
                elif "configMapKeyRef" in source:
                    value = self._key_ref("ConfigMap", source["configMapKeyRef"])
                elif "resourceFieldRef" in source:
                    value = _resource_value(container, source["resourceFieldRef"])
                else:
                    raise PodSetupError(f"env {var['name']}: unsupported valueFrom {list(source)}")
            if value is not None:
                env[var["name"]] = value
        return env


def _resource_value(container: JSON, ref: JSON) -> str:
    kind, _, name = ref["resource"].partition(".")
    resources = container.get("resources", {})
    value = (resources.get(kind) or {}).get(name)
    if value is None and kind == "requests":
        value = (resources.get("limits") or {}).get(name)
    return str(value if value is not None else "0")


def resolve_executable(argv0: str, path_env: str) -> str:
    """Map an image's command to the local install (see the module docstring)."""
    base = os.path.basename(argv0)
    if _PYTHON_NAMES.match(base):
        return sys.executable
    if os.path.isabs(argv0) and os.access(argv0, os.X_OK):
        return argv0
    found = shutil.which(base, path=path_env)
    if found:
        return found
    raise PodSetupError(f"executable {argv0!r} not found on the host PATH")


def command_line(container: JSON, env: dict[str, str],
                 rewrite: Callable[[str], str]) -> list[str]:
    """command + args, expanded and path-rewritten, argv[0] mapped to the local install."""
    command = [expand(c, env) for c in container.get("command", [])]
    args = [expand(a, env) for a in container.get("args", [])]
    argv = [rewrite(a) for a in (command + args)]
    if not argv:
        raise PodSetupError(
            f"container {container['name']}: no command; the devenv agent cannot read the "
            "image's entrypoint, so set `command`"
        )
    argv[0] = resolve_executable(argv[0], env.get("PATH", os.defpath))
    return argv
