"""The kinds the hub operator watches, how its handlers are typed for kopf, and the one way it
writes their status."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from deeprad.operator.api import API_VERSION, GROUP, VERSION
from deeprad.operator.client import Kube

HOSPITAL_SITES = (GROUP, VERSION, "hospitalsites")
FEDERATED_STUDIES = (GROUP, VERSION, "federatedstudies")
FEDERATED_ROUNDS = (GROUP, VERSION, "federatedrounds")
SITE_TASKS = (GROUP, VERSION, "sitetasks")


def reads_indices(handler: Callable[..., None]) -> Any:
    """`handler`, for kopf's decorators: kopf passes each index as a keyword argument named
    after its id, which kopf's callback protocols cannot express."""
    return handler


def write_status(kube: Kube, kind: str, name: str, namespace: str | None, old: BaseModel,
                 new: BaseModel) -> None:
    """Merge-patch the status fields that changed (an idle pass sends nothing; a top-level
    field the new status leaves out keeps its value). Written here rather than through kopf's
    patch: a refused kopf patch ends a timer for good, while an ApiException here becomes a
    TemporaryError and the next pass tries again."""
    before = old.model_dump(mode="json", exclude_none=True)
    after = new.model_dump(mode="json", exclude_none=True)
    changed = {k: nested_patch(before.get(k), v) for k, v in after.items()
               if before.get(k) != v}
    if changed:
        kube.patch_status(API_VERSION, kind, name, namespace, changed)


def nested_patch(before: Any, after: Any) -> Any:
    """The merge patch of one changed status field: inside an object, keys it no longer has
    are sent as null (a merge patch would keep them, and every pass would write again)."""
    if not isinstance(before, dict) or not isinstance(after, dict):
        return after
    patch: dict[str, Any] = dict.fromkeys(before.keys() - after.keys())
    for key, value in after.items():
        if before.get(key) != value:
            patch[key] = nested_patch(before.get(key), value)
    return patch
