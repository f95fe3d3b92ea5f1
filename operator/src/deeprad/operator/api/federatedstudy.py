"""FederatedStudy (namespaced, user-owned): a campaign of rounds, as a Deployment is of
ReplicaSets."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, ClassVar, Literal

from pydantic import Field

from deeprad.operator.api.common import (
    CheckpointRef,
    Conditions,
    DataSelector,
    Duration,
    LabelSelector,
    Message,
    Metrics,
    ModelSpec,
    ObjectName,
    RoundSettings,
    SiteName,
    Timestamp,
)
from deeprad.operator.api.names import MAX_ROUNDS, STUDY_NAME_MAX
from deeprad.operator.api.schema import AGE, ApiModel, Kind, Kube, PrinterColumn, Rule

MetricName = Literal["auroc", "sensitivity", "specificity", "accuracy", "loss", "dice",
                     "hd95"]
# Metrics where lower is better; every other MetricName is a fraction, higher is better.
LOWER_IS_BETTER: tuple[str, ...] = ("loss", "hd95")


class RoundTemplate(RoundSettings):
    """Settings of every round the study creates; each FederatedRound copies them, so editing
    the template changes the rounds not yet created."""


class StoppingRules(ApiModel):
    """When the study stops before spec.rounds: a target reached, or no progress for a while.
    The monitored metric is the federated model's, on the sites' validation data."""

    kube_schema: ClassVar[Kube] = Kube(rules=(
        Rule("!has(self.target) || (has(self.metric) && self.metric in ['loss', 'hd95']) || "
             "(self.target >= 0.0 && self.target <= 1.0)",
             "target must be between 0 and 1 for auroc, sensitivity, specificity, accuracy "
             "and dice", field_path=".target"),
    ))

    metric: MetricName | None = Field(
        default=None, description="The metric that decides the best round; loss and hd95 are "
                                  "minimised, the others maximised. Empty: the task's primary "
                                  "metric (auroc for classification, dice for segmentation).")
    target: float | None = Field(
        default=None, description="Stop once the metric reaches this value; empty: no target.")
    patience: int | None = Field(
        default=None, ge=1, le=MAX_ROUNDS,
        description="Stop after this many rounds without improving the best value by more "
                    "than minDelta; empty: never.")
    min_delta: float = Field(default=0.0, ge=0,
                             description="Smallest change that counts as an improvement.")


class PrivacyBudget(ApiModel):
    """The study's differential-privacy budget: no round starts that would pass it."""

    epsilon: float = Field(gt=0, le=100, description="Total ε the study may spend (> 0).")
    delta: float = Field(gt=0, lt=1, description="δ of the guarantee, in (0, 1); usually below "
                                                 "1 / number of records.")
    accountant: Literal["rdp", "pld"] = Field(
        default="rdp", description="rdp (Rényi DP) or pld (privacy loss distributions).")


SiteNames = Annotated[list[SiteName], Field(min_length=1, max_length=256),
                      Kube(list_type="set")]
# Namespaces a study (or a hand-made round) lets start from its checkpoints.
SharedWith = Annotated[list[ObjectName], Field(max_length=64), Kube(list_type="set")]
# How a round waits for sites (FederatedStudy spec, copied into each FederatedRound it makes).
AdmissionTimeout = Annotated[Duration, Kube(rules=(
    Rule("duration(self) <= duration('720h')", "admissionTimeout must be at most 720h"),))]
ADMISSION_TIMEOUT_DEFAULT = "6h"
ADMISSION_TIMEOUT_DESCRIPTION = (
    "How long a round waits for minSites admissible HospitalSites before it fails with "
    "InsufficientSites (a Go duration from 0s to 720h, counted from status.queuedSince; 0s "
    "fails at once). While it waits the round is Queued: its deadline has not started, "
    "status.sites says why each site is not admissible and status.waitingFor sums it up. "
    "Only reasons that can clear by waiting queue a round (Suspended, NotReady, "
    "InMaintenanceWindow, InsufficientGPUs, AtCapacity, QueuedBehind); too few sites left "
    "once the permanent ones are set aside (NotFound, NamespaceNotAllowed, DataMismatch, "
    "SampleCountUnknown, InvalidMaintenanceWindow) fails the round at once.")
Priority = Annotated[int, Field(ge=-1000, le=1000)]
PRIORITY_DESCRIPTION = (
    "Order among rounds waiting for the same HospitalSite (-1000 to 1000, default 0). A "
    "site's free task slots (spec.limits.maxConcurrentTasks less the rounds it already serves) "
    "go to the rounds waiting for it in this order: higher priority first, then the one "
    "waiting longest (status.queuedSince), then the older (creationTimestamp), then by "
    "namespace/name. A waiting round is ahead at a site only if, given that site, it could "
    "start now (enough of its other sites admissible to reach its minSites); otherwise the "
    "rounds behind it may take the site. A round behind others for a site waits with reason "
    "QueuedBehind, naming the round ahead if it is in the same namespace. Waiting rounds hold "
    "no slot, and a running round is never preempted.")
SHARE_DESCRIPTION = (
    "Other hub namespaces whose rounds may start from this object's checkpoints "
    "(spec.inputCheckpoint). Empty (the default): only rounds in its own namespace may. A grant "
    "covers the checkpoints of this object only: a re-created object of the same name has a new "
    "uid, and the keys of its predecessor stay unshared.")


class FederatedStudySpec(ApiModel):
    """Desired state of a study, set by its ML engineers."""

    kube_schema: ClassVar[Kube] = Kube(rules=(
        Rule("!(has(self.sites) && has(self.siteSelector))",
             "set at most one of sites and siteSelector", field_path=".sites",
             reason="FieldValueForbidden"),
        Rule("!has(self.sites) || self.roundTemplate.minSites <= size(self.sites)",
             "roundTemplate.minSites must not exceed the number of sites listed in sites",
             field_path=".roundTemplate.minSites"),
        Rule("!has(self.roundTemplate.privacy.differentialPrivacy) || has(self.privacyBudget)",
             "privacyBudget is required when roundTemplate.privacy.differentialPrivacy is set",
             field_path=".privacyBudget", reason="FieldValueRequired"),
        Rule("!has(self.roundTemplate.training.patchSize) || self.model.task == 'segmentation'",
             "roundTemplate.training.patchSize cuts patches from 3D volumes: it applies to a "
             "segmentation model only; leave it out", field_path=".roundTemplate.training."
             "patchSize", reason="FieldValueForbidden"),
        Rule("!has(self.roundTemplate.training.patchSize) || "
             "self.roundTemplate.training.patchSize <= self.data.imageSize",
             "roundTemplate.training.patchSize must be at most data.imageSize (the volumes' "
             "side): patches are cut from the volumes", field_path=".roundTemplate.training."
             "patchSize"),
        # A study's checkpoints are all of one network, and its ε is accounted at one δ.
        Rule("self.model == oldSelf.model", "model is immutable: the study's checkpoints are of "
             "this network; start a new study", field_path=".model"),
        Rule("has(self.privacyBudget) == has(oldSelf.privacyBudget) && (!has(self.privacyBudget)"
             " || (self.privacyBudget.delta == oldSelf.privacyBudget.delta && "
             "self.privacyBudget.accountant == oldSelf.privacyBudget.accountant))",
             "privacyBudget cannot be added, removed or have its delta or accountant changed "
             "once the study exists", field_path=".privacyBudget"),
    ))

    model: ModelSpec = Field(description="The network the study trains.")
    data: DataSelector = Field(default_factory=DataSelector,
                               description="Which site data to use and how to split it.")
    sites: SiteNames | None = Field(
        default=None, description="HospitalSite names to draw from; empty: every site the "
                                  "siteSelector matches.")
    site_selector: LabelSelector | None = Field(
        default=None, description="Label selector over HospitalSites; empty (and no sites): "
                                  "every site.")
    round_template: RoundTemplate = Field(
        default_factory=RoundTemplate, description="Settings of each round the study creates.")
    rounds: int = Field(ge=1, le=MAX_ROUNDS,
                        description="Number of rounds to run, unless a stopping rule ends the "
                                    "study earlier.")
    stopping: StoppingRules = Field(default_factory=StoppingRules,
                                    description="Target metric and patience.")
    privacy_budget: PrivacyBudget | None = Field(
        default=None, description="(ε, δ) budget; required with differential privacy.")
    initial_checkpoint: CheckpointRef | None = Field(
        default=None, description="Start from this checkpoint instead of a fresh model; one in "
                                  "another namespace needs that study's "
                                  "spec.shareCheckpointsWith to list this namespace.")
    share_checkpoints_with: SharedWith | None = Field(default=None,
                                                      description=SHARE_DESCRIPTION)
    admission_timeout: AdmissionTimeout = Field(
        default=ADMISSION_TIMEOUT_DEFAULT,
        description=ADMISSION_TIMEOUT_DESCRIPTION + " Each round the study creates copies it.")
    priority: Priority = Field(
        default=0, description=PRIORITY_DESCRIPTION + " Each round the study creates copies "
                                                      "it.")
    final_evaluation: bool = Field(
        default=True,
        description="After the last round (or a stopping rule), run one evaluation round "
                    "(spec.mode: evaluate) in which each site scores the final global model on "
                    "its held-out test split (its validation split where it has none) and "
                    "uploads nothing, spending no ε; status.finalMetrics holds the pooled "
                    "result. It runs only where the sites' policies would let the study train.")


class StudyState(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class BestMetric(ApiModel):
    """The best value of the monitored metric so far."""

    name: MetricName = Field(description="The metric (spec.stopping.metric).")
    value: float = Field(description="Its best value.")
    round: int = Field(ge=1, description="Round that reached it.")


class SiteFinalMetrics(ApiModel):
    """One site's score of the study's final global model."""

    site: SiteName = Field(description="The HospitalSite.")
    split: Literal["test", "validation"] | None = Field(
        default=None, description="The held-out split scored: test, or validation where the "
                                  "site has no test split.")
    metrics: Metrics | None = Field(default=None, description="The final model on that split.")


class FinalEvaluation(ApiModel):
    """The evaluation round that scored the study's final global model."""

    round: ObjectName = Field(description="The evaluation FederatedRound.")
    checkpoint: CheckpointRef | None = Field(default=None,
                                             description="The global model it scored.")
    state: Annotated[str, Field(max_length=32)] | None = Field(
        default=None, description="The evaluation round's state.")
    message: Message | None = Field(default=None,
                                    description="Why it failed, when it did.")
    metric: MetricName | None = Field(
        default=None, description="The task's primary metric (auroc or dice).")
    value: float | None = Field(
        default=None, description="Its pooled value in finalMetrics (the Final column).")
    validation_metrics: Metrics | None = Field(
        default=None, description="The final model on the sites' validation data, pooled "
                                  "(the last training round's aggregateMetrics).")
    sites: Annotated[list[SiteFinalMetrics], Field(max_length=1024),
                     Kube(list_type="map", list_map_keys=("site",))] | None = Field(
        default=None, description="Each site's score on its held-out split.")


class SiteEpsilon(ApiModel):
    """One site's ε in the study, from the privacy ledger."""

    site: SiteName = Field(description="The HospitalSite.")
    epsilon_spent: float = Field(ge=0, description="ε its records have spent, at "
                                                   "spec.privacyBudget.delta.")
    epsilon_remaining: float = Field(ge=0, description="What is left of "
                                                       "spec.privacyBudget.epsilon.")
    runs: int = Field(ge=0, description="DP-SGD runs accounted: reported and signed by the "
                                        "site's trainer, or reserved for a round in flight.")


class StudyPrivacy(ApiModel):
    """Where the study's ε comes from: the hub's signed privacy ledger in the store (every run
    of this study's name, of earlier studies of the same name, and of the study its initial
    checkpoint came from), plus the planned steps of rounds in flight. Deleting rounds,
    re-creating the study or editing sampleCount never lowers it."""

    noise_multiplier: float | None = Field(
        default=None, gt=0, description="The multiplier the study's rounds use: the "
                                        "template's, or the one the operator calibrated.")
    calibrated: bool | None = Field(
        default=None, description="True when the operator chose noiseMultiplier to spend "
                                  "privacyBudget.epsilon over spec.rounds.")
    inherited_from: list[str] | None = Field(
        default=None, max_length=64,
        description="Studies (<namespace>/<name>) whose ledger this study's ε includes.")
    sites: list[SiteEpsilon] | None = Field(
        default=None, max_length=1024, description="ε per site; the study's is the largest.")
    problem: str | None = Field(
        default=None, description="Why the ledger could not be read (the study waits).")


class FederatedStudyStatus(ApiModel):
    """Observed state of a study, written by the hub operator."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation last acted upon.")
    conditions: Conditions | None = Field(
        default=None, description="Progressing, Succeeded (reason RoundsCompleted, "
                                  "TargetReached, PatienceExhausted or PrivacyBudgetExhausted), "
                                  "Failed.")
    state: StudyState | None = Field(default=None,
                                     description="Summary for humans: Pending, Running, "
                                                 "Succeeded or Failed; conditions say why.")
    current_round: int | None = Field(default=None, ge=0, le=MAX_ROUNDS,
                                      description="The round running now, or the last one.")
    completed_rounds: int | None = Field(default=None, ge=0, le=MAX_ROUNDS,
                                         description="Rounds that succeeded.")
    rounds_without_improvement: int | None = Field(
        default=None, ge=0, description="Rounds since the best metric last improved.")
    best_metric: BestMetric | None = Field(
        default=None, description="Best value so far of the monitored metric on the sites' "
                                  "validation data, and the round that reached it.")
    final_metrics: Metrics | None = Field(
        default=None, description="The final global model on the sites' held-out test data, "
                                  "pooled from their statistics (see finalEvaluation).")
    final_evaluation: FinalEvaluation | None = Field(
        default=None, description="The evaluation round of the final model and each site's "
                                  "score.")
    epsilon_spent: float | None = Field(default=None, ge=0,
                                        description="ε spent so far at spec.privacyBudget.delta.")
    privacy: StudyPrivacy | None = Field(
        default=None, description="ε per site from the privacy ledger, and the noise "
                                  "multiplier.")
    latest_checkpoint: CheckpointRef | None = Field(
        default=None, description="The newest global model.")
    start_time: Timestamp | None = Field(default=None, description="When round 1 started.")
    completion_time: Timestamp | None = Field(default=None,
                                              description="When the study finished.")


FEDERATED_STUDY = Kind(
    kind="FederatedStudy",
    plural="federatedstudies",
    scope="Namespaced",
    spec=FederatedStudySpec,
    status=FederatedStudyStatus,
    description="A federated training campaign: the model, which sites and data, the settings "
                "of each round, how many rounds, when to stop and the privacy budget. It creates "
                "FederatedRounds <name>-r<n> one after another.",
    name_max=STUDY_NAME_MAX,
    short_names=("fstudy",),
    columns=(
        PrinterColumn("Model", "string", ".spec.model.name", "The network trained."),
        PrinterColumn("Round", "integer", ".status.currentRound", "Current round."),
        PrinterColumn("Rounds", "integer", ".spec.rounds", "Rounds planned."),
        PrinterColumn("State", "string", ".status.state", "Pending, Running, Succeeded, Failed."),
        PrinterColumn("Metric", "string", ".status.bestMetric.name",
                      "The monitored metric (the task's primary metric by default)."),
        PrinterColumn("Best", "number", ".status.bestMetric.value",
                      "Best value of the monitored metric on validation data."),
        PrinterColumn("Final", "number", ".status.finalEvaluation.value",
                      "The final model's primary metric on held-out test data, pooled."),
        PrinterColumn("Task", "string", ".spec.model.task",
                      "classification or segmentation.", priority=1),
        PrinterColumn("Epsilon", "number", ".status.epsilonSpent", "ε spent so far."),
        PrinterColumn("Strategy", "string", ".spec.roundTemplate.strategy.name",
                      "Aggregation strategy.", priority=1),
        AGE,
    ),
)
