"""SiteTask (namespaced, operator-owned): one round's work for one site, in the hub namespace
reserved for that site (`deeprad-site-<site>`), which only that site's agent may read. It
carries presigned URLs for exactly the objects the site may read and write, so a hospital never
holds the hub's storage credentials."""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar

from pydantic import Field

from deeprad.operator.api.common import (
    Conditions,
    DataSelector,
    LocalTraining,
    Message,
    Metrics,
    ModelSpec,
    ObjectName,
    PresignedUrl,
    RoundPrivacy,
    Sha256,
    ShortText,
    SiteName,
    Timestamp,
)
from deeprad.operator.api.names import MAX_ROUNDS, SITE_NAMESPACE_PREFIX, TASK_NAME_MAX
from deeprad.operator.api.schema import AGE, ApiModel, Kind, Kube, PrinterColumn, Rule


class RoundRef(ApiModel):
    """The FederatedRound this task belongs to (in another namespace, so no ownerReference)."""

    namespace: ObjectName = Field(description="Namespace of the round.")
    name: ObjectName = Field(description="Name of the round.")
    uid: str = Field(max_length=64, description="metadata.uid of the round, so a task of a "
                                                "deleted and recreated round is recognised.")


class TaskCheckpoint(ApiModel):
    """The global model to start from: presigned GET URLs and the expected digest."""

    url: PresignedUrl = Field(description="Presigned GET URL of global.safetensors.")
    manifest_url: PresignedUrl = Field(description="Presigned GET URL of global.json (its "
                                                   "signed manifest).")
    digest: Sha256 = Field(description="sha256 the payload must have; the trainer refuses "
                                       "any other.")


class TaskUploads(ApiModel):
    """Where the site writes its results: presigned PUT URLs valid until the deadline."""

    update_url: PresignedUrl = Field(description="PUT URL of updates/<site>.bin (encrypted, "
                                                 "signed update envelope).")
    update_manifest_url: PresignedUrl = Field(description="PUT URL of updates/<site>.json.")
    result_url: PresignedUrl = Field(description="PUT URL of results/<site>.json "
                                                 "(non-sensitive metrics).")


class SiteTaskSpec(ApiModel):
    """What the site trains, from which checkpoint, where it uploads, and by when.
    Immutable: the hub operator deletes and recreates a task to change it."""

    kube_schema: ClassVar[Kube] = Kube(rules=(
        Rule("self == oldSelf", "spec is immutable: the hub operator recreates a task to "
             "change it", reason="FieldValueForbidden"),
    ))

    round_ref: RoundRef = Field(description="The FederatedRound.")
    study: ObjectName | None = Field(default=None, description="Study name (the object-store "
                                                               "prefix); empty for hand-made "
                                                               "rounds.")
    round: int = Field(ge=1, le=MAX_ROUNDS, description="Round number.")
    site: SiteName = Field(description="The HospitalSite doing the work.")
    model: ModelSpec = Field(description="The network.")
    data: DataSelector = Field(default_factory=DataSelector,
                               description="Image size and validation split; the agent maps "
                                           "them onto the site's own dataset.")
    training: LocalTraining = Field(default_factory=LocalTraining,
                                    description="Local training parameters.")
    privacy: RoundPrivacy = Field(default_factory=RoundPrivacy,
                                  description="Secure aggregation and DP-SGD settings.")
    checkpoint: TaskCheckpoint = Field(description="The global model to start from.")
    uploads: TaskUploads = Field(description="Where to upload the update and the result.")
    deadline: Timestamp = Field(description="When the round stops waiting; the URLs expire "
                                            "then too.")


class TaskState(StrEnum):
    PENDING = "Pending"
    ACCEPTED = "Accepted"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class TaskResult(ApiModel):
    """The site's non-sensitive report (the same as results/<site>.json)."""

    samples: int | None = Field(default=None, ge=0, description="Training records used.")
    train_loss: float | None = Field(default=None, description="Mean training loss.")
    update_digest: Sha256 | None = Field(default=None,
                                         description="sha256 of the uploaded update envelope.")
    global_metrics: Metrics | None = Field(
        default=None, description="The received global model on the site's validation data.")
    local_metrics: Metrics | None = Field(
        default=None, description="The site's model after local training, same data.")
    duration_seconds: float | None = Field(default=None, ge=0,
                                           description="Training wall time.")
    epsilon: float | None = Field(default=None, ge=0, description="ε of this training run.")


class SiteTaskStatus(ApiModel):
    """Progress of the task, written by the site agent."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation last acted upon.")
    conditions: Conditions | None = Field(
        default=None, description="Accepted, Running, Succeeded, Failed.")
    state: TaskState | None = Field(default=None, description="Pending, Accepted, Running, "
                                                              "Succeeded or Failed.")
    heartbeat_time: Timestamp | None = Field(default=None,
                                             description="Last time the agent touched the task.")
    job_name: ObjectName | None = Field(default=None,
                                        description="The training Job on the site's cluster.")
    attempts: int | None = Field(default=None, ge=0, description="Training pods started.")
    start_time: Timestamp | None = Field(default=None, description="When training started.")
    completion_time: Timestamp | None = Field(default=None,
                                              description="When the task finished.")
    agent_version: ShortText | None = Field(default=None, description="Site agent version.")
    message: Message | None = Field(default=None, description="Details for humans, e.g. why "
                                                              "the Job failed.")
    result: TaskResult | None = Field(default=None, description="The site's report.")


SITE_TASK = Kind(
    kind="SiteTask",
    plural="sitetasks",
    scope="Namespaced",
    spec=SiteTaskSpec,
    status=SiteTaskStatus,
    description="One round's work for one site, created by the hub operator in the hub "
                f"namespace {SITE_NAMESPACE_PREFIX}<site> and pulled by that site's agent.",
    name_max=TASK_NAME_MAX,
    short_names=("stask",),
    columns=(
        PrinterColumn("Site", "string", ".spec.site", "The site."),
        PrinterColumn("Study", "string", ".spec.study", "The study."),
        PrinterColumn("Round", "integer", ".spec.round", "Round number."),
        PrinterColumn("State", "string", ".status.state", "Task state."),
        PrinterColumn("Heartbeat", "date", ".status.heartbeatTime", "Last agent update."),
        PrinterColumn("Deadline", "date", ".spec.deadline", "When the round stops waiting.",
                      priority=1),
        AGE,
    ),
    selectable_fields=(".spec.site", ".spec.roundRef.name"),
)
