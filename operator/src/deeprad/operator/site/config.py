"""The site agent's configuration file (`deeprad operator --mode site --config FILE`).

The hospital owns it (the site chart renders it into a ConfigMap): which namespace of its own
cluster trainer Jobs run in, with which image, identity Secret, data volume and GPU settings,
and its site policy (`deeprad.core.site_policy`): which studies and models may run, how many
local epochs, whether DP and secure aggregation are required, the largest ε per study and per
dataset (`training.datasetName` names the dataset, `training.datasetRecords` sizes it). The hub
never chooses any of these; it only says what to train and where to upload. The rest of what a
hospital decides is here too: the hub it works for (hubSigningKey), the store its trainers may
reach (store.endpoint), the GPUs per training pod (training.gpu: a task cannot ask for GPUs),
the longest a trainer Job may run (training.maxTaskDuration) and the Kueue LocalQueue its Jobs
wait in for the hospital's quota (training.localQueue).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from deeprad.core.errors import ConfigError, field_problems
from deeprad.core.protocol import DatasetSpec
from deeprad.core.site_policy import DATASET_PATTERN, SitePolicy
from deeprad.core.store.endpoint import ENDPOINT_FORM, StoreEndpoint
from deeprad.operator.api.common import Duration, ObjectName, Quantity, SiteName
from deeprad.operator.api.hospitalsite import PUBLIC_KEY_PATTERN, GpuDefaults
from deeprad.operator.api.images import ImageReference
from deeprad.operator.api.names import DNS_LABEL_MAX, DNS_LABEL_PATTERN
from deeprad.operator.api.schema import ApiModel


class TrainingResources(ApiModel):
    """CPU and memory of one training pod (requests; memory is also the limit)."""

    cpu: Quantity = Field(default="1", description="CPU request of a training pod.")
    memory: Quantity = Field(default="4Gi", description="Memory request and limit.")


class TrainingPlacement(ApiModel):
    """Where and how trainer Jobs run on the hospital's cluster."""

    namespace: ObjectName = Field(default="deeprad-training",
                                  description="Namespace of the trainer Jobs (the agent's "
                                              "local Role reaches only this namespace).")
    image: ImageReference = Field(
        default="ghcr.io/deeprad/trainer:latest",
        description="Trainer image, [registry/]path[:tag][@sha256:<digest>]; a digest pins it.")
    image_pull_policy: str = Field(default="IfNotPresent", pattern="^(Always|IfNotPresent|Never)$",
                                   description="imagePullPolicy of the trainer container.")
    identity_secret: ObjectName = Field(
        default="deeprad-site-identity",
        description="Secret with the site's private keys (`deeprad site register` writes it), "
                    "mounted read-only into trainer pods only.")
    data_claim: ObjectName | None = Field(
        default=None, description="PersistentVolumeClaim with the site's images, mounted "
                                  "read-only at /data; empty: no volume (e.g. phantom data).")
    dataset: DatasetSpec = Field(default_factory=lambda: DatasetSpec(kind="folder", path="/data"),
                                 description="How the trainer reads the data; the round's "
                                             "image size and validation split override the "
                                             "matching fields. phantom, folder, npz, import: "
                                             "labelled 2D images (classification studies); "
                                             "anatomy (synthetic lesions on real anatomy) and "
                                             "volumes (NIfTI / DICOM series with NIfTI masks): "
                                             "3D volumes (segmentation studies).")
    dataset_name: str | None = Field(
        default=None, max_length=253, pattern=DATASET_PATTERN,
        description="The dataset's name in the site's privacy ledger, which composes every "
                    "run on it against policy.maxEpsilonPerDataset; default: dataClaim (the "
                    "volume the data is on), else the site name. Agents that read the same data "
                    "(e.g. one per hub) must name the same dataset and share the training "
                    "namespace (the ledger lives there). Renaming it starts a new account.")
    dataset_records: int | None = Field(
        default=None, ge=1,
        description="Records in the dataset, before a round's validation split: the agent "
                    "reserves a run's ε for this many (the trainer refuses a run that would "
                    "spend more); unset: the worst case, one full batch per epoch.")
    gpu: GpuDefaults = Field(default_factory=GpuDefaults,
                             description="GPU resource, count and placement of every training "
                                         "pod; the hospital's alone: a task cannot ask for "
                                         "GPUs.")
    resources: TrainingResources = Field(default_factory=TrainingResources,
                                         description="CPU and memory per training pod.")
    max_task_duration: Duration | None = Field(
        default=None, description="Upper bound of a trainer Job's activeDeadlineSeconds (part of "
                                  "the site's policy: no task runs longer, whatever its "
                                  "deadline).")
    service_account: ObjectName | None = Field(
        default=None, description="ServiceAccount of trainer pods (no token is mounted).")
    local_queue: ObjectName | None = Field(
        default=None, description="Kueue LocalQueue (in the training namespace) that admits "
                                  "trainer Jobs within the hospital's quotas: they carry its "
                                  "queue-name label and are created suspended, and a task "
                                  "reports Queued while Kueue holds its Job. Empty: Jobs start "
                                  "at once.")

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, value: DatasetSpec) -> DatasetSpec:
        # The anatomy benchmark is generated in the pod and checks its own options (the
        # trainer refuses unknown ones); a folder of volumes must say where it is.
        if value.kind == "volumes" and not value.path:
            raise ValueError("kind volumes needs path: the folder of per-patient volumes and "
                             "masks inside the pod, e.g. /data")
        return value

    @field_validator("local_queue", mode="before")
    @classmethod
    def _local_queue(cls, value: object) -> object:
        # Checked before the pattern, to say what the name is for rather than quote a regex.
        if isinstance(value, str) and not (len(value) <= DNS_LABEL_MAX
                                           and re.fullmatch(DNS_LABEL_PATTERN, value)):
            raise ValueError(f"must name a Kueue LocalQueue in the training namespace, a DNS "
                             f"label (lowercase letters, digits and '-', at most "
                             f"{DNS_LABEL_MAX} characters), got {value!r}")
        return value


class AllowedStore(ApiModel):
    """The one object store this site's trainers may reach through presigned URLs."""

    endpoint: str | None = Field(
        default=None, max_length=2048,
        description=f"The hub's object store as this site reaches it, {ENDPOINT_FORM}. Every "
                    "presigned URL of a task must lead there (same scheme, host and port, "
                    "under PATH), otherwise the task is refused; plain http only when this is "
                    "http. Unset: every task is refused.")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                StoreEndpoint.parse(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value


class AgentConfig(ApiModel):
    """Everything the site agent needs besides its two kubeconfigs."""

    site: SiteName = Field(description="This hospital's HospitalSite name on the hub.")
    hub_signing_key: str | None = Field(
        default=None, pattern=PUBLIC_KEY_PATTERN,
        description="The hub's public signing key (base64). When set, tasks whose key "
                    "registry names another hub key are refused.")
    training: TrainingPlacement = Field(default_factory=TrainingPlacement,
                                        description="Trainer Job placement.")
    store: AllowedStore = Field(default_factory=AllowedStore,
                                description="The store presigned URLs may lead to.")
    policy: SitePolicy = Field(default_factory=SitePolicy,
                               description="What studies may run here; every task is checked "
                                           "against it by the agent and again by the trainer.")
    heartbeat_seconds: float = Field(default=10.0, gt=0, le=300,
                                     description="How often the agent renews its Lease.")
    poll_seconds: float = Field(default=5.0, gt=0, le=300,
                                description="How often the agent re-reads its tasks and Jobs.")

    @property
    def dataset(self) -> str:
        """The dataset trainers read here, as the privacy ledger names it."""
        return self.training.dataset_name or self.training.data_claim or self.site


def load_agent_config(path: Path) -> AgentConfig:
    """Parse the agent's YAML configuration, naming the file and field on error."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"site agent config {path}: cannot read it ({exc})") from None
    return parse_agent_config(data, f"site agent config {path}")


def parse_agent_config(data: Any, where: str) -> AgentConfig:
    """The configuration in `data`; ConfigError naming `where` and each bad field on one line."""
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {field_problems(exc)}") from None


__all__ = ["AgentConfig", "AllowedStore", "TrainingPlacement", "TrainingResources",
           "load_agent_config", "parse_agent_config"]
