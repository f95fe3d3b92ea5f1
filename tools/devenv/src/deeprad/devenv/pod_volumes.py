"""Pod volumes as host folders, and the mapping of container paths onto them.

No container means no mount namespace: a volume is a folder, and every absolute path a container
would see under a mountPath is rewritten to the folder instead. Rewriting covers the command,
args, env values and workingDir (see `PathMap.rewrite`). Mapping by volume type:

- emptyDir: `<pod dir>/volumes/<volume>`, deleted with the pod's folder.
- hostPath: the host path itself (created for DirectoryOrCreate / unset type).
- persistentVolumeClaim: the hostPath (or local) path of the bound PersistentVolume; the node
  agent's provisioner makes one folder per claim.
- configMap, secret, downwardAPI, projected (serviceAccountToken, configMap, secret,
  downwardAPI): files written into `<pod dir>/volumes/<volume>`; service-account tokens come from
  the TokenRequest API, bound to the pod.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deeprad.devenv.kube_rest import ApiError, KubeClient

JSON = dict[str, Any]

TOKEN_REFRESH_SECONDS = 600.0


class PodSetupError(RuntimeError):
    """A volume or env source is not ready (missing Secret, unbound claim); the pod waits."""


@dataclass
class PathMap:
    """Container mount paths → host folders; rewrites strings that refer to them."""

    mounts: dict[str, Path] = field(default_factory=dict)
    _pattern: re.Pattern[str] | None = None

    def add(self, mount_path: str, host: Path) -> None:
        """Map mount_path (absolute, in the container) to a host folder or file."""
        self.mounts[mount_path.rstrip("/") or "/"] = host
        self._pattern = None

    def rewrite(self, text: str) -> str:
        """Replace each mount path that appears at a path boundary with its host folder.

        `/data`, `/data/x`, `--dir=/data` and `a:/data` are rewritten; `/database` and
        `/x/data` are not. Longer mount paths win over their prefixes.
        """
        if not self.mounts:
            return text
        if self._pattern is None:
            alternatives = "|".join(
                re.escape(m) for m in sorted(self.mounts, key=len, reverse=True)
            )
            self._pattern = re.compile(rf"(?<![\w./-])({alternatives})(?=$|[/\s\"':;,=])")
        return self._pattern.sub(lambda m: str(self.mounts[m.group(1)]), text)

    def host_path(self, container_path: str) -> Path | None:
        """The host location of an absolute container path, if it lies under a mount."""
        rewritten = self.rewrite(container_path)
        return Path(rewritten) if rewritten != container_path else None


def _write_file(path: Path, data: bytes, mode: int | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode if mode is not None else 0o644)
    os.replace(tmp, path)  # atomic, so a reader never sees half a token


def _key_items(data: dict[str, bytes], items: list[JSON] | None, default_mode: int | None
               ) -> list[tuple[str, bytes, int | None]]:
    if not items:
        return [(k, v, default_mode) for k, v in data.items()]
    out = []
    for item in items:
        if item["key"] in data:
            out.append((item["path"], data[item["key"]], item.get("mode", default_mode)))
    return out


class VolumeBuilder:
    """Materialises one pod's volumes under its folder."""

    def __init__(self, client: KubeClient, pod: JSON, pod_dir: Path,
                 field_value: Callable[[str], str]) -> None:
        self.client = client
        self.pod = pod
        self.ns = pod["metadata"]["namespace"]
        self.pod_dir = pod_dir
        self.field_value = field_value
        self.host_dirs: dict[str, Path] = {}
        self._token_volumes: list[JSON] = []

    def build_all(self) -> dict[str, Path]:
        """Prepare every volume; returns volume name → host folder."""
        for volume in self.pod["spec"].get("volumes", []):
            self.host_dirs[volume["name"]] = self._build(volume)
        return self.host_dirs

    def refresh_tokens(self) -> None:
        """Rewrite projected volumes that hold service-account tokens (new expiry)."""
        for volume in self._token_volumes:
            self._projected(volume, self.host_dirs[volume["name"]])

    def path_map(self, container: JSON) -> PathMap:
        """The mount → folder map of one container (subPath honoured)."""
        paths = PathMap()
        for mount in container.get("volumeMounts", []):
            host = self.host_dirs[mount["name"]]
            sub = mount.get("subPath")
            if sub:
                host = host / sub
                if not host.exists() and not mount.get("readOnly"):
                    host.mkdir(parents=True, exist_ok=True)
            paths.add(mount["mountPath"], host)
        return paths

    def _folder(self, name: str) -> Path:
        folder = self.pod_dir / "volumes" / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _build(self, volume: JSON) -> Path:
        name = volume["name"]
        if "emptyDir" in volume:
            return self._folder(name)
        if "hostPath" in volume:
            path = Path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type", "") in ("", "DirectoryOrCreate"):
                path.mkdir(parents=True, exist_ok=True)
            return path
        if "persistentVolumeClaim" in volume:
            return self._claim_path(volume["persistentVolumeClaim"]["claimName"])
        folder = self._folder(name)
        if "configMap" in volume:
            self._config_map(volume["configMap"], folder)
        elif "secret" in volume:
            self._secret(volume["secret"], folder)
        elif "downwardAPI" in volume:
            self._downward(volume["downwardAPI"].get("items", []), folder,
                           volume["downwardAPI"].get("defaultMode"))
        elif "projected" in volume:
            self._projected(volume, folder)
            if any("serviceAccountToken" in s for s in volume["projected"].get("sources", [])):
                self._token_volumes.append(volume)
        else:
            kinds = sorted(set(volume) - {"name"})
            raise PodSetupError(f"volume {name}: type {kinds} not supported by the devenv agent")
        return folder

    def _claim_path(self, claim: str) -> Path:
        try:
            pvc = self.client.get(f"/api/v1/namespaces/{self.ns}/persistentvolumeclaims/{claim}")
        except ApiError as exc:
            raise PodSetupError(f"PersistentVolumeClaim {self.ns}/{claim}: {exc}") from exc
        pv_name = pvc["spec"].get("volumeName")
        if not pv_name:
            raise PodSetupError(f"PersistentVolumeClaim {self.ns}/{claim} is not bound yet")
        pv = self.client.get(f"/api/v1/persistentvolumes/{pv_name}")
        source = pv["spec"].get("hostPath") or pv["spec"].get("local")
        if not source:
            raise PodSetupError(f"PersistentVolume {pv_name}: only hostPath/local volumes map "
                              "to folders")
        path = Path(source["path"])
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _read_data(self, kind: str, name: str, optional: bool) -> dict[str, bytes] | None:
        resource = "configmaps" if kind == "ConfigMap" else "secrets"
        try:
            obj = self.client.get(f"/api/v1/namespaces/{self.ns}/{resource}/{name}")
        except ApiError as exc:
            if exc.status == 404 and optional:
                return None
            raise PodSetupError(f"{kind} {self.ns}/{name}: {exc}") from exc
        if kind == "Secret":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data |= {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
        return data

    def _config_map(self, src: JSON, folder: Path, mode: int | None = None) -> None:
        data = self._read_data("ConfigMap", src["name"], bool(src.get("optional")))
        for path, value, m in _key_items(data or {}, src.get("items"),
                                         src.get("defaultMode", mode)):
            _write_file(folder / path, value, m)

    def _secret(self, src: JSON, folder: Path, mode: int | None = None) -> None:
        name = src.get("secretName") or src["name"]
        data = self._read_data("Secret", name, bool(src.get("optional")))
        for path, value, m in _key_items(data or {}, src.get("items"),
                                         src.get("defaultMode", mode)):
            _write_file(folder / path, value, m)

    def _downward(self, items: list[JSON], folder: Path, mode: int | None) -> None:
        for item in items:
            # resourceFieldRef files stay empty: limits are not enforced here.
            value = self.field_value(item["fieldRef"]["fieldPath"]) if "fieldRef" in item else ""
            _write_file(folder / item["path"], value.encode(), item.get("mode", mode))

    def _projected(self, volume: JSON, folder: Path) -> None:
        mode = volume["projected"].get("defaultMode")
        for source in volume["projected"].get("sources", []):
            if "serviceAccountToken" in source:
                spec = source["serviceAccountToken"]
                token = self.request_token(spec.get("audience"),
                                           int(spec.get("expirationSeconds", 3600)))
                _write_file(folder / spec["path"], token.encode(), mode)
            elif "configMap" in source:
                self._config_map(source["configMap"], folder, mode)
            elif "secret" in source:
                self._secret(source["secret"], folder, mode)
            elif "downwardAPI" in source:
                self._downward(source["downwardAPI"].get("items", []), folder, mode)

    def request_token(self, audience: str | None, expiration_seconds: int = 3600) -> str:
        """A service-account token bound to this pod (TokenRequest API)."""
        meta = self.pod["metadata"]
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        spec: JSON = {
            "expirationSeconds": expiration_seconds,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"],
                               "uid": meta["uid"]},
        }
        if audience:
            spec["audiences"] = [audience]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        try:
            answer = self.client.create(
                f"/api/v1/namespaces/{self.ns}/serviceaccounts/{sa}/token", body
            )
        except ApiError as exc:
            raise PodSetupError(f"token for ServiceAccount {self.ns}/{sa}: {exc}") from exc
        return str(answer["status"]["token"])
