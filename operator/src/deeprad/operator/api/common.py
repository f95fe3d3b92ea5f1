"""Types shared by several kinds: conditions, selectors, the model, training, strategy, privacy."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from deeprad.core.model_catalogue import MODEL_NAMES, MODEL_TASKS, MODELS
from deeprad.core.protocol import TASKS
from deeprad.core.protocol import ModelSpec as CoreModelSpec
from deeprad.core.secagg.threat import DEFAULT_THREAT_MODEL, ThreatModel
from deeprad.core.strategies import CATALOGUE, Parameter, number_text, secure_sum_strategies
from deeprad.operator.api.names import DNS_LABEL_PATTERN, SITE_NAME_MAX
from deeprad.operator.api.schema import ApiModel, Kube, Rule

# ---- scalar types -----------------------------------------------------------------------------

Timestamp = Annotated[str, Kube(format="date-time"), Field(max_length=64)]
GO_DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
Duration = Annotated[str, Field(pattern=GO_DURATION_PATTERN, max_length=32)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Uri = Annotated[str, Field(min_length=1, max_length=2048)]
PresignedUrl = Annotated[str, Field(pattern=r"^https?://", max_length=8192)]
Quantity = Annotated[str, Field(max_length=32),
                     Kube(rules=(Rule("isQuantity(self)",
                                      "must be a Kubernetes quantity such as 500m, 4, 16Gi"),))]
SiteName = Annotated[str, Field(pattern=DNS_LABEL_PATTERN, max_length=SITE_NAME_MAX)]
ObjectName = Annotated[str, Field(pattern=DNS_LABEL_PATTERN, max_length=63)]
ShortText = Annotated[str, Field(max_length=256)]
Message = Annotated[str, Field(max_length=4096)]


# ---- conditions -------------------------------------------------------------------------------


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(ApiModel):
    """One aspect of the object's state, shaped like metav1.Condition: its type, True/False/
    Unknown, a CamelCase reason, a human message, when it last changed and the generation of
    the spec it was computed from."""

    type: Annotated[str, Field(
        max_length=316,
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
        description="Condition type in CamelCase, e.g. Ready, Reachable, Training, Succeeded.")]
    status: ConditionStatus = Field(description="True, False or Unknown.")
    observed_generation: int | None = Field(
        default=None, ge=0,
        description="metadata.generation of the spec this condition was computed from; older "
                    "than the object's generation means the condition is out of date.")
    last_transition_time: Timestamp = Field(
        description="When the status last changed from one value to another (RFC 3339).")
    reason: Annotated[str, Field(
        min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="Programmatic CamelCase identifier of the cause of the last transition, "
                    "e.g. QuorumReached, DeadlineExceeded.")]
    message: Annotated[str, Field(
        max_length=32768,
        description="What a human should know about the transition; may be empty.")]


Conditions = Annotated[list[Condition], Field(max_length=16),
                       Kube(list_type="map", list_map_keys=("type",))]


# ---- selectors and scheduling -----------------------------------------------------------------


class LabelSelectorRequirement(ApiModel):
    """A label selector requirement: key, operator and values (as in metav1.LabelSelector)."""

    kube_schema: ClassVar[Kube] = Kube(rules=(
        Rule("self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0)"
             " : !has(self.values) || size(self.values) == 0",
             "values must be non-empty for In and NotIn and empty for Exists and DoesNotExist",
             field_path=".values"),
    ))

    key: Annotated[str, Field(min_length=1, max_length=317,
                              description="The label key the selector applies to.")]
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="How the key relates to the values: In, NotIn, Exists or DoesNotExist.")
    values: Annotated[list[Annotated[str, Field(max_length=63)]], Field(max_length=64),
                      Kube(list_type="atomic")] | None = Field(
        default=None, description="Label values; required for In and NotIn, empty otherwise.")


class LabelSelector(ApiModel):
    """A label query over HospitalSites (metav1.LabelSelector). The requirements are ANDed;
    an empty selector matches every site."""

    match_labels: Annotated[dict[str, Annotated[str, Field(max_length=63)]],
                            Field(max_length=64)] | None = Field(
        default=None, description="Labels a site must carry, each with exactly this value.")
    match_expressions: Annotated[list[LabelSelectorRequirement], Field(max_length=16),
                                 Kube(list_type="atomic")] | None = Field(
        default=None, description="Requirements on site labels, all of which must hold.")


class Toleration(ApiModel):
    """A toleration added to the site's training pods (as in core/v1 Toleration)."""

    key: Annotated[str, Field(max_length=317)] | None = Field(
        default=None, description="Taint key to tolerate; empty with operator Exists "
                                  "tolerates every taint.")
    operator: Literal["Exists", "Equal"] = Field(
        default="Equal", description="Equal matches key and value; Exists matches the key.")
    value: Annotated[str, Field(max_length=63)] | None = Field(
        default=None, description="Taint value to match with operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches every effect.")
    toleration_seconds: int | None = Field(
        default=None, ge=0,
        description="How long a NoExecute taint is tolerated before eviction, in seconds.")


class SecretKeyRef(ApiModel):
    """A key in a Secret in the hub cluster."""

    name: ObjectName = Field(description="Name of the Secret.")
    namespace: ObjectName = Field(description="Namespace of the Secret.")
    key: Annotated[str, Field(min_length=1, max_length=253)] = Field(
        default="kubeconfig", description="Key in the Secret's data that holds the value.")


# ---- what is trained, on what, how ------------------------------------------------------------


# Only catalogue networks: a study author never supplies code that runs at the hub or at a
# hospital, and an import path (`os:system`, `subprocess:run`) would be exactly that.
ModelName = StrEnum(  # type: ignore[misc]
    "ModelName", {name.upper().replace("-", "_"): name for name in MODEL_NAMES})


TaskName = StrEnum(  # type: ignore[misc]
    "TaskName", {task.upper(): task for task in TASKS})
# CEL map: catalogue network -> the task it serves (one source: the core's catalogue); a
# network the catalogue ties to no task is not checked here.
_CEL_MODEL_TASKS = "{" + ", ".join(f"'{name}': '{MODEL_TASKS[name]}'"
                                   for name in MODEL_NAMES if name in MODEL_TASKS) + "}"


def model_task_problem(name: str, task: str) -> str | None:
    """Why catalogue network `name` cannot serve `task` (with the fix), or None."""
    serves = MODEL_TASKS.get(name)
    if serves is None or serves == task:
        return None
    return (f"model.task is {task} but {name} is a {serves} network: set model.task: {serves}, "
            f"or choose a {task} network (see `deeprad models`)")


class ModelSpec(ApiModel):
    """The network every site trains: a catalogue name (see `deeprad models`) with keyword
    arguments, and the task it is trained for, which decides the data, loss, metrics and the
    metric that ranks rounds."""

    kube_schema: ClassVar[Kube] = Kube(rules=(
        Rule(f"!(self.name in {_CEL_MODEL_TASKS}) || {_CEL_MODEL_TASKS}[self.name] == "
             "self.task",
             "model.task must be the task the network serves (see `deeprad models`)",
             message_expression=(
                 f"'model.task is ' + self.task + ' but ' + self.name + ' is a ' + "
                 f"{_CEL_MODEL_TASKS}[self.name] + ' network: set model.task: ' + "
                 f"{_CEL_MODEL_TASKS}[self.name] + ', or choose a ' + self.task + "
                 "' network (see deeprad models)'"),
             field_path=".task"),
    ))

    name: ModelName = Field(
        description="A catalogue network (see `deeprad models`): " + "; ".join(
            f"{name}: {summary}" for name, summary in MODELS.items()) + ". Never an import "
            "path: code runs only in a trainer image the hospital pins.")
    kwargs: Annotated[dict[str, Any], Field(max_length=32)] | None = Field(
        default=None, description="Keyword arguments for the network's factory.")
    task: TaskName = Field(
        default=TaskName("classification"),
        description="What the network is trained for: classification (2D slices, one label "
                    "each; rounds ranked by AUROC) or segmentation (3D multi-sequence volumes "
                    "with lesion masks; rounds ranked by Dice). It must be the task of the "
                    "catalogue network, and every site's data must hold that kind of data "
                    "(HospitalSite spec.data.kind).")

    @model_validator(mode="after")
    def _task_fits_network(self) -> ModelSpec:
        problem = model_task_problem(self.name.value, self.task.value)
        if problem is not None:
            raise ValueError(problem)
        return self

    def core(self) -> CoreModelSpec:
        """The core's ModelSpec (what checkpoints record and trainers build)."""
        return CoreModelSpec.model_validate({"name": self.name.value,
                                             "kwargs": dict(self.kwargs or {}),
                                             "task": self.task.value})


class Modality(StrEnum):
    MRI = "mri"
    CT = "ct"
    XRAY = "xray"
    MAMMOGRAPHY = "mammography"
    ULTRASOUND = "ultrasound"
    PET = "pet"
    PATHOLOGY = "pathology"
    OTHER = "other"


ClassLabels = Annotated[list[Annotated[str, Field(min_length=1, max_length=63)]],
                        Field(max_length=64), Kube(list_type="set")]


class DataSelector(ApiModel):
    """Which site data a study uses and how the trainer splits it. Sites whose
    HospitalSite.spec.data does not match are not admitted to a round."""

    modality: Modality | None = Field(
        default=None, description="Imaging modality the site's data must have; empty: any.")
    labels: ClassLabels | None = Field(
        default=None,
        description="Class labels every admitted site's data must include, e.g. [normal, "
                    "tumor]; empty: no requirement.")
    min_samples: int = Field(
        default=0, ge=0,
        description="Sites with fewer training samples (HospitalSite spec.data.sampleCount) "
                    "are not admitted.")
    image_size: int = Field(default=64, ge=8, le=1024,
                            description="Side length in pixels the trainer resizes images to.")
    val_fraction: float = Field(
        default=0.2, ge=0.0, lt=1.0,
        description="Fraction of each site's records held out for validation metrics.")
    split_seed: int = Field(default=0, description="Seed of the train/validation split.")


class Optimizer(StrEnum):
    ADAM = "adam"
    SGD = "sgd"


class LocalTraining(ApiModel):
    """Local training parameters each site uses in a round (the trainer's TrainConfig)."""

    local_epochs: int = Field(default=3, ge=1, le=1000,
                              description="Passes over the site's training data per round.")
    batch_size: int = Field(default=16, ge=1, le=4096, description="Mini-batch size.")
    lr: float = Field(default=3e-3, gt=0, le=10, description="Learning rate of the optimizer.")
    optimizer: Optimizer = Field(default=Optimizer.ADAM, description="adam or sgd.")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum (sgd only).")
    weight_decay: float = Field(default=0.0, ge=0, description="L2 weight decay.")
    fedprox_mu: float = Field(
        default=0.0, ge=0,
        description="FedProx proximal term μ pulling local weights towards the global model; "
                    "0 disables it (plain FedAvg local training).")
    patch_size: int | None = Field(
        default=None, ge=8, le=512,
        description="Segmentation only: train on cubic patches of this many voxels per side "
                    "cut from each volume, and score volumes by sliding windows of that size; "
                    "empty trains on whole volumes. At most the volumes' smallest side.")
    patch_foreground: float = Field(
        default=0.5, ge=0, le=1,
        description="Segmentation with patchSize: share of patches centred on a lesion voxel "
                    "(the rest at random places): small lesions are otherwise too rare in a "
                    "batch to learn from.")
    seed: int = Field(default=0, description="Seed of weight init, shuffling and noise.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="auto: bf16/fp16 autocast on GPUs, fp32 on CPUs; or force one.")


# ---- the aggregation strategy: everything below derives from the core's catalogue -------------

# Members are the catalogue's names, so the CRD enum cannot drift from what the aggregator runs.
StrategyName = StrEnum(  # type: ignore[misc]
    "StrategyName", {name.upper(): name for name in CATALOGUE})


def _cel_list(items: Iterable[str]) -> str:
    return "[" + ", ".join(f"'{item}'" for item in items) + "]"


def _cel_number(value: float) -> str:
    """A CEL double literal (params are a map of numbers, which CEL sees as doubles)."""
    return repr(float(value))


def _range_rules() -> tuple[Rule, ...]:
    """One rule per parameter name and range, for the strategies that take it: the value must
    be in the catalogue's range. A parameter's presence alone is checked by the names rule."""
    takers: dict[tuple[object, ...], tuple[Parameter, list[str]]] = {}
    for info in CATALOGUE.values():
        for param in info.params:  # same name and range (defaults may differ): one rule
            key = (param.name, param.integer, param.gt, param.ge, param.lt, param.le)
            takers.setdefault(key, (param, []))[1].append(info.name)
    rules = []
    for param, strategies in takers.values():
        value = f"self.params['{param.name}']"
        checks = [f"{value} {op} {_cel_number(bound)}" for op, bound in (
            (">", param.gt), (">=", param.ge), ("<", param.lt), ("<=", param.le))
            if bound is not None]
        if param.integer:
            checks.append(f"{value} == double(int({value}))")
        text = f"{param.name} must be {param.valid_range}"
        rules.append(Rule(
            f"!has(self.params) || !('{param.name}' in self.params) || "
            f"!(self.name in {_cel_list(strategies)}) || ({' && '.join(checks)})",
            f"{text} ({', '.join(strategies)}); see `deeprad strategies`",
            # Not the value itself: string(double) has no size bound, so the API server's cost
            # estimate for it is too high; the strategy name is an enum, so it is cheap.
            message_expression=f"'strategy ' + self.name + ': {text}'",
            field_path=f".params.{param.name}"))
    return tuple(rules)


def _taken_params() -> str:
    """CEL map: strategy name -> the parameter names it takes."""
    return "{" + ", ".join(f"'{info.name}': {_cel_list(p.name for p in info.params)}"
                           for info in CATALOGUE.values()) + "}"


def _params_doc() -> str:
    return "; ".join(
        f"{info.name}: " + (", ".join(
            f"{p.name} {p.valid_range} (default {number_text(p.default)})" for p in info.params)
            or "none") for info in CATALOGUE.values())


class StrategySpec(ApiModel):
    """How the aggregator combines the sites' updates (see `deeprad strategies`)."""

    kube_schema: ClassVar[Kube] = Kube(rules=(
        Rule(f"!has(self.params) || self.params.all(p, p in {_taken_params()}[self.name])",
             "params holds a name the strategy does not take: " + "; ".join(
                 f"{info.name}: {', '.join(p.name for p in info.params) or 'none'}"
                 for info in CATALOGUE.values()),
             field_path=".params"),
        *_range_rules(),
    ))

    name: StrategyName = Field(
        default=StrategyName("fedavg"),
        description="The strategy; see `deeprad strategies` for their parameters and "
                    "capabilities. " + "; ".join(
                        f"{info.name}: {info.summary}" for info in CATALOGUE.values()) + ".")
    params: Annotated[dict[str, float], Field(max_length=8)] | None = Field(
        default=None,
        description="Hyper-parameters of the strategy, each optional: " + _params_doc() + ".")


class DifferentialPrivacy(ApiModel):
    """Record-level DP-SGD at every site (Opacus): per-sample clipping plus Gaussian noise."""

    noise_multiplier: float | None = Field(
        default=None, gt=0, le=100,
        description="Noise standard deviation as a multiple of maxGradNorm (> 0). Leave it "
                    "empty in a FederatedStudy's roundTemplate: the operator calibrates it to "
                    "spec.privacyBudget over spec.rounds (status.privacy.noiseMultiplier). "
                    "Required in a FederatedRound.")
    max_grad_norm: float = Field(gt=0, le=1000,
                                 description="Per-sample gradient clipping bound.")
    clipping: Literal["flat", "adaptive"] = Field(
        default="flat",
        description="flat: a fixed bound; adaptive: the bound tracks a quantile of the "
                    "per-sample gradient norms.")
    delta: float | None = Field(
        default=None, gt=0, lt=1,
        description="δ at which this round's ε is reported; a study fills in its "
                    "spec.privacyBudget.delta.")


class RoundPrivacy(ApiModel):
    """Privacy settings of a round: secure aggregation and optional DP-SGD."""

    secure_aggregation: bool = Field(
        default=True,
        description="Mask every update so the aggregator learns only the sum; needs minSites "
                    ">= 2 and a strategy that runs on a secure sum ("
                    f"{', '.join(secure_sum_strategies())}).")
    secure_aggregation_threat_model: ThreatModel = Field(
        default=DEFAULT_THREAT_MODEL,
        description="What secure aggregation must withstand; it sets the threshold t of the n "
                    "admitted sites. semi-honest (the default, the hub this product assumes): "
                    "the hub runs the published code but is curious; t = floor(n/2)+1, so the "
                    "hub with any minority of the sites learns nothing beyond the sum, and "
                    "ceil(n/2)-1 sites may drop out (3 sites: 1). malicious: the hub may also "
                    "lie to sites about who dropped out; t = floor(2n/3)+1, safe while fewer "
                    "than n/3 sites collude with it, and only ceil(n/3)-1 sites may drop out "
                    "(3 sites: none). Choose malicious when the sites do not trust the hub's "
                    "operator to run the published code.")
    differential_privacy: DifferentialPrivacy | None = Field(
        default=None, description="DP-SGD settings; empty trains without differential privacy.")


def _secure_sum_message() -> str:
    """CEL: why the round's strategy cannot run under secure aggregation, and the fix."""
    fix = ("set privacy.secureAggregation: false, or use a strategy that runs on a secure sum: "
           + " or ".join(secure_sum_strategies()))
    robust = [s.name for s in CATALOGUE.values() if s.needs_clear_updates]
    return (f"'strategy.name ' + self.strategy.name + (self.strategy.name in {_cel_list(robust)}"
            " ? ' needs every update in the clear, but secure aggregation shows the hub only"
            " their sum' : ' does not run on the sum that secure aggregation shows the hub')"
            f" + ': {fix}'")


# Cross-field rules of a round's settings (FederatedStudy spec.roundTemplate and
# FederatedRound spec); privacy and strategy always exist there because they default to {}.
ROUND_SETTINGS_RULES = (
    Rule(f"!self.privacy.secureAggregation || self.strategy.name in "
         f"{_cel_list(secure_sum_strategies())}",
         "with privacy.secureAggregation the hub sees only the sum of the updates: use a "
         f"strategy that runs on it ({', '.join(secure_sum_strategies())}), or set "
         "privacy.secureAggregation: false",
         message_expression=_secure_sum_message(), field_path=".strategy.name"),
    Rule("!self.privacy.secureAggregation || self.minSites >= 2",
         "minSites must be at least 2 with privacy.secureAggregation: the sum of one update "
         "is that update", field_path=".minSites"),
)


class RoundSettings(ApiModel):
    """How one round runs: quorum, deadline, local training, aggregation and privacy."""

    kube_schema: ClassVar[Kube] = Kube(rules=ROUND_SETTINGS_RULES)

    min_sites: int = Field(
        default=2, ge=1, le=1000,
        description="Quorum: the round aggregates once every admitted site reported, or at the "
                    "deadline with at least this many reports; with fewer it fails.")
    deadline: Annotated[Duration, Kube(rules=(
        Rule("duration(self) >= duration('1m') && duration(self) <= duration('168h')",
             "deadline must be between 1m and 168h"),))] = Field(
        default="1h",
        description="How long sites may train after the round is scheduled (a Go duration "
                    "such as 45m or 2h).")
    training: LocalTraining = Field(default_factory=LocalTraining,
                                    description="Local training parameters of every site.")
    strategy: StrategySpec = Field(default_factory=StrategySpec,
                                   description="The aggregation strategy and its parameters.")
    privacy: RoundPrivacy = Field(default_factory=RoundPrivacy,
                                  description="Secure aggregation and differential privacy.")


# ---- results ----------------------------------------------------------------------------------

Fraction = Annotated[float, Field(ge=0, le=1)]


# False positives per scan at which lesion sensitivity is reported (FROC operating points).
FP_PER_SCAN: tuple[str, ...] = ("0.125", "0.25", "0.5", "1", "2", "4", "8")


class Metrics(ApiModel):
    """A model's metrics on held-out data. Classification: per record (sensitivity is recall
    on tumours). Segmentation: auroc, sensitivity, specificity and accuracy are per scan (does
    the scan hold a lesion), plus Dice, HD95 and lesion-level sensitivity. Pooled values
    (aggregateMetrics, inputMetrics, finalMetrics) come from the sites' pooled statistics, not
    from averaging their scores."""

    n: int | None = Field(default=None, ge=0,
                          description="Number of records (segmentation: scans) scored.")
    positives: int | None = Field(default=None, ge=0,
                                  description="Records with a tumour (scans with a lesion).")
    loss: float | None = Field(default=None, description="Mean loss.")
    auroc: Fraction | None = Field(default=None, description="Area under the ROC curve.")
    sensitivity: Fraction | None = Field(default=None, description="True-positive rate.")
    specificity: Fraction | None = Field(default=None, description="True-negative rate.")
    accuracy: Fraction | None = Field(default=None, description="Share of correct predictions.")
    dice: Fraction | None = Field(
        default=None, description="Segmentation: Dice overlap of the predicted and reference "
                                  "lesion masks, averaged over the scans that hold a lesion "
                                  "(higher is better; healthy scans count in specificity).")
    hd95: Annotated[float, Field(ge=0)] | None = Field(
        default=None, description="Segmentation: mean 95th-percentile Hausdorff distance in mm "
                                  "between predicted and reference lesion boundaries, over "
                                  "scans where both hold a lesion (lower is better).")
    lesion_sensitivity: Annotated[dict[str, Fraction], Field(max_length=len(FP_PER_SCAN)),
                                  Kube(rules=(Rule(
                                      f"self.all(k, k in {_cel_list(FP_PER_SCAN)})",
                                      "keys are false positives per scan: "
                                      + ", ".join(FP_PER_SCAN)),))] | None = Field(
        default=None, description="Segmentation: share of reference lesions (connected "
                                  "components) found at a given number of false positives per "
                                  "scan, keyed by that number (" + ", ".join(FP_PER_SCAN)
                                  + "; FROC operating points).")


class RoundMode(StrEnum):
    TRAIN = "train"
    EVALUATE = "evaluate"


ROUND_MODE_DESCRIPTION = (
    "train (the default): the sites train the input checkpoint and the aggregator combines "
    "their updates. evaluate: the sites only score the input checkpoint on their held-out test "
    "split (the validation split where they have none) and report it; nothing is uploaded, "
    "no ε is spent and no checkpoint is written; the pooled scores go to status.testMetrics. "
    "The sites' policies must allow the round's privacy settings as for training.")

EvaluatedSplit = Literal["test", "validation"]


class CheckpointRef(ApiModel):
    """A model checkpoint in the object store: its URI and the sha256 of its payload."""

    uri: Uri = Field(description="Object-store URI of the safetensors payload, e.g. "
                                 "s3://bucket/ns/study/rounds/3/global.safetensors.")
    digest: Sha256 | None = Field(
        default=None, description="sha256 of the payload (64 hex digits), as in its manifest.")
    round: int | None = Field(default=None, ge=0,
                              description="Round that produced it; 0 is the initial model.")
