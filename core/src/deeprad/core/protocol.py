"""Every message that crosses a process boundary, each with a schema version.

Tasks go to the trainer and aggregator (as Job arguments or worker calls); manifests and
results go to the object store as JSON. Unknown fields are refused so typos surface early.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deeprad.core.errors import CheckpointError
from deeprad.core.privacy import AccountantName, DPConfig, DPSteps
from deeprad.core.signing import STATEMENT_FIELDS, Statement

SCHEMA_VERSION: Literal[1] = 1


def utc_now() -> str:
    """An RFC 3339 UTC timestamp."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# What a site's trainer does in a round: train and upload an update, or only score the
# round's input checkpoint (the study's final model) on held-out data.
TaskMode = Literal["train", "evaluate"]
EVALUATED_SPLITS: tuple[str, ...] = ("test", "validation")

# What a study's model does. Each task has its data (2D slices with a label, or 3D multi-sequence
# volumes with a lesion mask), its loss, its metrics and the metric that ranks its rounds.
TaskKind = Literal["classification", "segmentation"]
TASKS: tuple[str, ...] = ("classification", "segmentation")
PRIMARY_METRIC: dict[str, str] = {"classification": "auroc", "segmentation": "dice"}


class ModelSpec(Message):
    """A registered network name (see `deeprad models`) or `package.module:factory`, and the
    task it is trained for (a catalogue network serves exactly one task)."""

    name: str = "tumor-cnn"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    # Left out of the JSON when it is classification: every manifest and task written before
    # tasks existed reads back, and writes, exactly as it did.
    task: TaskKind = Field(default="classification",
                           exclude_if=lambda task: task == "classification")


# How a site's intensities are scaled (DatasetSpec.options["normalize"]):
# - "image": each image min-max scaled to [0, 1] on its own (the default; the phantoms' recipe);
# - "dataset": one min-max over all of the site's images, so an image keeps its brightness
#   relative to the others (8-bit data: divided by 255);
# - "none": the values as stored.
NORMALIZATIONS = ("image", "dataset", "none")


# Dataset kinds that hold 3D volumes with lesion masks (segmentation); the others hold labelled
# 2D images (classification).
VOLUME_KINDS: tuple[str, ...] = ("anatomy", "volumes")
MAX_VOLUME_EDGE = 256  # the largest cube a volume dataset is resampled to (voxels per edge)


class DatasetSpec(Message):
    """Where a site's images come from and how they are split into train and validation.

    `anatomy`: the synthetic-lesions-on-real-anatomy benchmark (deeprad.core.data.anatomy);
    `volumes`: a folder of per-patient NIfTI volumes or DICOM series with NIfTI lesion masks
    (deeprad.core.data.volumes). For both, `image_size` is the edge of the cubic volume the
    network sees and splits are by patient."""

    kind: Literal["phantom", "folder", "npz", "import", "anatomy", "volumes"] = "phantom"
    path: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    image_size: int = Field(default=64, ge=8, le=1024)
    val_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    split_seed: int = 0

    @model_validator(mode="after")
    def _volume_edge(self) -> DatasetSpec:
        # a volume is image_size^3 voxels per sequence: 1024 would be 4 GiB each
        if self.kind in VOLUME_KINDS and self.image_size > MAX_VOLUME_EDGE:
            raise ValueError(f"image_size {self.image_size}: {self.kind} volumes are resampled "
                             f"to image_size^3; use at most {MAX_VOLUME_EDGE}")
        return self


class TrainConfig(Message):
    """Local training parameters of one site in one round."""

    local_epochs: int = Field(default=3, ge=1)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    fedprox_mu: float = Field(default=0.0, ge=0)
    # 3D segmentation: train on cubic patches of this many voxels per side (None: whole
    # volumes), `patch_foreground` of them centred on a lesion voxel; volumes are then scored
    # by sliding windows of the patch (`deeprad.trainer.segmentation.PatchSampler`).
    patch_size: int | None = Field(default=None, ge=8)
    patch_foreground: float = Field(default=0.5, ge=0, le=1)
    seed: int = 0
    device: str = "auto"
    # "auto": bf16 autocast on GPUs that have it (fp16 with a gradient scaler otherwise), fp32 on
    # CPUs, so CPU training is unchanged; bf16/fp16 force that autocast dtype anywhere.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = False  # NHWC weights and batches; measure with benchmarks/bench_gpu.py
    compile: bool = False  # torch.compile the model for training (minutes of warm-up)
    deterministic: bool = False  # deterministic kernels, no cuDNN autotuning; slower on GPUs


class StrategySpec(Message):
    """An aggregation strategy (see `deeprad strategies`) and its hyper-parameters."""

    name: str = "fedavg"
    params: dict[str, Any] = Field(default_factory=dict)


class ScoreHistogram(Message):
    """Positive and negative cases counted per logit bin (equal bins over logits clipped to
    [-16, 16]: `deeprad.core.metrics.score_histogram`, so saturated scores near 1 stay apart):
    counts add up across sites, so a pooled AUROC comes from the pooled predictions (exact up
    to the bin width) while no single prediction leaves a hospital."""

    positives: list[int]
    negatives: list[int]


class LesionCounts(Message):
    """Lesion-level detection counts (FROC's sufficient statistics) at fixed score thresholds:
    lesions found and false-positive components, summed over scans. They add up across scans
    and sites, so pooled sensitivity at k false positives per scan is exact."""

    thresholds: list[float]
    hits: list[int]  # reference lesions detected at each threshold
    false_positives: list[int]  # predicted components matching no lesion, at each threshold
    lesions: int  # reference lesions (connected components of the masks)
    scans: int


class ClinicalMetrics(Message):
    """Metrics a clinician reads. Classification: per image (sensitivity is recall on
    tumours). Segmentation: `auroc`, `sensitivity`, `specificity` and `accuracy` are per scan
    ("does this scan hold a lesion", scored by the largest lesion probability; specificity is the
    share of healthy scans with nothing predicted), `dice` is the mean Dice over the scans that
    hold a lesion, `hd95` the mean 95th-percentile Hausdorff distance in mm over scans
    where both the reference and the prediction hold a lesion, and `lesion_sensitivity` the
    share of lesions found at 1/8 … 8 false positives per scan (keys "0.125" … "8")."""

    n: int
    positives: int
    loss: float
    auroc: float | None
    sensitivity: float | None
    specificity: float | None
    accuracy: float
    histogram: ScoreHistogram | None = None
    dice: float | None = None
    hd95: float | None = None
    hd95_cases: int = 0  # the scans `hd95` averages over (its weight when pooled)
    lesion_sensitivity: dict[str, float] | None = None
    lesions: LesionCounts | None = None


class DistributedDPSpec(Message):
    """Distributed DP on the secure sum (deeprad.core.distributed_dp, which plans it): each
    site clips its update to L2 `l2_clip`, rotates and rounds it at `granularity`, and adds
    discrete Gaussian noise of variance noise_stddev²/noise_shares before masking. Site-level
    (ε, δ) after `rounds` rounds; the plan's values, so every party uses the same."""

    l2_clip: float = Field(gt=0)
    noise_stddev: float = Field(gt=0)  # of the summed noise, in update units
    noise_shares: int = Field(ge=1)  # the fewest shares any unmasked sum holds: the threshold
    max_sites: int = Field(ge=1)
    granularity: float = Field(gt=0)
    beta: float = Field(ge=0, lt=1)
    epsilon: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    rounds: int = Field(ge=1)


class SecAggSpec(Message):
    """Secure aggregation for one round (any strategy that runs on the weighted mean): who takes
    part, the threshold, the fixed-point encoding, and how long each party waits for the
    others' messages in the object store.

    Each site uploads (n_u / weight_normalizer) * delta and, as one extra value, n_u /
    weight_normalizer, so the hub learns only the weighted sum and the survivors' total weight.
    `weight_normalizer` is the roster's declared sample count: every weight stays <= 1."""

    roster: list[str]
    threshold: int | None = None  # default: semi-honest, floor(n/2)+1 (secagg.threshold_for)
    clip: float = Field(default=1.0, gt=0)  # per value of the weighted delta
    weight_normalizer: float = Field(gt=0)
    # the window from the start of the exchange to the round's deadline; each step after
    # training waits a share of it (deeprad.core.secagg.relay)
    timeout_s: float = Field(default=900.0, gt=0)
    poll_s: float = Field(default=0.1, gt=0)
    # None: the weighted sum above; set: every site's clipped update counts once, with noise
    distributed_dp: DistributedDPSpec | None = None


class RoundEpsilon(Message):
    """The round's ε as the study planned it before starting the round (largest site)."""

    epsilon_round: float
    epsilon_spent: float  # the study's ε after this round
    delta: float
    accountant: AccountantName = "rdp"


class TrainingTask(Message):
    """What one site trains in one round.

    Signing and encryption are always on: the trainer loads its identity from `identity_dir`
    (a mounted key folder), else the folder in DEEPRAD_IDENTITY_DIR, else the DEEPRAD_*_KEY
    environment variables; `registry_json` holds the registered public keys (the hub's at
    least)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    namespace: str
    study: str
    # uid of the object that owns the study's store keys (`deeprad.core.layout`); None: a run
    # without a cluster, whose keys have no uid
    study_uid: str | None = None
    round: int = Field(ge=1)
    site: str
    model: ModelSpec = ModelSpec()
    dataset: DatasetSpec = DatasetSpec()
    train: TrainConfig = TrainConfig()
    registry_json: str
    identity_dir: str | None = None
    privacy: DPConfig | None = None  # record-level DP-SGD; None trains without DP
    secagg: SecAggSpec | None = None
    # "evaluate": score the round's input checkpoint on the site's held-out test split (the
    # validation split where the site has none) and report it; nothing is trained or uploaded
    # and no ε is spent. `privacy` and `secagg` stay as the study trains, so the hospital's
    # policy allows an evaluation exactly where it would allow the training.
    mode: TaskMode = "train"


class SecAggUpload(Message):
    """How a masked upload was encoded (the hub checks it against the round's config)."""

    vector_length: int
    clip: float
    max_sites: int


class SignedManifest(Message):
    """A manifest that carries the fields of its signed `Statement` flat, beside the signature.

    Which fields a signature covers, and what makes them valid, is declared once, on
    `Statement`; a manifest derives its statement with `statement()`, never by copying fields
    by hand. The manifests keep their own field order and types (a checkpoint's signer is not
    stored; old checkpoints may lack a namespace and nonce), so the JSON in the store is what
    it always was."""

    def statement_fields(self) -> dict[str, Any]:
        """This manifest's values of the fields its signature covers (untrusted until
        validated: `deeprad.core.signing.parse_statement`)."""
        return self.model_dump(include=set(STATEMENT_FIELDS))


class UpdateManifest(SignedManifest):
    """Describes one site's update payload; the aggregator checks every field."""

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["update"] = "update"
    namespace: str
    study: str
    round: int
    site: str
    nonce: str
    parent_sha256: str
    payload_sha256: str  # sha256 of the stored (encrypted) envelope
    signature: str | None = None  # base64 Ed25519 over the Statement of the fields above
    num_samples: int
    producer: str
    secagg: SecAggUpload | None = None  # set when the payload is a packed masked vector
    created_at: str = Field(default_factory=utc_now)

    def statement(self) -> Statement:
        """What the site signs for this update (its `site` is the signer); ValueError when the
        fields cannot form a statement."""
        return Statement.model_validate(self.statement_fields())


class SiteResult(Message):
    """A site's non-sensitive report for one round."""

    schema_version: Literal[1] = SCHEMA_VERSION
    study: str
    round: int
    site: str
    num_samples: int
    # the received global model on the site's validation split, before training
    global_metrics: ClinicalMetrics | None
    local_metrics: ClinicalMetrics | None  # the site's model after local training, same split
    train_loss: float
    update_sha256: str
    duration_s: float
    privacy: DPSteps | None = None  # the DP-SGD steps actually taken, for the study's ledger
    # Evaluate mode: the checkpoint on the site's held-out split named by `test_split` ("test",
    # or "validation" where the site has no test split); `update_sha256` is "" then (nothing
    # was uploaded), `train_loss` 0 and `num_samples` the records scored.
    test_metrics: ClinicalMetrics | None = None
    test_split: Literal["test", "validation"] | None = None


class Contribution(Message):
    site: str
    update_sha256: str
    num_samples: int


class SecAggOutcome(Message):
    """What secure aggregation did in a round."""

    survivors: list[str]
    dropped: list[str]  # shared keys, then sent no valid masked input: their masks were removed
    not_joined: list[str]
    threshold: int
    clip: float
    quantization_bound: float  # worst-case absolute error per value of the decoded mean


class CheckpointManifest(SignedManifest):
    """Lineage and digests of a global model checkpoint, signed by the hub over its
    `statement()`. The strategy state's digest is also inside the signed payload's safetensors
    metadata."""

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["checkpoint"] = "checkpoint"
    namespace: str | None = None
    study: str
    round: int
    producer: str
    model: ModelSpec
    payload_sha256: str
    parent_sha256: str | None
    nonce: str | None = None
    signature: str | None = None  # base64 Ed25519 by the hub; readers that train refuse None
    strategy: StrategySpec | None = None
    strategy_state_sha256: str | None = None
    contributors: list[Contribution] = Field(default_factory=list)
    epsilon_round: float | None = None
    epsilon_spent: float | None = None
    secagg: SecAggOutcome | None = None
    created_at: str = Field(default_factory=utc_now)

    def statement(self, signer: str) -> Statement:
        """What the hub, whose identity is named `signer`, signs for this checkpoint;
        CheckpointError when the manifest cannot carry a signature."""
        where = f"checkpoint {self.study} round {self.round}"
        if self.namespace is None or self.nonce is None:
            raise CheckpointError(f"{where}: manifest has no namespace or nonce, so it cannot "
                                  "carry the hub's signature")
        try:
            return Statement.model_validate({**self.statement_fields(), "site": signer})
        except ValueError as exc:
            raise CheckpointError(f"{where}: manifest fields cannot form a signed statement: "
                                  f"{exc}") from None


class AggregationTask(Message):
    """What the aggregator does at the end of one round."""

    schema_version: Literal[1] = SCHEMA_VERSION
    namespace: str
    study: str
    # uid of the object that owns the study's store keys (`deeprad.core.layout`); None: a run
    # without a cluster, whose keys have no uid
    study_uid: str | None = None
    round: int = Field(ge=1)
    strategy: StrategySpec = StrategySpec()
    sites: list[str] | None = None  # the admitted sites; None takes every update present
    min_sites: int = Field(default=1, ge=1)
    registry_json: str  # registered public keys: the hub's and every site's
    identity_dir: str | None = None  # the hub's key folder (else DEEPRAD_IDENTITY_DIR / env)
    privacy: RoundEpsilon | None = None
    secagg: SecAggSpec | None = None
    # Who created the study (or the lone round): its deeprad.io/created-by annotation, which
    # an admission policy sets from the API server's view of the requester; for the audit.
    created_by: str | None = None
    # "evaluate": the round's sites only scored its input checkpoint; pool their results into
    # the report (no update is read, no checkpoint written). The operator cannot pool: exact
    # pooling lives with the metrics, beside torch, which the operator never imports.
    mode: TaskMode = "train"


class CheckpointSource(Message):
    """A hub-signed checkpoint elsewhere in the same store (another study, or a round of one)."""

    namespace: str
    study: str
    uid: str | None = None  # the source's owner uid, when its keys carry one
    round: int = Field(ge=0)
    sha256: str | None = None  # the payload digest the caller expects


class PrepareTask(Message):
    """Write round `round`'s global checkpoint, the input of round `round + 1`: a freshly
    initialised model, or `source` verified with the hub's key and re-signed for this study."""

    schema_version: Literal[1] = SCHEMA_VERSION
    namespace: str
    study: str
    # uid of the object that owns the study's store keys (`deeprad.core.layout`); None: a run
    # without a cluster, whose keys have no uid
    study_uid: str | None = None
    round: int = Field(ge=0)
    model: ModelSpec = ModelSpec()
    seed: int = 0
    source: CheckpointSource | None = None
    registry_json: str  # the hub's public keys, to verify an imported source
    identity_dir: str | None = None  # the hub's key folder (else DEEPRAD_IDENTITY_DIR / env)


class Rejection(Message):
    site: str
    reason: str


class AggregateReport(Message):
    """What the aggregator did in one round, written next to the new checkpoint."""

    schema_version: Literal[1] = SCHEMA_VERSION
    study: str
    round: int
    strategy: StrategySpec
    contributors: list[Contribution]
    rejected: list[Rejection]
    missing: list[str]
    federated_metrics: ClinicalMetrics | None
    checkpoint_sha256: str
    duration_s: float
    privacy: RoundEpsilon | None = None
    secagg: SecAggOutcome | None = None
    # An evaluation round's report: the sites' scores of the checkpoint `checkpoint_sha256`
    # (the round's input) on their held-out splits, pooled; `federated_metrics` is the same
    # checkpoint on their validation splits, and `contributors` is empty (nothing aggregated).
    test_metrics: ClinicalMetrics | None = None
    evaluated_sites: list[str] = Field(default_factory=list)
