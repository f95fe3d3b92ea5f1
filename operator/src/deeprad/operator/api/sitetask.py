"""SiteTask (namespaced, operator-owned): one round's work for one site, in the hub namespace
reserved for that site (`deeprad-site-<site>`), which only that site's agent may read. It
carries presigned URLs for exactly the objects the site may read and write, so a hospital never
holds the hub's storage credentials."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, ClassVar, Literal

from pydantic import Field

from deeprad.operator.api.common import (
    ROUND_MODE_DESCRIPTION,
    Conditions,
    DataSelector,
    EvaluatedSplit,
    LocalTraining,
    Message,
    Metrics,
    ModelSpec,
    ObjectName,
    PresignedUrl,
    RoundMode,
    RoundPrivacy,
    Sha256,
    ShortText,
    SiteName,
    Timestamp,
)
from deeprad.operator.api.hospitalsite import PUBLIC_KEY_PATTERN
from deeprad.operator.api.names import (
    DNS_LABEL_PATTERN,
    MAX_ROUNDS,
    MAX_SECAGG_SITES,
    SITE_NAMESPACE_PREFIX,
    TASK_NAME_MAX,
)
from deeprad.operator.api.schema import AGE, ApiModel, Kind, Kube, PrinterColumn, Rule


class RoundRef(ApiModel):
    """The FederatedRound this task belongs to (in another namespace, so no ownerReference)."""

    namespace: ObjectName = Field(description="Namespace of the round.")
    name: ObjectName = Field(description="Name of the round.")
    uid: str = Field(max_length=64, description="metadata.uid of the round, so a task of a "
                                                "deleted and recreated round is recognised.")


class GrantedObject(ApiModel):
    """One object the site may read (GET) or write (PUT), through a presigned URL."""

    key: Annotated[str, Field(min_length=1, max_length=1024)] = Field(
        description="Object key in the study's store, e.g. ns/study/rounds/3/updates/site.bin.")
    method: Literal["GET", "PUT"] = Field(description="GET to read, PUT to write.")
    url: PresignedUrl = Field(description="Presigned URL, valid until the round's deadline.")


class PublicKeys(ApiModel):
    """A party's public keys (base64 of 32 raw bytes)."""

    name: ObjectName = Field(description="Site or hub name.")
    signing_key: Annotated[str, Field(pattern=PUBLIC_KEY_PATTERN)] = Field(
        description="Ed25519 public key.")
    key_agreement_key: Annotated[str, Field(pattern=PUBLIC_KEY_PATTERN)] = Field(
        description="X25519 public key.")


class TaskSecureAggregation(ApiModel):
    """The secure-aggregation parameters of the round, the same for every site."""

    roster: Annotated[list[PublicKeys], Field(min_length=2, max_length=MAX_SECAGG_SITES),
                      Kube(list_type="map", list_map_keys=("name",))] = Field(
        description="Every admitted site and its public keys: the peers this site exchanges "
                    "masks with.")
    threshold: int = Field(ge=2, le=MAX_SECAGG_SITES,
                           description="Shares needed to recover a dropped site's masks: "
                                       "more than half of the roster (semi-honest hub), more "
                                       "than 2/3 (malicious hub).")
    clip: float = Field(gt=0, description="Clip of each weighted update value before "
                                          "quantization.")
    weight_normalizer: float = Field(gt=0, description="Declared total samples of the roster; "
                                                       "each site's weight is n / this.")
    timeout_seconds: float = Field(gt=0, description="How long the site waits for each of the "
                                                     "hub's messages.")


class SiteTaskSpec(ApiModel):
    """What the site trains, from which checkpoint, where it uploads, and by when.
    Immutable: the hub operator deletes and recreates a task to change it."""

    kube_schema: ClassVar[Kube] = Kube(rules=(
        Rule("self == oldSelf", "spec is immutable: the hub operator recreates a task to "
             "change it", reason="FieldValueForbidden"),
    ))

    round_ref: RoundRef = Field(description="The FederatedRound.")
    study: ObjectName = Field(description="The study's name in the object store (a hand-made "
                                          "round's own name).")
    study_uid: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)] = (
        Field(description="metadata.uid of the object that owns the study's store keys (the "
                          "FederatedStudy, or a hand-made round itself): every key the site "
                          "reads or writes is under <namespace>/<study>/<studyUid>/, so a "
                          "re-created study never meets its predecessor's objects."))
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
    parent_digest: Sha256 = Field(description="sha256 of the global model to start from; the "
                                              "trainer refuses any other.")
    hub: PublicKeys = Field(description="The hub's public keys: checkpoints must carry its "
                                        "signature and updates are sealed to it.")
    objects: Annotated[list[GrantedObject], Field(min_length=1, max_length=32),
                       Kube(list_type="atomic")] = Field(
        description="The objects the site may read and write this round, with presigned URLs.")
    secure_aggregation: TaskSecureAggregation | None = Field(
        default=None, description="Set when the round uses secure aggregation.")
    deadline: Timestamp = Field(description="When the round stops waiting; the URLs expire "
                                            "then too.")
    mode: RoundMode = Field(default=RoundMode.TRAIN, description=ROUND_MODE_DESCRIPTION)


class TaskState(StrEnum):
    PENDING = "Pending"
    ACCEPTED = "Accepted"
    # The Job exists but its pod does not run yet: waiting in the hospital's Kueue LocalQueue
    # (reason QueuedByKueue) or refused by the scheduler (reason Unschedulable, with its message).
    QUEUED = "Queued"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def terminal(self) -> bool:
        """Succeeded or Failed: the site's work on the task is over."""
        return self in (TaskState.SUCCEEDED, TaskState.FAILED)


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
    test_metrics: Metrics | None = Field(
        default=None, description="Evaluate mode: the received model on the site's held-out "
                                  "split (testSplit).")
    test_split: EvaluatedSplit | None = Field(
        default=None, description="The split testMetrics scored: test, or validation where the "
                                  "site has no test split.")
    duration_seconds: float | None = Field(default=None, ge=0,
                                           description="Training (or evaluation) wall time.")
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
    reason: Annotated[str, Field(max_length=128, pattern=r"^[A-Z][A-Za-z0-9]*$")] | None = Field(
        default=None, description="CamelCase reason of a failure, e.g. PolicyViolation (the "
                                  "site's policy refused the task; the message names the "
                                  "rule), Refused, JobFailed, DeadlineExceeded.")
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
