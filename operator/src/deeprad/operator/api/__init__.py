"""The Deep-Rad API (group deeprad.io, version v1alpha1): the one typed source of the CRDs.

Each kind's spec and status are pydantic models (`hospitalsite`, `federatedstudy`,
`federatedround`, `sitetask`); `crdgen` renders them into crds/. The operator parses objects
with the same models: `FederatedRoundSpec.model_validate(obj["spec"])`.
"""

from __future__ import annotations

from deeprad.operator.api.federatedround import (
    FEDERATED_ROUND,
    FederatedRoundSpec,
    FederatedRoundStatus,
    RoundState,
    SiteState,
)
from deeprad.operator.api.federatedstudy import (
    FEDERATED_STUDY,
    FederatedStudySpec,
    FederatedStudyStatus,
    StudyState,
)
from deeprad.operator.api.hospitalsite import HOSPITAL_SITE, HospitalSiteSpec, HospitalSiteStatus
from deeprad.operator.api.schema import Kind
from deeprad.operator.api.sitetask import SITE_TASK, SiteTaskSpec, SiteTaskStatus, TaskState

GROUP = "deeprad.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KINDS: tuple[Kind, ...] = (HOSPITAL_SITE, FEDERATED_STUDY, FEDERATED_ROUND, SITE_TASK)

__all__ = [
    "API_VERSION", "FEDERATED_ROUND", "FEDERATED_STUDY", "GROUP", "HOSPITAL_SITE", "KINDS",
    "SITE_TASK", "VERSION", "FederatedRoundSpec", "FederatedRoundStatus", "FederatedStudySpec",
    "FederatedStudyStatus", "HospitalSiteSpec", "HospitalSiteStatus", "Kind", "RoundState",
    "SiteState", "SiteTaskSpec", "SiteTaskStatus", "StudyState", "TaskState",
]
