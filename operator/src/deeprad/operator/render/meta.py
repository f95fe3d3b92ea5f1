"""Labels and owner references shared by every manifest the operator renders."""

from __future__ import annotations

from typing import Any

from deeprad.operator.api import API_VERSION

MANAGED_BY = "deeprad-operator"
FIELD_MANAGER = "deeprad-operator"  # server-side apply field manager of the hub operator
LABEL_SITE = "deeprad.io/site"
LABEL_STUDY = "deeprad.io/study"
LABEL_ROUND = "deeprad.io/round"
LABEL_ROUND_NUMBER = "deeprad.io/round-number"

Manifest = dict[str, Any]


def labels(component: str, **extra: str) -> dict[str, str]:
    """The recommended app.kubernetes.io labels plus Deep-Rad's own."""
    return {"app.kubernetes.io/name": "deeprad", "app.kubernetes.io/component": component,
            "app.kubernetes.io/managed-by": MANAGED_BY, **extra}


def owner_reference(kind: str, name: str, uid: str, controller: bool = True) -> Manifest:
    """An ownerReference to a deeprad.io object, so deleting it collects the child."""
    if not uid:
        raise ValueError(f"{kind} {name}: metadata.uid is empty; an ownerReference needs it")
    return {"apiVersion": API_VERSION, "kind": kind, "name": name, "uid": uid,
            "controller": controller, "blockOwnerDeletion": True}
