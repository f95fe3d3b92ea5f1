"""Local training of one site: federated evaluation, epochs with an optional FedProx term,
and the weight delta that leaves the hospital. One loop serves both tasks: labelled 2D images
(classification, BCE) and 3D volumes with lesion masks (segmentation: loss and scoring in
`deeprad.trainer.segmentation`).

The same loop runs on a laptop CPU and on a hospital's GPU node. On CUDA it adds what a GPU
needs to be kept busy (bf16/fp16 autocast, the whole dataset resident on the GPU or batches
staged through pinned memory, optional channels_last and torch.compile); on a CPU with the
default `TrainConfig` it performs exactly the operations it always did, so results are unchanged.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from deeprad.core.data import ImageSet, Samples, VolumeSet
from deeprad.core.errors import ConfigError, DataError
from deeprad.core.metrics import clinical_metrics
from deeprad.core.models import build_model, model_weights
from deeprad.core.privacy import DPConfig, DPSteps
from deeprad.core.protocol import ClinicalMetrics, ModelSpec, TrainConfig
from deeprad.trainer.segmentation import (
    PatchSampler,
    evaluate_volumes,
    inference_roi,
    segmentation_loss,
)

# A dataset takes at most this share of the GPU's free memory to live there for a whole run.
RESIDENT_FRACTION = 0.25


def select_device(preference: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; anything else is passed to torch."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preference)
    except RuntimeError as exc:
        raise ConfigError(f"train.device {preference!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device {preference!r}: no CUDA GPU is visible to this process; "
                          "use 'auto' or 'cpu'")
    return device


# ---- CPU limit ----------------------------------------------------------------------------


def _cgroup_quota(root: Path) -> float | None:
    """CPUs granted by the cgroup CPU quota under `root` (v2 `cpu.max`, else v1 CFS); None if
    unlimited or unknown."""
    candidates = [root / "cpu.max"]
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):  # cgroup v2: our own group, when not namespaced to "/"
                candidates.insert(0, root / line[3:].lstrip("/") / "cpu.max")
    for path in candidates:
        with contextlib.suppress(OSError, ValueError):
            quota, period = path.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
    for sub in ("cpu", "cpu,cpuacct"):
        with contextlib.suppress(OSError, ValueError):
            quota_us = int((root / sub / "cpu.cfs_quota_us").read_text())
            period_us = int((root / sub / "cpu.cfs_period_us").read_text())
            return None if quota_us <= 0 else quota_us / period_us
    return None


def cpu_limit(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may really use: its affinity mask, capped by the pod's cgroup CPU
    quota (Kubernetes `resources.limits.cpu`), which `os.cpu_count()` and torch both ignore."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def limit_threads() -> int:
    """Cap torch's intra-op threads at `cpu_limit()`: torch sizes its pool to the node's cores,
    and in a pod limited to fewer CPUs the surplus threads are throttled. Never raises the
    count, so callers that chose fewer threads (the simulator's workers) keep their choice."""
    n = cpu_limit()
    if torch.get_num_threads() > n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


# ---- how a step runs ----------------------------------------------------------------------


@dataclass(frozen=True)
class ExecutionPlan:
    """How `train_epochs` runs on one device, resolved from a TrainConfig."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32
    grad_scaler: bool  # fp16 needs loss scaling; bf16 has fp32's range and does not
    channels_last: bool
    compile: bool
    deterministic: bool

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]


def resolve_precision(preference: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.precision` on `device`; None means fp32 (no autocast)."""
    if preference == "fp32" or (preference == "auto" and device.type != "cuda"):
        return None
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"train.precision {preference!r}: mixed precision is supported on "
                          f"cuda and cpu devices, not {device.type!r}; use 'fp32'")
    bf16_ok = device.type == "cpu" or torch.cuda.is_bf16_supported()
    if preference == "auto":
        return torch.bfloat16 if bf16_ok else torch.float16
    if preference == "bf16":
        if not bf16_ok:
            raise ConfigError(f"train.precision 'bf16': {torch.cuda.get_device_name(device)} has "
                              "no bfloat16 support; use 'fp16' or 'auto'")
        return torch.bfloat16
    if preference == "fp16":
        return torch.float16
    raise ConfigError(f"train.precision {preference!r}: use auto, fp32, bf16 or fp16")


def plan_execution(cfg: TrainConfig, device: torch.device) -> ExecutionPlan:
    """Resolve `cfg`'s precision, layout, compile and determinism options for `device`."""
    dtype = resolve_precision(cfg.precision, device)
    return ExecutionPlan(device=device, autocast_dtype=dtype, grad_scaler=dtype == torch.float16,
                         channels_last=cfg.channels_last, compile=cfg.compile,
                         deterministic=cfg.deterministic)


@contextlib.contextmanager
def _determinism(plan: ExecutionPlan) -> Iterator[None]:
    """Deterministic kernels (and no cuDNN autotuning) while training when asked; cuDNN
    autotuning otherwise on CUDA. Restores the process-wide switches afterwards, since the
    simulator's workers train many sites in one process."""
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), cudnn.benchmark,
             cudnn.deterministic)
    if plan.deterministic:
        # cuBLAS reads this when it starts; train_site sets it before touching the GPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: some ops (e.g. adaptive max-pool backward on CUDA) have no deterministic
        # kernel; torch names them in a warning instead of failing a hospital's Job midway.
        torch.use_deterministic_algorithms(True, warn_only=True)
        cudnn.benchmark, cudnn.deterministic = False, True
    elif plan.device.type == "cuda":
        cudnn.benchmark = True  # fixed batch shapes: let cuDNN pick the fastest kernels
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.benchmark, cudnn.deterministic = saved[2], saved[3]


def _targets(data: Samples) -> torch.Tensor:
    """What the loss compares the network's output with: labels [N] of images, lesion masks
    [N, 1, D, H, W] of volumes (as float, once, rather than per step)."""
    return data.masks.float() if isinstance(data, VolumeSet) else data.labels


class BatchFeeder:
    """Training batches on the device, gathered by index from in-memory tensors.

    Every loader hands the trainer an in-memory ImageSet or VolumeSet, so a batch is one
    indexed copy: DataLoader worker processes would only add inter-process copies, which is
    why there are none and why the CPU limit sizes torch's threads instead (`limit_threads`).
    Modes:
    `direct` indexes host tensors and copies the batch (CPUs; the historical path);
    `resident` moves the whole set to the GPU once and indexes there (no host copies at all);
    `staged` gathers each batch into one of two pinned host buffers and copies it
    asynchronously, for sets too large to live on the GPU.
    """

    def __init__(self, data: Samples, device: torch.device, batch_size: int,
                 channels_last: bool = False,
                 mode: Literal["auto", "direct", "resident", "staged"] = "auto") -> None:
        self.device, self.channels_last = device, channels_last
        if mode == "auto":
            mode = "direct" if device.type != "cuda" else (
                "resident" if self._fits_on_gpu(data, device) else "staged")
        self.mode = mode
        self.images, self.labels = data.images, _targets(data)
        pin = device.type == "cuda"
        if mode == "resident":
            self.images = self.images.to(device, non_blocking=pin)
            self.labels = self.labels.to(device, non_blocking=pin)
        elif mode == "staged":
            shape = (batch_size, *data.images.shape[1:])
            self._host = [(torch.empty(shape, dtype=self.images.dtype, pin_memory=pin),
                           torch.empty((batch_size, *self.labels.shape[1:]),
                                       dtype=self.labels.dtype, pin_memory=pin))
                          for _ in range(2)]
            self._copied: list[torch.cuda.Event | None] = [None, None]
            self._turn = 0

    @staticmethod
    def _fits_on_gpu(data: Samples, device: torch.device) -> bool:
        free, _ = torch.cuda.mem_get_info(device)
        size = data.images.nbytes + _targets(data).nbytes
        return size <= RESIDENT_FRACTION * free

    def epoch_order(self, order: torch.Tensor) -> torch.Tensor:
        """The epoch's shuffled indices, where the data lives (one copy per epoch)."""
        return order.to(self.device, non_blocking=True) if self.mode == "resident" else order

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets at `idx` (from `epoch_order`), on the device."""
        if self.mode == "staged":
            x, y = self._staged(idx)
        elif self.mode == "resident":
            x, y = self.images.index_select(0, idx), self.labels.index_select(0, idx)
        else:
            x = self.images[idx].to(self.device, non_blocking=True)
            y = self.labels[idx].to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def _staged(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        turn, self._turn = self._turn, 1 - self._turn
        done = self._copied[turn]
        if done is not None:  # the copy out of this buffer two batches ago must have finished
            done.synchronize()
        host_x, host_y = (t[: len(idx)] for t in self._host[turn])
        torch.index_select(self.images, 0, idx, out=host_x)
        torch.index_select(self.labels, 0, idx, out=host_y)
        x = host_x.to(self.device, non_blocking=True)
        y = host_y.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self._copied[turn] = event
        return x, y


# ---- evaluation and training --------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, data: Samples, device: torch.device,
             batch_size: int | None = None, *, roi_size: Sequence[int] | None = None
             ) -> ClinicalMetrics | None:
    """Clinical metrics of `model` on `data`; None for an empty set. Always fp32, so metrics
    do not depend on the training precision. Images go `batch_size` at a time (default 256 on
    a GPU, 64 on a CPU, where larger batches' activations fall out of the caches and run
    slower per image). Volumes: segmentation metrics, a few scans per pass, by sliding windows
    of `roi_size` where a volume is larger (`evaluate_volumes`)."""
    if isinstance(data, VolumeSet):
        return evaluate_volumes(model, data, device, roi_size)
    if len(data) == 0:
        return None
    return clinical_metrics(image_logits(model, data, device, batch_size), data.labels)


@torch.no_grad()
def image_logits(model: nn.Module, data: ImageSet, device: torch.device,
                 batch_size: int | None = None) -> torch.Tensor:
    """`model`'s fp32 logits on `data`'s images, on the CPU (batch size as in `evaluate`)."""
    batch_size = batch_size or (64 if device.type == "cpu" else 256)
    model.eval()
    return torch.cat([
        model(data.images[i : i + batch_size].to(device)).flatten().float().cpu()
        for i in range(0, len(data), batch_size)
    ])


def _optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device
               ) -> torch.optim.Optimizer:
    # fused kernels: one launch per step instead of one per parameter tensor (CUDA only)
    fused = True if device.type == "cuda" else None
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=fused)


def _forward_module(model: nn.Module, plan: ExecutionPlan) -> nn.Module:
    if not plan.compile:
        return model
    compiled: nn.Module = torch.compile(model)  # type: ignore[assignment]
    return compiled


def _loss_function(data: Samples, per_record: bool = False
                   ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training objective for `data`'s task, from the network's fp32 output and the
    targets: BCE on one logit per image, or Dice + cross-entropy on lesion logit maps (Dice
    over the batch, or per volume when `per_record`: DP-SGD's loss must be a mean of
    per-record losses)."""
    if isinstance(data, VolumeSet):
        dice_ce = segmentation_loss(per_volume=per_record)
        return lambda logits, masks: dice_ce(logits.float(), masks)
    bce = nn.BCEWithLogitsLoss()
    return lambda logits, labels: bce(logits.flatten().float(), labels)


def _patches(data: Samples, cfg: TrainConfig) -> PatchSampler | None:
    """The patch sampler `cfg` asks for (3D volumes only), or None for whole records."""
    if cfg.patch_size is None:
        return None
    if not isinstance(data, VolumeSet):
        raise ConfigError(f"train.patchSize {cfg.patch_size}: patches are cut from 3D volumes "
                          "(segmentation); leave patchSize out for a classification study")
    return PatchSampler(cfg.patch_size, cfg.patch_foreground, cfg.seed)


def train_epochs(model: nn.Module, data: Samples, cfg: TrainConfig, device: torch.device,
                 epochs: int | None = None) -> float:
    """Train `model` (already on `device`) in place for `epochs` (default cfg.local_epochs);
    returns the mean loss. Images train with BCE, volumes with Dice + cross-entropy (on one
    patch per volume and step when cfg.patch_size is set).

    With cfg.fedprox_mu > 0 the loss gains (mu/2)·||w − w_start||², FedProx's pull towards the
    received global model that keeps heterogeneous sites from drifting apart. cfg.precision,
    channels_last, compile and deterministic choose how each step runs (see ExecutionPlan).
    """
    if len(data) == 0:
        raise DataError("cannot train on an empty dataset")
    plan = plan_execution(cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    with _determinism(plan):
        if plan.channels_last:
            model.to(memory_format=torch.channels_last)
        forward = _forward_module(model, plan)
        opt = _optimizer(model, cfg, device)
        scaler = torch.amp.GradScaler(device.type) if plan.grad_scaler else None
        anchor = ([p.detach().clone() for p in model.parameters()]
                  if cfg.fedprox_mu > 0 else None)
        loss_fn = _loss_function(data)
        patches = _patches(data, cfg)
        feeder = BatchFeeder(data, device, cfg.batch_size, plan.channels_last)
        model.train()
        # Summed on the device in float64 (what Python floats are): reading each loss back
        # with float() would stall the GPU once per step.
        acc_dtype = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
        total = torch.zeros((), dtype=acc_dtype, device=device)
        batches = 0
        for _ in range(epochs or cfg.local_epochs):
            order = feeder.epoch_order(torch.randperm(len(data), generator=gen))
            for i in range(0, len(data), cfg.batch_size):
                x, y = feeder.batch(order[i : i + cfg.batch_size])
                if patches is not None:
                    x, y = patches(x, y)
                if plan.autocast_dtype is None:
                    logits = forward(x)
                else:
                    with torch.autocast(device.type, dtype=plan.autocast_dtype):
                        logits = forward(x)
                loss = loss_fn(logits, y)
                if anchor is not None:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor,
                                                                    strict=True))
                    loss = loss + 0.5 * cfg.fedprox_mu * prox
                opt.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    opt.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                total += loss.detach()
                batches += 1
    return float(total) / max(batches, 1)


def train_epochs_private(model: nn.Module, data: Samples, cfg: TrainConfig, dp: DPConfig,
                         device: torch.device) -> tuple[float, DPSteps]:
    """Train `model` in place with record-level DP-SGD (Opacus): Poisson-sampled batches of
    expected size cfg.batch_size, each record's gradient clipped to dp.max_grad_norm, Gaussian
    noise dp.noise_multiplier * max_grad_norm. Returns the mean loss and the steps taken, which
    is what the study's accountant composes. A record is an image, or a scan's volume for
    segmentation (whose loss is a mean of per-volume losses); a patient with several scans
    would be several records, so such data is refused (ε protects a patient, not a scan).
    fp32 only; FedProx is refused (its term is not a per-record loss)."""
    from torch.utils.data import DataLoader, TensorDataset

    from deeprad.trainer.dp_sgd import make_private

    if len(data) == 0:
        raise DataError("cannot train on an empty dataset")
    if cfg.fedprox_mu > 0:
        raise ConfigError("DP-SGD with FedProx is not supported: set fedprox_mu to 0")
    if isinstance(data, VolumeSet) and len(set(data.patients)) != len(data):
        repeated = sorted({p for p in data.patients if data.patients.count(p) > 1})
        raise ConfigError(
            f"DP-SGD counts one record per scan, but patient(s) {', '.join(repeated[:5])} have "
            "several scans, so ε would not bound what one patient reveals: keep one scan per "
            "patient in a differentially private study")
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(TensorDataset(data.images, _targets(data)), batch_size=cfg.batch_size,
                        generator=gen)
    opt = _optimizer(model, cfg, device)
    model.train()
    private = make_private(model, opt, loader, dp)
    loss_fn = _loss_function(data, per_record=True)
    patches = _patches(data, cfg)  # a patch per record: still one record, one gradient
    total, batches = 0.0, 0
    try:
        for _ in range(cfg.local_epochs):
            for x, y in private.data_loader:
                x, y = x.to(device), y.to(device)
                private.optimizer.zero_grad(set_to_none=True)
                if len(x):
                    if patches is not None:
                        x, y = patches(x, y)
                    loss = loss_fn(private.model(x), y)
                    loss.backward()
                    total += float(loss.detach())
                    batches += 1
                else:
                    _no_records(model)
                private.optimizer.step()  # an empty Poisson batch still adds noise and counts
    finally:
        private.model._close()  # remove Opacus' hooks from the caller's module
    return total / max(batches, 1), private.spent()


def _no_records(model: nn.Module) -> None:
    """Per-record gradients of an empty Poisson batch: none, in the shape Opacus' optimizer
    clips and sums (a step without them raises "per sample gradient is not initialized")."""
    for param in model.parameters():
        if param.requires_grad:
            empty = torch.zeros((0, *param.shape), dtype=param.dtype, device=param.device)
            param.grad_sample = empty  # type: ignore[attr-defined]


@dataclass(frozen=True)
class SiteTraining:
    """What one site's local round produced."""

    delta: dict[str, torch.Tensor]  # trained weights minus received weights
    num_samples: int
    global_metrics: ClinicalMetrics | None
    local_metrics: ClinicalMetrics | None
    train_loss: float
    duration_s: float
    privacy: DPSteps | None = None  # DP-SGD steps taken, when trained with DP


def train_site(model_spec: ModelSpec, global_weights: dict[str, torch.Tensor], train: Samples,
               val: Samples, cfg: TrainConfig, dp: DPConfig | None = None, *,
               allow_model_code: bool = False) -> SiteTraining:
    """Evaluate the received global model on the site's validation split, train locally (with
    DP-SGD when `dp` is given), and return the update (delta) with its metrics. The library
    function behind every trainer, for images (classification) and volumes (segmentation;
    validation volumes larger than the training patch or volumes are scored by sliding windows).
    `allow_model_code`: see `build_model` (simulate only)."""
    if type(train) is not type(val):
        raise DataError(f"training data are {type(train).__name__} but validation data "
                        f"{type(val).__name__}: one dataset kind per site")
    start = time.perf_counter()
    limit_threads()
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(cfg.seed)
    device = select_device(cfg.device)
    model = build_model(model_spec, allow_code=allow_model_code)
    model.load_state_dict(global_weights)
    model.to(device)
    roi = (inference_roi(cfg) or tuple(train.images.shape[2:])
           if isinstance(train, VolumeSet) else None)
    global_metrics = evaluate(model, val, device, roi_size=roi)
    spent = None
    if dp is None:
        loss = train_epochs(model, train, cfg, device)
    else:
        loss, spent = train_epochs_private(model, train, cfg, dp, device)
    local_metrics = evaluate(model, val, device, roi_size=roi)
    trained = model_weights(model)
    delta = {k: trained[k] - global_weights[k] for k in global_weights}
    return SiteTraining(delta, len(train), global_metrics, local_metrics, loss,
                        time.perf_counter() - start, spent)
