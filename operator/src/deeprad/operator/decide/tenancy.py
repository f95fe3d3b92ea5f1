"""Tenant isolation on the hub, as pure rules: which namespaces may give a HospitalSite work, and
when a round may start from a checkpoint that another namespace's study wrote.

A hub namespace is a tenant. A site serves the namespaces its HospitalSite lists in
spec.studyNamespaces (nothing when the list is empty: a new site serves nobody until its
administrators say whom). A round's input checkpoint comes from its own namespace, or from a
study (or hand-made round) that lists the round's namespace in spec.shareCheckpointsWith; the
store key carries the owner's uid (`deeprad.core.layout`), so a grant by the current owner never
covers the objects of an earlier object of the same name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from deeprad.core.layout import StudyLayout

ANY_NAMESPACE: Final = "*"
NAMESPACE_NOT_ALLOWED: Final = "NamespaceNotAllowed"


# ---- sites ------------------------------------------------------------------------------------


def namespace_allowed(study_namespaces: Sequence[str] | None, namespace: str) -> bool:
    """Whether a site whose spec.studyNamespaces is `study_namespaces` may work for `namespace`
    (an empty or missing list allows none)."""
    allowed = set(study_namespaces or ())
    return ANY_NAMESPACE in allowed or namespace in allowed


def namespace_refusal(site: str, study_namespaces: Sequence[str] | None, namespace: str) -> str:
    """Why HospitalSite `site` takes no work from `namespace`, and the fix, in one line."""
    fix = f"add {namespace} to HospitalSite {site} spec.studyNamespaces"
    if not study_namespaces:
        return (f"HospitalSite {site} allows no namespace yet (spec.studyNamespaces is empty), "
                f"so not {namespace}; {fix}")
    return (f"HospitalSite {site} does not allow namespace {namespace} (spec.studyNamespaces: "
            f"{', '.join(study_namespaces)}); {fix}")


# ---- checkpoints ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointOwner:
    """An object that may own a checkpoint's store keys: the FederatedStudy, or a hand-made
    FederatedRound, named like the key's study segment in the key's namespace."""

    kind: str  # FederatedStudy or FederatedRound
    name: str
    uid: str
    share_with: tuple[str, ...] = ()  # its spec.shareCheckpointsWith


def checkpoint_refusal(namespace: str, uri: str, source: StudyLayout,
                       owners: Sequence[CheckpointOwner]) -> str | None:
    """Why a round in `namespace` may not start from the checkpoint at `uri` (whose key is
    `source`'s), or None. `owners` are the objects found under the key's namespace and study
    name. Another namespace's checkpoint needs an owner whose uid is the key's and which lists
    `namespace` in spec.shareCheckpointsWith."""
    theirs = source.namespace
    if theirs == namespace:
        return None
    where = (f"{uri} is in namespace {theirs}, not this round's namespace {namespace}, and")
    if source.uid is None:
        return (f"{where} its key names no owner uid, so no grant can cover it; use a "
                "checkpoint URI the hub wrote (<namespace>/<study>/<uid>/rounds/<n>/"
                "global.safetensors) whose owner shares it with this namespace")
    if not owners:
        return (f"{where} no FederatedStudy or FederatedRound {theirs}/{source.study} exists "
                f"to share it; only a checkpoint whose owner lists {namespace} in "
                "spec.shareCheckpointsWith may be used")
    owner = next((o for o in owners if o.uid == source.uid), None)
    if owner is None:
        current = owners[0]
        return (f"{where} it belongs to an earlier object named {source.study} (uid "
                f"{source.uid}), not to the current {current.kind} {theirs}/{current.name} "
                f"(uid {current.uid}); use a checkpoint of the current one that it shares with "
                f"{namespace}")
    if namespace not in owner.share_with:
        return (f"{where} {owner.kind} {theirs}/{owner.name} does not share its checkpoints "
                f"with {namespace}; ask its owner to add {namespace} to {owner.kind} "
                f"{theirs}/{owner.name} spec.shareCheckpointsWith")
    return None
