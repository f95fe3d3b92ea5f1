"""FederatedRound (namespaced): one round of training, created by a study or by hand."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, ClassVar

from pydantic import Field

from deeprad.operator.api.common import (
    ROUND_MODE_DESCRIPTION,
    ROUND_SETTINGS_RULES,
    CheckpointRef,
    Conditions,
    DataSelector,
    EvaluatedSplit,
    Message,
    Metrics,
    ModelSpec,
    ObjectName,
    RoundMode,
    RoundSettings,
    Sha256,
    SiteName,
    Timestamp,
)
from deeprad.operator.api.federatedstudy import (
    ADMISSION_TIMEOUT_DEFAULT,
    ADMISSION_TIMEOUT_DESCRIPTION,
    PRIORITY_DESCRIPTION,
    SHARE_DESCRIPTION,
    AdmissionTimeout,
    Priority,
    SharedWith,
    SiteNames,
)
from deeprad.operator.api.names import MAX_ROUND_SITES, MAX_ROUNDS, ROUND_NAME_MAX
from deeprad.operator.api.schema import AGE, ApiModel, Kind, Kube, PrinterColumn, Rule


class StudyRef(ApiModel):
    """The FederatedStudy (same namespace) a round belongs to."""

    name: ObjectName = Field(description="Name of the FederatedStudy.")


class FederatedRoundSpec(RoundSettings):
    """Desired state of one round. Immutable once the round has started (status.startTime)."""

    kube_schema: ClassVar[Kube] = Kube(rules=(
        *ROUND_SETTINGS_RULES,
        Rule("!has(self.sites) || self.minSites <= size(self.sites)",
             "minSites must not exceed the number of sites listed in sites",
             field_path=".minSites"),
        Rule("!has(self.studyRef) || !has(self.shareCheckpointsWith)",
             "shareCheckpointsWith is for rounds made by hand: a study's rounds share what the "
             "FederatedStudy's spec.shareCheckpointsWith lists",
             field_path=".shareCheckpointsWith", reason="FieldValueForbidden"),
        Rule("!has(self.privacy.differentialPrivacy) || "
             "has(self.privacy.differentialPrivacy.noiseMultiplier)",
             "privacy.differentialPrivacy.noiseMultiplier is required in a round (a "
             "FederatedStudy calibrates it to its privacyBudget when its template leaves it "
             "empty)", field_path=".privacy.differentialPrivacy.noiseMultiplier",
             reason="FieldValueRequired"),
        Rule("!has(self.training.patchSize) || self.model.task == 'segmentation'",
             "training.patchSize cuts patches from 3D volumes: it applies to a segmentation "
             "model only; leave it out", field_path=".training.patchSize",
             reason="FieldValueForbidden"),
        Rule("!has(self.training.patchSize) || self.training.patchSize <= self.data.imageSize",
             "training.patchSize must be at most data.imageSize (the volumes' side): patches "
             "are cut from the volumes", field_path=".training.patchSize"),
    ))

    study_ref: StudyRef | None = Field(
        default=None, description="The study this round belongs to; empty for a round "
                                  "created by hand.")
    round: int = Field(ge=1, le=MAX_ROUNDS, description="Round number within the study, from 1.")
    model: ModelSpec = Field(description="The network trained (a study copies its own).")
    data: DataSelector = Field(default_factory=DataSelector,
                               description="Which site data to use and how to split it.")
    input_checkpoint: CheckpointRef | None = Field(
        default=None, description="Global model the sites start from; empty: a freshly "
                                  "initialised model (round 0 of the study's store). One in "
                                  "another namespace needs its owner's "
                                  "spec.shareCheckpointsWith to list this namespace.")
    sites: SiteNames | None = Field(
        default=None, description="HospitalSites asked to train; empty: every Ready site "
                                  "that allows this namespace (HospitalSite "
                                  "spec.studyNamespaces). Once minSites of them are "
                                  "admissible the round starts with those; the rest are "
                                  "excluded, with the reason.")
    share_checkpoints_with: SharedWith | None = Field(
        default=None, description=SHARE_DESCRIPTION + " Only for rounds made by hand (whose "
                                                      "store study is their own name); fixed "
                                                      "once the round starts.")
    admission_timeout: AdmissionTimeout = Field(default=ADMISSION_TIMEOUT_DEFAULT,
                                                description=ADMISSION_TIMEOUT_DESCRIPTION)
    priority: Priority = Field(default=0, description=PRIORITY_DESCRIPTION)
    mode: RoundMode = Field(default=RoundMode.TRAIN, description=ROUND_MODE_DESCRIPTION)


class RoundState(StrEnum):
    PENDING = "Pending"
    QUEUED = "Queued"  # waiting for enough admissible sites, up to the admission timeout
    SCHEDULING = "Scheduling"
    TRAINING = "Training"
    AGGREGATING = "Aggregating"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def terminal(self) -> bool:
        """Succeeded or Failed: the round never changes again."""
        return self in (RoundState.SUCCEEDED, RoundState.FAILED)


class SiteState(StrEnum):
    PENDING = "Pending"  # admitted, work item not yet picked up
    WAITING = "Waiting"  # not admissible yet; the round waits up to its admission timeout
    QUEUED = "Queued"  # the site's Job waits at the hospital (Kueue quota, unschedulable pod)
    EXCLUDED = "Excluded"  # not admitted: namespace, not Ready, suspended, maintenance, GPUs, data
    TRAINING = "Training"  # the site's Job runs
    REPORTED = "Reported"  # update uploaded and result reported
    FAILED = "Failed"  # the site's Job failed
    DROPPED = "Dropped"  # no report by the deadline
    REJECTED = "Rejected"  # the aggregator refused the update (digest, signature, NaN, ...)


class SiteRoundStatus(ApiModel):
    """One site's part in the round."""

    site: SiteName = Field(description="HospitalSite name (the list's key).")
    state: SiteState = Field(description="Waiting (the round is Queued and this site not "
                                         "admissible yet, or admissible and waiting for "
                                         "the others), Pending, Queued (its Job waits at the "
                                         "hospital), Excluded, Training, Reported, Failed, "
                                         "Dropped or Rejected.")
    reason: Annotated[str, Field(max_length=128)] | None = Field(
        default=None, description="CamelCase reason for the state, e.g. InMaintenanceWindow, "
                                  "AtCapacity or QueuedBehind.")
    message: Message | None = Field(default=None, description="Details for humans.")
    task: ObjectName | None = Field(default=None,
                                    description="Name of the site's SiteTask in its namespace.")
    samples: int | None = Field(default=None, ge=0, description="Training records used.")
    metrics: Metrics | None = Field(
        default=None, description="The site's model after local training, on its validation "
                                  "data (an evaluation round: the input model on it).")
    test_metrics: Metrics | None = Field(
        default=None, description="An evaluation round: the input model on the site's "
                                  "held-out split (testSplit).")
    test_split: EvaluatedSplit | None = Field(
        default=None, description="The split testMetrics scored: test, or validation where "
                                  "the site has no test split.")
    update_digest: Sha256 | None = Field(default=None,
                                         description="sha256 of the uploaded update envelope.")
    epsilon: float | None = Field(default=None, ge=0, description="ε of this site's training.")
    report_time: Timestamp | None = Field(default=None, description="When the site reported.")


class RoundTimings(ApiModel):
    """How long each phase took, in seconds."""

    scheduling_seconds: float | None = Field(default=None, ge=0,
                                             description="Creation to SitesScheduled (time "
                                                         "spent Queued included).")
    training_seconds: float | None = Field(default=None, ge=0,
                                           description="SitesScheduled to aggregation start.")
    aggregation_seconds: float | None = Field(default=None, ge=0,
                                              description="The aggregator Job.")
    total_seconds: float | None = Field(default=None, ge=0,
                                        description="Creation to Succeeded or Failed.")


class FederatedRoundStatus(ApiModel):
    """Observed state of a round, written by the hub operator."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation last acted upon.")
    conditions: Conditions | None = Field(
        default=None, description="SitesScheduled, Training, Aggregating, Succeeded, Failed.")
    state: RoundState | None = Field(
        default=None, description="Summary for humans: Pending, Queued (waiting for "
                                  "sites), Scheduling, Training, Aggregating, Succeeded or "
                                  "Failed; conditions say why.")
    queued_since: Timestamp | None = Field(
        default=None, description="When the round first waited for sites; "
                                  "spec.admissionTimeout counts from here, and among waiting "
                                  "rounds of equal spec.priority the earlier is served first.")
    waiting_for: Annotated[str, Field(max_length=1024)] | None = Field(
        default=None, description="While Queued, each site that is not admissible and why "
                                  "(site:Reason ...); empty once the round is admitted.")
    start_time: Timestamp | None = Field(
        default=None, description="When the round was admitted (minSites sites admissible) and "
                                  "started; from then on the spec is immutable and this field "
                                  "cannot change.")
    deadline_time: Timestamp | None = Field(
        default=None, description="startTime + spec.deadline: time spent Queued does not "
                                  "count.")
    aggregation_start_time: Timestamp | None = Field(default=None,
                                                     description="When aggregation started.")
    completion_time: Timestamp | None = Field(default=None,
                                              description="When the round finished.")
    sites: Annotated[list[SiteRoundStatus], Field(max_length=MAX_ROUND_SITES),
                     Kube(list_type="map", list_map_keys=("site",))] | None = Field(
        default=None, description="Per-site state, keyed by site.")
    admitted_sites: int | None = Field(default=None, ge=0,
                                       description="Sites admitted to the round.")
    reported_sites: int | None = Field(default=None, ge=0,
                                       description="Admitted sites that reported an update.")
    input_metrics: Metrics | None = Field(
        default=None, description="The round's input global model on the reporting sites' "
                                  "validation data (sample-weighted).")
    aggregate_metrics: Metrics | None = Field(
        default=None, description="The new global model on the sites' validation data; known "
                                  "once the study's next round has evaluated it.")
    test_metrics: Metrics | None = Field(
        default=None, description="An evaluation round: the input model on the sites' "
                                  "held-out test data, pooled from their statistics.")
    rejected_sites: int | None = Field(default=None, ge=0,
                                       description="Updates the aggregator refused.")
    output_checkpoint: CheckpointRef | None = Field(default=None,
                                                    description="The new global model.")
    epsilon: float | None = Field(default=None, ge=0,
                                  description="ε of this round alone (largest site).")
    timings: RoundTimings | None = Field(default=None, description="Phase durations.")


FEDERATED_ROUND = Kind(
    kind="FederatedRound",
    plural="federatedrounds",
    scope="Namespaced",
    spec=FederatedRoundSpec,
    status=FederatedRoundStatus,
    description="One round of federated training: the sites train the input checkpoint locally "
                "and the aggregator combines their updates into the output checkpoint. Its work "
                "items are <name>-<first 8 characters of its uid>, one per site's hub namespace.",
    name_max=ROUND_NAME_MAX,
    short_names=("fround",),
    columns=(
        PrinterColumn("Study", "string", ".spec.studyRef.name", "The study, if any."),
        PrinterColumn("Round", "integer", ".spec.round", "Round number."),
        PrinterColumn("Reported", "integer", ".status.reportedSites", "Sites that reported."),
        PrinterColumn("Admitted", "integer", ".status.admittedSites", "Sites admitted."),
        PrinterColumn("State", "string", ".status.state", "Round state."),
        PrinterColumn("Waiting", "string", ".status.waitingFor",
                      "While Queued: the sites not admissible and why."),
        PrinterColumn("AUROC", "number", ".status.aggregateMetrics.auroc",
                      "AUROC of the new global model on validation data."),
        PrinterColumn("Dice", "number", ".status.aggregateMetrics.dice",
                      "Dice of the new global model on validation data (segmentation)."),
        PrinterColumn("Mode", "string", ".spec.mode", "train or evaluate.", priority=1),
        PrinterColumn("Strategy", "string", ".spec.strategy.name", "Aggregation strategy.",
                      priority=1),
        PrinterColumn("Epsilon", "number", ".status.epsilon", "ε of this round.", priority=1),
        AGE,
    ),
    rules=(
        # Immutability of a started round. CEL on the spec alone cannot see whether the round
        # started, so this rule sits on the whole object and reads the *stored* status
        # (oldSelf). That is sound: every write is checked against the object it replaces
        # (resourceVersion precondition; server-side apply re-reads on conflict), and with the
        # status subresource a spec write carries the stored status unchanged. A status write
        # leaves the spec unchanged, so it passes; the second rule keeps status.startTime from
        # being cleared to unlock the spec. Before startTime is set, edits are allowed: the
        # operator reads the spec when it starts the round.
        Rule("!has(oldSelf.status) || !has(oldSelf.status.startTime) || "
             "self.spec == oldSelf.spec",
             "spec is immutable once the round has started (status.startTime is set); delete "
             "the round or create a new one", field_path=".spec", reason="FieldValueForbidden"),
        Rule("!has(oldSelf.status) || !has(oldSelf.status.startTime) || (has(self.status) && "
             "has(self.status.startTime) && self.status.startTime == oldSelf.status.startTime)",
             "status.startTime cannot change once set", field_path=".status",
             reason="FieldValueForbidden"),
    ),
    selectable_fields=(".spec.studyRef.name", ".spec.round"),
)
