"""A small JSON-over-HTTPS client for the Kubernetes API, driven by a kubeconfig file.

The node agent and the harness need only a handful of calls (get, create, patch, delete, watch)
on plain dicts; this keeps them independent of the generated client's model classes.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

JSON = dict[str, Any]


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        self.status = status
        try:
            self.reason = str(json.loads(body).get("reason", ""))
            message = str(json.loads(body).get("message", body))
        except ValueError:
            self.reason, message = "", body
        super().__init__(f"{method} {path}: {status} {message}")


def _materialise(data_b64: str | None, path: str | None, tmp: Path, name: str) -> str | None:
    if data_b64:
        target = tmp / name
        target.write_bytes(base64.b64decode(data_b64))
        return str(target)
    return path


class KubeClient:
    """Thread-safe: each thread gets its own connection."""

    def __init__(self, kubeconfig: Path) -> None:
        config = yaml.safe_load(kubeconfig.read_text())
        ctx_name = config["current-context"]
        ctx = next(c["context"] for c in config["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == ctx["user"])
        url = urllib.parse.urlsplit(cluster["server"])
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 443
        self.server = cluster["server"]
        tmp = Path(tempfile.mkdtemp(prefix="kubeclient-"))
        ca = _materialise(cluster.get("certificate-authority-data"),
                          cluster.get("certificate-authority"), tmp, "ca.crt")
        self._ssl = ssl.create_default_context(cafile=ca)
        cert = _materialise(user.get("client-certificate-data"),
                            user.get("client-certificate"), tmp, "client.crt")
        key = _materialise(user.get("client-key-data"), user.get("client-key"), tmp, "client.key")
        if cert and key:
            self._ssl.load_cert_chain(cert, key)
        for f in tmp.iterdir():
            f.unlink()  # loaded into the SSL context; keys should not linger on disk
        os.rmdir(tmp)
        self._headers = {"Accept": "application/json"}
        if user.get("token"):
            self._headers["Authorization"] = f"Bearer {user['token']}"
        self._local = threading.local()

    def _conn(self, timeout: float | None) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            self.host, self.port, context=self._ssl, timeout=timeout
        )

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str | int] | None = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> JSON:
        """One API call; returns the decoded JSON answer, raises ApiError on failure."""
        if query:
            path = f"{path}?{urllib.parse.urlencode(query)}"
        headers = dict(self._headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        for attempt in range(2):
            conn: http.client.HTTPSConnection | None = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = self._conn(timeout)
            try:
                conn.timeout = timeout
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (ConnectionError, http.client.HTTPException, OSError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        text = raw.decode(errors="replace")
        if resp.status >= 300:
            raise ApiError(resp.status, method, path, text)
        return json.loads(text) if text else {}

    def get(self, path: str, **query: str | int) -> JSON:
        """GET path."""
        return self.request("GET", path, query=query or None)

    def create(self, path: str, body: JSON) -> JSON:
        """POST body to a collection path."""
        return self.request("POST", path, body)

    def merge_patch(self, path: str, body: JSON) -> JSON:
        """JSON merge-patch (RFC 7386) an object or its status."""
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def delete(self, path: str, body: JSON | None = None) -> JSON:
        """DELETE an object, with optional DeleteOptions."""
        return self.request("DELETE", path, body)

    def watch(self, path: str, resource_version: str, timeout_seconds: int = 300,
              **query: str) -> Iterator[JSON]:
        """Yield watch events ({type, object}) from resource_version until the server ends it."""
        params: dict[str, str | int] = {
            "watch": "1", "resourceVersion": resource_version,
            "timeoutSeconds": timeout_seconds, "allowWatchBookmarks": "true", **query,
        }
        conn = self._conn(timeout_seconds + 30)
        try:
            conn.request("GET", f"{path}?{urllib.parse.urlencode(params)}", headers=self._headers)
            resp = conn.getresponse()
            if resp.status >= 300:
                raise ApiError(resp.status, "WATCH", path, resp.read().decode(errors="replace"))
            while True:
                line = resp.readline()
                if not line:
                    return
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()
