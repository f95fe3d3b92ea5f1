"""Kubeconfig files with embedded certificates, so each file works on its own."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import yaml

from deeprad.devenv.pki import KeyPair


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def kubeconfig_dict(
    context: str, server: str, ca_pem: bytes, user: KeyPair | None = None, token: str | None = None
) -> dict[str, Any]:
    """A kubeconfig with one cluster, user and context, all named `context`."""
    credentials: dict[str, str] = {}
    if user is not None:
        credentials["client-certificate-data"] = _b64(user.cert_pem)
        credentials["client-key-data"] = _b64(user.key_pem)
    if token is not None:
        credentials["token"] = token
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": context, "cluster": {"server": server,
                                          "certificate-authority-data": _b64(ca_pem)}}
        ],
        "users": [{"name": context, "user": credentials}],
        "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
        "current-context": context,
    }


def write_kubeconfig(path: Path, config: dict[str, Any]) -> Path:
    """Write config to path (0600, it holds a private key or token); return path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
