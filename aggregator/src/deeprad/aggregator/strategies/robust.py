"""Robust aggregation for deployments without secure aggregation: the median, the trimmed
mean and (Multi-)Krum resist a minority of poisoned updates. Each weighs sites equally.

Memory: they need every update at once (see BufferedStrategy): N x the largest tensor resident,
with the updates themselves read from disk tensor by tensor. Krum also reads them twice.
Their parameters' valid ranges are checked by the catalogue (deeprad.core.strategies) when
make_strategy builds them.
"""

from __future__ import annotations

import math

import torch

from deeprad.aggregator.strategies.base import BufferedStrategy


class FedMedian(BufferedStrategy):
    """Coordinate-wise median of the updates (the mean of the two middle values for even N)."""

    name = "fedmedian"

    def finish(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        self._require(1)
        n = len(self._updates)
        new = {}
        for k in self._global:
            s = self._stacked(k).sort(dim=0).values
            new[k] = self._apply(k, (s[(n - 1) // 2] + s[n // 2]) / 2)
        return new, {}


class TrimmedMean(BufferedStrategy):
    """Coordinate-wise mean after dropping the ⌊β·N⌋ largest and smallest values."""

    name = "trimmedmean"

    def __init__(self, *, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = float(beta)

    def finish(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        self._require(1)
        n = len(self._updates)
        cut = math.floor(self.beta * n)
        new = {}
        for k in self._global:
            s = self._stacked(k).sort(dim=0).values
            new[k] = self._apply(k, s[cut : n - cut].mean(dim=0))
        return new, {}


class Krum(BufferedStrategy):
    """Krum (Blanchard et al. 2017) and Multi-Krum: score each update by the summed squared
    distance to its N − f − 2 nearest others, keep the `select` lowest-scoring, average them."""

    name = "krum"

    def __init__(self, *, byzantine: int = 0, select: int = 1) -> None:
        super().__init__()
        self.byzantine, self.select = int(byzantine), int(select)

    def scores(self) -> torch.Tensor:
        """Krum score of every update, in the order they were added."""
        n = len(self._updates)
        dist = torch.zeros(n, n, dtype=torch.float64)
        for k in self._global:
            flat = self._stacked(k).reshape(n, -1).to(torch.float64)
            dist += torch.cdist(flat, flat).pow(2)
        closest = n - self.byzantine - 2
        others = dist + torch.diag(torch.full((n,), math.inf, dtype=torch.float64))
        return others.sort(dim=1).values[:, :closest].sum(dim=1)

    def chosen(self) -> list[int]:
        """Indices of the selected updates, best score first."""
        self._require(max(2 * self.byzantine + 3, self.select))
        return [int(i) for i in self.scores().argsort()[: self.select]]

    def finish(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        keep = self.chosen()
        new = {}
        for k in self._global:
            new[k] = self._apply(k, torch.stack([self._updates[i][k].to(torch.float32)
                                                 for i in keep]).mean(dim=0))
        return new, {}
