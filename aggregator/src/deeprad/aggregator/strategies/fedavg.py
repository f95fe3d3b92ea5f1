"""FedAvg (McMahan et al. 2017): the sample-weighted mean of the site updates."""

from __future__ import annotations

import torch

from deeprad.aggregator.strategies.base import MeanStrategy


class FedAvg(MeanStrategy):
    """x ← x + η · Σ nᵢ Δᵢ / Σ nᵢ  (η = server_lr, 1 by default). Streams: one model of memory."""

    name = "fedavg"

    def __init__(self, *, server_lr: float = 1.0) -> None:
        super().__init__()
        self.server_lr = float(server_lr)

    def finish(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        mean = self._mean.mean()
        return {k: self._apply(k, d.mul_(self.server_lr)) for k, d in mean.items()}, {}
