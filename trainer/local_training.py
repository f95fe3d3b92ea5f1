"""Local training of one site: federated evaluation, epochs with an optional FedProx term,
and the weight delta that leaves the hospital."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from deeprad.core.data import ImageSet
from deeprad.core.errors import ConfigError, DataError
from deeprad.core.metrics import clinical_metrics
from deeprad.core.models import build_model, model_weights
from deeprad.core.protocol import ClinicalMetrics, ModelSpec, TrainConfig


def select_device(preference: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; anything else is passed to torch."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(preference)
    except RuntimeError as exc:
        raise ConfigError(f"train.device {preference!r}: {exc}") from exc


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, device: torch.device,
             batch_size: int = 256) -> ClinicalMetrics | None:
    """Clinical metrics of `model` on `data`; None for an empty set."""
    if len(data) == 0:
        return None
    model.eval()
    logits = torch.cat([
        model(data.images[i : i + batch_size].to(device)).flatten().float().cpu()
        for i in range(0, len(data), batch_size)
    ])
    return clinical_metrics(logits, data.labels)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_epochs(model: nn.Module, data: ImageSet, cfg: TrainConfig, device: torch.device,
                 epochs: int | None = None) -> float:
    """Train `model` in place for `epochs` (default cfg.local_epochs); returns the mean loss.

    With cfg.fedprox_mu > 0 the loss gains (mu/2)·||w − w_start||², FedProx's pull towards the
    received global model that keeps heterogeneous sites from drifting apart.
    """
    if len(data) == 0:
        raise DataError("cannot train on an empty dataset")
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = _optimizer(model, cfg)
    anchor = ([p.detach().clone() for p in model.parameters()] if cfg.fedprox_mu > 0 else None)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    total, batches = 0.0, 0
    for _ in range(epochs or cfg.local_epochs):
        order = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            x = data.images[idx].to(device, non_blocking=True)
            y = data.labels[idx].to(device, non_blocking=True)
            loss = loss_fn(model(x).flatten(), y)
            if anchor is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor,
                                                                strict=True))
                loss = loss + 0.5 * cfg.fedprox_mu * prox
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            batches += 1
    return total / max(batches, 1)


@dataclass(frozen=True)
class SiteTraining:
    """What one site's local round produced."""

    delta: dict[str, torch.Tensor]  # trained weights minus received weights
    num_samples: int
    global_metrics: ClinicalMetrics | None
    local_metrics: ClinicalMetrics | None
    train_loss: float
    duration_s: float


def train_site(model_spec: ModelSpec, global_weights: dict[str, torch.Tensor], train: ImageSet,
               val: ImageSet, cfg: TrainConfig) -> SiteTraining:
    """Evaluate the received global model on the site's validation split, train locally, and
    return the update (delta) with its metrics. The library function behind every trainer."""
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = select_device(cfg.device)
    model = build_model(model_spec)
    model.load_state_dict(global_weights)
    model.to(device)
    global_metrics = evaluate(model, val, device)
    loss = train_epochs(model, train, cfg, device)
    local_metrics = evaluate(model, val, device)
    trained = model_weights(model)
    delta = {k: trained[k] - global_weights[k] for k in global_weights}
    return SiteTraining(delta, len(train), global_metrics, local_metrics, loss,
                        time.perf_counter() - start)
