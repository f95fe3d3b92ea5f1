"""Polling helpers for tests and scripts: wait until an object reaches a state."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from deeprad.devenv.kube_rest import ApiError, KubeClient

JSON = dict[str, Any]


def wait_for_object(
    client: KubeClient,
    path: str,
    predicate: Callable[[JSON], bool],
    timeout: float = 60.0,
    what: str | None = None,
) -> JSON:
    """GET path until predicate(object) holds; return the object or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    last: JSON | str = "not fetched"
    while time.monotonic() < deadline:
        try:
            obj = client.get(path)
            if predicate(obj):
                return obj
            last = obj
        except ApiError as exc:
            last = str(exc)
        time.sleep(0.2)
    shown = str(last)[:600]  # a whole list would drown the failure message
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what or path}; last: {shown}")


def wait_for_gone(client: KubeClient, path: str, timeout: float = 60.0) -> None:
    """GET path until it answers 404."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            client.get(path)
        except ApiError as exc:
            if exc.status == 404:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{path} still exists after {timeout:.0f}s")


def pod_phase(pod: JSON) -> str:
    """status.phase of a pod ('' when unset)."""
    return str(pod.get("status", {}).get("phase", ""))


def condition(obj: JSON, kind: str) -> JSON | None:
    """The status condition of the given type, if present."""
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind),
                None)
