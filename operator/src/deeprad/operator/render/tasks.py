"""A round's work item for one site: the SiteTask in the site's hub namespace.

It names the round (by uid, since it lives in another namespace and cannot hold an
ownerReference), copies what the site trains, and grants exactly the objects the site reads and
writes this round as presigned URLs. Its spec never changes after creation.
"""

from __future__ import annotations

from deeprad.operator.api import API_VERSION
from deeprad.operator.api.federatedround import FederatedRoundSpec
from deeprad.operator.api.names import site_namespace, task_name
from deeprad.operator.api.sitetask import (
    GrantedObject,
    PublicKeys,
    RoundRef,
    SiteTaskSpec,
    TaskSecureAggregation,
)
from deeprad.operator.render.meta import (
    LABEL_ROUND,
    LABEL_SITE,
    LABEL_STUDY,
    Manifest,
    labels,
)

LABEL_ROUND_UID = "deeprad.io/round-uid"
LABEL_ROUND_NAMESPACE = "deeprad.io/round-namespace"


def site_task(round_ref: RoundRef, study: str, study_uid: str, spec: FederatedRoundSpec,
              site: str, parent_digest: str, hub: PublicKeys, objects: list[GrantedObject],
              secure_aggregation: TaskSecureAggregation | None, deadline: str) -> Manifest:
    """The SiteTask `<round>-<uid8>` in `deeprad-site-<site>`; `study_uid` keys the study's
    store objects (`deeprad.core.layout`)."""
    task = SiteTaskSpec(
        round_ref=round_ref, study=study, study_uid=study_uid, round=spec.round, site=site,
        model=spec.model,
        data=spec.data, training=spec.training, privacy=spec.privacy,
        parent_digest=parent_digest, hub=hub, objects=objects,
        secure_aggregation=secure_aggregation, deadline=deadline, mode=spec.mode)
    return {"apiVersion": API_VERSION, "kind": "SiteTask", "metadata": {
        "name": task_name(round_ref.name, round_ref.uid), "namespace": site_namespace(site),
        "labels": labels("site-task", **{LABEL_SITE: site, LABEL_STUDY: study,
                                         LABEL_ROUND: round_ref.name,
                                         LABEL_ROUND_NAMESPACE: round_ref.namespace,
                                         LABEL_ROUND_UID: round_ref.uid})},
        "spec": task.model_dump(mode="json", exclude_none=True)}
