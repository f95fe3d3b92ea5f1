"""FedAvgM (Hsu et al. 2019): FedAvg with server momentum carried between rounds."""

from __future__ import annotations

import torch

from deeprad.aggregator.strategies.base import MeanStrategy


class FedAvgM(MeanStrategy):
    """Δ = weighted mean of updates; m ← β·m + Δ; x ← x + η·m. State: m."""

    name = "fedavgm"

    def __init__(self, *, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__()
        self.server_lr, self.momentum = float(server_lr), float(momentum)

    def finish(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        new, state = {}, {}
        for k, d in self._mean.mean().items():
            m = self._state.get(f"m/{k}")
            m = d if m is None else m.mul_(self.momentum).add_(d)
            state[f"m/{k}"] = m
            new[k] = self._apply(k, m.mul(self.server_lr))
        return new, state
