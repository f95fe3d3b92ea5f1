"""HospitalSite (cluster-scoped, admin-owned): one per hospital in the network."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, ClassVar, Literal

from pydantic import Field

from deeprad.operator.api.common import (
    ClassLabels,
    Conditions,
    Duration,
    Modality,
    Quantity,
    SecretKeyRef,
    ShortText,
    Timestamp,
    Toleration,
)
from deeprad.operator.api.names import SITE_NAME_MAX, SITE_NAMESPACE_PREFIX
from deeprad.operator.api.schema import AGE, ApiModel, Kind, Kube, PrinterColumn, Rule

# Base64 (standard alphabet, padded) of exactly 32 raw bytes: 43 characters, the last of which
# carries 4 data bits and 2 zero bits, then one '='. `deeprad site register` writes this form.
PUBLIC_KEY_PATTERN = r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$"


class SiteIdentity(ApiModel):
    """The site's public keys; the private halves stay in a Secret on the hospital's cluster.
    `deeprad site register NAME --keys DIR` prints this block."""

    signing_key: Annotated[str, Field(pattern=PUBLIC_KEY_PATTERN)] = Field(
        description="Ed25519 public key (base64 of the 32 raw bytes) that verifies the site's "
                    "signed updates and reports.")
    key_agreement_key: Annotated[str, Field(pattern=PUBLIC_KEY_PATTERN)] = Field(
        description="X25519 public key (base64 of the 32 raw bytes) for encrypting to the site "
                    "and for the pairwise masks of secure aggregation.")


class ConnectionMode(StrEnum):
    PULL = "pull"
    PUSH = "push"


class Connection(ApiModel):
    """How the hub and the site talk. pull: the site agent dials out to the hub and pulls its
    work (hospitals allow outbound traffic only). push: the hub drives the site's cluster with
    a kubeconfig held in a hub Secret (labs and test clusters)."""

    # One-of: the Secret is the whole of push mode and meaningless in pull mode.
    kube_schema: ClassVar[Kube] = Kube(rules=(
        Rule("self.mode == 'push' ? has(self.kubeconfigSecretRef) : true",
             "kubeconfigSecretRef is required when mode is push",
             field_path=".kubeconfigSecretRef", reason="FieldValueRequired"),
        Rule("self.mode == 'pull' ? !has(self.kubeconfigSecretRef) : true",
             "kubeconfigSecretRef must be empty when mode is pull: the site agent dials out",
             field_path=".kubeconfigSecretRef", reason="FieldValueForbidden"),
    ))

    mode: ConnectionMode = Field(default=ConnectionMode.PULL, description="pull or push.")
    kubeconfig_secret_ref: SecretKeyRef | None = Field(
        default=None, description="push only: the hub Secret key holding the site cluster's "
                                  "kubeconfig, credentials inline (token, *-data); exec, "
                                  "auth-provider and file paths are refused.")
    heartbeat_timeout: Duration = Field(
        default="2m", description="The site is marked Reachable=False when its agent's "
                                  "heartbeat Lease is older than this.")


class GpuDefaults(ApiModel):
    """GPU settings of the site's training pods."""

    resource_name: Annotated[str, Field(
        max_length=253,
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)"
                r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")] = Field(
        default="nvidia.com/gpu",
        description="Extended resource a training pod requests, e.g. nvidia.com/gpu or "
                    "nvidia.com/mig-1g.10gb.")
    count: int = Field(default=1, ge=1, le=16, description="GPUs per training pod.")
    node_selector: Annotated[dict[str, Annotated[str, Field(max_length=63)]],
                             Field(max_length=32)] | None = Field(
        default=None, description="Node labels a training pod must land on, e.g. "
                                  "nvidia.com/gpu.product.")
    tolerations: Annotated[list[Toleration], Field(max_length=16),
                           Kube(list_type="atomic")] | None = Field(
        default=None, description="Tolerations of the training pods (e.g. for GPU taints).")
    runtime_class_name: Annotated[str, Field(
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")] | None = (
        Field(default=None, description="RuntimeClass of the training pods, e.g. nvidia."))


class DataKind(StrEnum):
    SLICES = "slices"
    VOLUMES = "volumes"


# The data kind each task trains on (ModelSpec.task -> SiteData.kind).
TASK_DATA_KIND = {"classification": DataKind.SLICES, "segmentation": DataKind.VOLUMES}


class SiteData(ApiModel):
    """What the site's data holds (a description for admission, never the data itself)."""

    modality: Modality = Field(description="Imaging modality of the site's data.")
    kind: DataKind = Field(
        default=DataKind.SLICES,
        description="slices (the default): labelled 2D images, for classification studies; "
                    "volumes: 3D multi-sequence volumes with lesion masks (the site chart's "
                    "training.dataset kind anatomy or volumes), for segmentation studies. A "
                    "study whose model.task needs the other kind does not admit the site "
                    "(DataMismatch).")
    labels: ClassLabels | None = Field(
        default=None, description="Class labels present in the data, e.g. [normal, tumor].")
    sample_count: int = Field(ge=0, description="Number of training records at the site.")
    description: ShortText | None = Field(
        default=None, description="Free text for humans: scanners, cohort, period.")


class SiteLimits(ApiModel):
    """Limits the hub respects when giving this site work."""

    max_concurrent_tasks: int = Field(
        default=1, ge=1, le=64, description="Work items the site runs at the same time.")
    max_task_duration: Duration | None = Field(
        default=None, description="Longest a training Job may run (activeDeadlineSeconds); "
                                  "empty: the round's deadline.")
    cpu: Quantity | None = Field(default=None,
                                 description="CPU request and limit of a training pod.")
    memory: Quantity | None = Field(default=None,
                                    description="Memory request and limit of a training pod.")


Weekday = Literal["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


class MaintenanceWindow(ApiModel):
    """A weekly window in which the site gets no new work (running work finishes)."""

    days: Annotated[list[Weekday], Field(min_length=1, max_length=7),
                    Kube(list_type="set")] = Field(description="Days the window starts on.")
    start: Annotated[str, Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")] = Field(
        description="Start time of day, HH:MM (24 h) in timeZone.")
    duration: Annotated[Duration, Kube(rules=(
        Rule("duration(self) > duration('0s') && duration(self) <= duration('168h')",
             "duration must be above 0 and at most 168h"),))] = Field(
        description="Length of the window, a Go duration such as 4h or 90m.")
    time_zone: Annotated[str, Field(min_length=1, max_length=64,
                                    pattern=r"^[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+)*$")] = Field(
        default="UTC", description="IANA time zone of start, e.g. Europe/Berlin.")


# Tenant isolation: which hub namespaces may give this site work. A name, or "*" alone.
StudyNamespaces = Annotated[
    list[Annotated[str, Field(max_length=63, pattern=r"^(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$")]],
    Field(max_length=256), Kube(list_type="set", rules=(
        Rule("!('*' in self) || size(self) == 1",
             "'*' already allows every namespace: list it alone, or list namespaces by name"),
    ))]


class HospitalSiteSpec(ApiModel):
    """Desired state of a hospital site, set by the consortium's administrators."""

    identity: SiteIdentity = Field(description="The site's public signing and key-agreement "
                                               "keys.")
    connection: Connection = Field(default_factory=Connection,
                                   description="pull (default) or push, and push's kubeconfig.")
    gpu: GpuDefaults = Field(default_factory=GpuDefaults,
                             description="GPU resource, count and placement of training pods.")
    data: SiteData | None = Field(
        default=None, description="Description of the site's data used to admit it to "
                                  "studies; empty: admitted to studies without a data selector.")
    limits: SiteLimits = Field(default_factory=SiteLimits,
                               description="Concurrency and resource limits.")
    maintenance_windows: Annotated[list[MaintenanceWindow], Field(max_length=16),
                                   Kube(list_type="atomic")] | None = Field(
        default=None, description="Weekly windows in which no new work starts.")
    suspend: bool = Field(
        default=False, description="true takes the site out of new rounds (running ones "
                                   "finish).")
    study_namespaces: StudyNamespaces | None = Field(
        default=None,
        description="Hub namespaces whose FederatedStudies and FederatedRounds may use this "
                    "site, or [\"*\"] for every namespace. Empty (the default): no namespace "
                    "may, and the site gets no work until its administrators list some. A "
                    "round from any other namespace excludes the site (reason "
                    "NamespaceNotAllowed) and never creates its SiteTask.")


class GpuCapacity(ApiModel):
    """GPU capacity the site agent observed on the site's nodes."""

    resource_name: Annotated[str, Field(max_length=253)] | None = Field(
        default=None, description="The extended resource counted.")
    capacity: int | None = Field(default=None, ge=0, description="Sum over Ready nodes.")
    allocatable: int | None = Field(default=None, ge=0,
                                    description="Allocatable sum over Ready nodes.")
    nodes: int | None = Field(default=None, ge=0, description="Ready nodes with the resource.")
    product: ShortText | None = Field(default=None,
                                      description="GPU product label, e.g. NVIDIA-H100.")


class Participation(ApiModel):
    """What the site contributed, counted over the FederatedRounds that exist now (a deleted
    round no longer counts); the rounds' status.sites hold the per-round details."""

    studies: Annotated[list[Annotated[str, Field(max_length=127)]], Field(max_length=64),
                       Kube(list_type="atomic")] | None = Field(
        default=None, description="Studies the site was admitted to, as namespace/name, "
                                  "sorted (at most 64; a round made by hand counts under its "
                                  "own name).")
    rounds_joined: int = Field(default=0, ge=0, description="Rounds the site was admitted to.")
    rounds_reported: int = Field(default=0, ge=0,
                                 description="Rounds in which the site reported its update.")
    rounds_failed: int = Field(default=0, ge=0,
                               description="Rounds the site failed, dropped out of or had its "
                                           "update rejected in.")
    last_contribution_time: Timestamp | None = Field(
        default=None, description="When the site last reported an update (its latest "
                                  "Reported round's reportTime).")


class HospitalSiteStatus(ApiModel):
    """Observed state of a site, written by the hub operator."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation last acted upon.")
    conditions: Conditions | None = Field(
        default=None, description="Ready (may be given work) and Reachable (agent heartbeat "
                                  "recent, or push kubeconfig works).")
    last_heartbeat: Timestamp | None = Field(
        default=None, description="Renew time of the agent's coordination.k8s.io Lease.")
    agent_version: ShortText | None = Field(default=None,
                                            description="Version the site agent reported.")
    observed_gpus: GpuCapacity | None = Field(default=None,
                                              description="GPU capacity the agent observed.")
    policy_digest: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")] | None = Field(
        default=None, description="sha256 of the site policy in force at the hospital (studies, "
                                  "models, local epochs, DP, ε per study, secure aggregation), "
                                  "as its agent reports it; the policy itself stays there.")
    participation: Participation | None = Field(
        default=None, description="What the site contributed so far.")


HOSPITAL_SITE = Kind(
    kind="HospitalSite",
    plural="hospitalsites",
    scope="Cluster",
    spec=HospitalSiteSpec,
    status=HospitalSiteStatus,
    description="A hospital in the federation: its public keys, how the hub reaches it, the GPUs "
                "its training pods use, what data it holds and when it is unavailable. Its work "
                f"items live in the hub namespace {SITE_NAMESPACE_PREFIX}<name>.",
    name_max=SITE_NAME_MAX,
    short_names=("hsite",),
    columns=(
        PrinterColumn("Mode", "string", ".spec.connection.mode", "pull or push."),
        PrinterColumn("GPUs", "integer", ".spec.gpu.count", "GPUs per training pod."),
        PrinterColumn("Ready", "string", '.status.conditions[?(@.type=="Ready")].status',
                      "Whether the site may be given work."),
        PrinterColumn("Reachable", "string",
                      '.status.conditions[?(@.type=="Reachable")].status',
                      "Whether the site's agent is heartbeating."),
        PrinterColumn("Heartbeat", "date", ".status.lastHeartbeat", "Last agent heartbeat."),
        PrinterColumn("Namespaces", "string", ".spec.studyNamespaces",
                      "Hub namespaces that may use the site (none: no namespace may)."),
        PrinterColumn("Modality", "string", ".spec.data.modality", "Data modality.", priority=1),
        PrinterColumn("Samples", "integer", ".spec.data.sampleCount", "Training records.",
                      priority=1),
        PrinterColumn("Policy", "string", ".status.policyDigest",
                      "Digest of the site policy in force.", priority=1),
        AGE,
    ),
)
