"""Options of a local federated study (`deeprad simulate`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from deeprad.core.errors import ConfigError
from deeprad.core.model_catalogue import MODEL_TASKS
from deeprad.core.protocol import NORMALIZATIONS, TASKS, ModelSpec, StrategySpec, TrainConfig
from deeprad.core.secagg.threat import DEFAULT_THREAT_MODEL, THREAT_MODELS, ThreatModel
from deeprad.core.strategies import secure_sum_strategies, strategy_info


def flag_error(exc: ValidationError) -> ConfigError:
    """A message's validation error as a one-line error naming the flag it came from (the
    flags are named after the fields: batch_size is --batch-size)."""
    error = exc.errors()[0]
    field_name = str(error["loc"][-1]) if error["loc"] else "?"
    return ConfigError(f"--{field_name.replace('_', '-')} {error.get('input')!s}: "
                       f"{error['msg'][0].lower()}{error['msg'][1:]}")


@dataclass(frozen=True)
class Recipe:
    """A study's model and local-training defaults; each flag given on the command line wins."""

    model: str
    optimizer: str
    lr: float
    batch_size: int
    local_epochs: int
    max_grad_norm: float  # per-record clipping bound (DP-SGD only)
    image_size: int = 64  # pixels per side (2D) or voxels per edge (3D)
    samples_per_site: int = 240  # phantom slices, or anatomy patients, before SIZE_SKEW
    rounds: int = 5
    patch_size: int = 0  # 3D: training patch voxels per side (0: whole volumes)


# Quantity skew across hospitals: some are big teaching hospitals, some small clinics.
SIZE_SKEW = (1.5, 1.0, 0.75, 0.5)


# The fewest samples a benchmark hospital may have before SIZE_SKEW: 2D slices, or 3D patients
# (each split needs a patient with and one without a lesion).
MIN_SAMPLES = {"classification": 8, "segmentation": 6}


DEFAULT_SITES = 4  # benchmark hospitals that train when --sites is left out

# The built-in synthetic data of each task (--dataset left out): 2D tumour phantoms for
# classification, synthetic lesions on real MNI152 anatomy for segmentation.
BENCHMARKS: dict[str, str] = {"classification": "phantom", "segmentation": "anatomy"}


def is_benchmark(dataset: str) -> bool:
    """True for generated (synthetic) data, False for a folder of the user's own."""
    return dataset in BENCHMARKS.values()


def default_held_out(task: str, dataset: str) -> int:
    """Hospitals kept out of training when --held-out-sites is left out: one for the anatomy
    benchmark (its hospitals differ like scanners do, so it tests generalisation), else none."""
    return 1 if task == "segmentation" and dataset == BENCHMARKS["segmentation"] else 0


def site_entries(root: Path) -> list[Path]:
    """A dataset folder's hospitals: each sub-folder or .npz file, in name order."""
    return sorted(p for p in root.iterdir() if p.is_dir() or p.suffix == ".npz")


def site_count(dataset: str, sites: int | None, held_out: int = 0) -> int:
    """How many hospitals train: --sites for a benchmark (default 4; `held_out` more are
    generated); for a dataset folder, its site entries less the `held_out` ones, so no hospital
    is dropped without a word (a --sites that disagrees is refused)."""
    if is_benchmark(dataset):
        return DEFAULT_SITES if sites is None else sites
    root = Path(dataset)
    if not root.is_dir():
        raise ConfigError(f"--dataset {dataset!r}: not one of {', '.join(BENCHMARKS.values())} "
                          "and not a folder")
    found = len(site_entries(root))
    if found == 0:
        raise ConfigError(f"--dataset {root}: no site sub-folders or .npz files in it; put "
                          "one per hospital there")
    if held_out >= found:
        raise ConfigError(f"--held-out-sites {held_out}: --dataset {root} holds only {found} "
                          "site folders / .npz files; at least one must train")
    if sites is not None and sites != found - held_out:
        raise ConfigError(f"--dataset {root} holds {found} site folders / .npz files but "
                          f"--sites is {sites}: leave --sites out (the folder decides) or "
                          f"pass --sites {found - held_out}")
    return found - held_out


@dataclass(frozen=True)
class SimulationConfig:
    sites: int = 4  # hospitals that train
    rounds: int = 5
    task: str = "classification"  # protocol.TASKS; model.task must agree
    model: ModelSpec = field(default_factory=ModelSpec)
    strategy: StrategySpec = field(default_factory=StrategySpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    # "phantom" / "anatomy" (BENCHMARKS), or a folder with one sub-folder / .npz file per site
    dataset: str = "phantom"
    samples_per_site: int = 240  # benchmarks only (slices or patients); scaled by SIZE_SKEW
    test_samples_per_site: int = 100  # phantoms only: the held-out test set
    image_size: int = 64
    normalize: str = "image"  # intensity scaling of a dataset folder: image, dataset or none
    positive_label: str | None = None  # a dataset folder's tumour class / .npz label values
    seed: int = 0
    # hospitals never trained on, scored apart (the last ones: generated after the training
    # hospitals, or a dataset folder's last entries in name order)
    held_out_sites: int = 0
    leave_one_out: bool = False  # also run the study once without each training hospital
    output: Path = Path("runs/demo")
    workers: int = 0  # 0: one per core, at most one per site
    baselines: bool = True
    report_json: Path | None = None
    # differential privacy: a study budget (ε, δ) for record-level DP-SGD at every site
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    dp_accountant: str = "rdp"
    dp_noise_multiplier: float | None = None  # None: calibrated to spend the budget
    max_grad_norm: float = 1.0
    # secure aggregation: the hub sees only the sum (strategies that run on a secure sum)
    secure_aggregation: bool = False
    secagg_clip: float = 1.0
    secagg_threat_model: ThreatModel = DEFAULT_THREAT_MODEL  # sets the threshold (threshold_for)
    # The exchange's window: sites train within it, less four step timeouts (relay.py); no
    # deadline to derive it from here, and a failed site is marked gone at once.
    secagg_timeout_s: float = 1800.0
    # distributed DP: site-level (ε, dp_delta) on the secure sum, each site adding a noise share
    distributed_dp_epsilon: float | None = None
    distributed_dp_clip: float = 1.0  # L2 bound on each site's update

    def __post_init__(self) -> None:
        if self.sites < 1:
            raise ConfigError(f"--sites must be >= 1, got {self.sites}")
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be >= 1, got {self.rounds}")
        self._check_task()
        least = MIN_SAMPLES[self.task]
        if self.samples_per_site < least:
            raise ConfigError(f"--samples-per-site must be >= {least}, got "
                              f"{self.samples_per_site}")
        if self.held_out_sites < 0:
            raise ConfigError(f"--held-out-sites must be >= 0, got {self.held_out_sites}")
        if self.leave_one_out and self.sites < 2:
            raise ConfigError(f"--leave-one-out needs >= 2 training hospitals (--sites), got "
                              f"{self.sites}")
        if self.leave_one_out and (self.dp_epsilon is not None
                                   or self.distributed_dp_epsilon is not None):
            # each left-out study trains every other hospital's records again: their ε would
            # compose over S studies while the report shows one
            raise ConfigError("--leave-one-out with a privacy budget would train each "
                              "hospital's records in several studies and spend more ε than the "
                              "report shows: drop --leave-one-out or the DP flags")
        if self.normalize not in NORMALIZATIONS:
            raise ConfigError(f"--normalize must be one of {', '.join(NORMALIZATIONS)}, got "
                              f"{self.normalize!r}")
        if is_benchmark(self.dataset) and (self.positive_label is not None
                                           or self.normalize != "image"):
            raise ConfigError("--positive-label and --normalize apply to a --dataset folder; "
                              "the benchmarks are labelled and scaled by their generator")
        if self.task == "segmentation" and self.positive_label is not None:
            raise ConfigError("--positive-label applies to classification; a segmentation "
                              "site's lesions are the nonzero voxels of its masks")
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")
        if self.dp_epsilon is not None and not self.dp_epsilon > 0:
            raise ConfigError(f"--dp-epsilon must be > 0, got {self.dp_epsilon}")
        if self.dp_noise_multiplier is not None and self.dp_epsilon is None:
            raise ConfigError("--dp-noise-multiplier needs a budget: pass --dp-epsilon too")
        if self.dp_accountant not in ("rdp", "pld"):
            raise ConfigError(f"--dp-accountant must be rdp or pld, got {self.dp_accountant!r}")
        if self.distributed_dp_epsilon is not None and not self.secure_aggregation:
            raise ConfigError("--distributed-dp-epsilon needs --secure-aggregation: the noise "
                              "shares are small enough to hide a site only inside the masked sum")
        if self.distributed_dp_epsilon is not None and not self.distributed_dp_epsilon > 0:
            raise ConfigError(f"--distributed-dp-epsilon must be > 0, got "
                              f"{self.distributed_dp_epsilon}")
        if not self.distributed_dp_clip > 0:
            raise ConfigError(f"--distributed-dp-clip must be > 0, got {self.distributed_dp_clip}")
        if self.secagg_threat_model not in THREAT_MODELS:
            raise ConfigError(f"--secagg-threat-model must be one of {', '.join(THREAT_MODELS)}"
                              f", got {self.secagg_threat_model!r}")
        # Strategy name and parameters checked by the catalogue: fails fast, before any worker.
        strategy_info(self.strategy.name).validate(self.strategy.params)
        if self.secure_aggregation and not strategy_info(self.strategy.name).runs_on_secure_sum:
            raise ConfigError(f"--secure-aggregation needs a strategy that runs on a secure sum "
                              f"({', '.join(secure_sum_strategies())}): the hub sees only the "
                              f"sum of the updates; got --strategy {self.strategy.name}")

    def _check_task(self) -> None:
        """The task, the model and the data agree (one line naming the flag otherwise)."""
        if self.task not in TASKS:
            raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.model.task != self.task:
            raise ConfigError(f"model task {self.model.task!r} but --task {self.task}: build "
                              "the ModelSpec with the study's task")
        made_for = MODEL_TASKS.get(self.model.name)
        if made_for is not None and made_for != self.task:
            fits = ", ".join(n for n, t in MODEL_TASKS.items() if t == self.task)
            raise ConfigError(f"--model {self.model.name} is a {made_for} network but --task "
                              f"is {self.task}: pass --model one of {fits} (or leave --model "
                              "out)")
        for task, benchmark in BENCHMARKS.items():
            if self.dataset == benchmark and task != self.task:
                raise ConfigError(f"--dataset {benchmark} is the {task} benchmark but --task "
                                  f"is {self.task}: leave --dataset out for the "
                                  f"{BENCHMARKS[self.task]} benchmark, or pass --task {task}")

    @property
    def worker_count(self) -> int:
        cores = len(os.sched_getaffinity(0))
        if self.secure_aggregation:  # every site must be online for the exchange
            return max(self.workers, self.sites)
        return self.workers or max(1, min(self.sites, cores))

    @property
    def threads_per_worker(self) -> int:
        return max(1, len(os.sched_getaffinity(0)) // self.worker_count)


# The demo without differential privacy: the defaults of the messages themselves (tumor-cnn,
# Adam, small batches).
_TRAIN = TrainConfig()
DEFAULT_RECIPE = Recipe(model=ModelSpec().name, optimizer=_TRAIN.optimizer, lr=_TRAIN.lr,
                        batch_size=_TRAIN.batch_size, local_epochs=_TRAIN.local_epochs,
                        max_grad_norm=SimulationConfig.max_grad_norm)
# With --dp-epsilon: DP-SGD adds the same noise to every trained parameter, so a network with
# few of them (tumor-jet, 209), plain SGD with momentum (its steps average the noise away across
# sites; Adam rescales noise into full-size steps) and larger Poisson batches. The clipping
# bound sits just above the per-record gradient norms at initialisation (1.1-1.4).
DP_RECIPE = Recipe(model="tumor-jet", optimizer="sgd", lr=0.3, batch_size=64, local_epochs=6,
                   max_grad_norm=1.5)
# --task segmentation: the 3D study on the anatomy benchmark (synthetic lesions on real MNI152
# anatomy, 3 sequences). A small MONAI UNet (151k parameters, instance norm) on 48^3 volumes,
# Adam lr 3e-3, batches of 2. Chosen on pooled VALIDATION Dice (Dice over the scans with a
# lesion; never the test set), over seeds 0-2, with a bare loop that runs the sites in turn.
# On whole volumes (the recipe until 2026-12: 5 rounds of 8 epochs) the cross-entropy term
# settles on "no lesion anywhere" and FedAvg, whose step is the mean of the sites' steps (about
# one hospital's progress per round, while the centralized baseline takes every hospital's steps
# in a row), stayed there for the whole study on seeds 1-3 (validation Dice 0.000; centralized
# 0.22-0.46). Tried there without a fix (seed 0, 5 rounds, federated 0.288): server learning
# rate 2 0.376 (3 diverged; seed 1 still 0), FedAvgM 0.190, FedAdam 0.009, 10 rounds of 4 epochs
# 0.123, 32 patients per hospital 0.395, no residual units 0.220, Dice loss alone (seed 1)
# 0.13-0.20 and erratic. What worked: 32^3 training patches, half of them centred on a lesion
# voxel (nnU-Net's foreground oversampling, MONAI's RandCropByPosNegLabel rule), scored by
# sliding windows (whole-volume scoring of the same models: seed 0 centralized 0.626 vs 0.787).
# A patch step costs a third of a whole-volume step, which pays for more training. Seed 1, 5
# rounds: 8 epochs federated 0.319 / centralized 0.494; 16 epochs 0.467 / 0.718 (the federated
# model still a round behind). 10 rounds, final round, federated / centralized: 16 epochs seed 0
# 0.763 / 0.787, seed 1 0.690 / 0.644, seed 2 0.526 / 0.530 (but the default study took 12 min
# on 2 cores); 12 epochs 0.707 / 0.706, 0.668 / 0.645, 0.461 / 0.481; 8 epochs with a third of
# the patches on lesions (nnU-Net's share) 0.697 / 0.648, 0.503 / 0.701, 0.361 / 0.448.
# `make bench-seg` runs it over 5 seeds.
SEG_RECIPE = Recipe(model="unet3d", optimizer="adam", lr=3e-3, batch_size=2, local_epochs=12,
                    max_grad_norm=1.0, image_size=48, samples_per_site=16, rounds=10,
                    patch_size=32)


def recipe_for(task: str, private: bool) -> Recipe:
    """The defaults a study's flags left out take: the task's, or the DP recipe's for a
    private classification study."""
    if task == "segmentation":
        return SEG_RECIPE
    return DP_RECIPE if private else DEFAULT_RECIPE
