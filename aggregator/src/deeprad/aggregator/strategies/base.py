"""The one interface every aggregation strategy implements.

The aggregator calls `begin` with the global model of the previous round (and the strategy's
saved state), `add` once per accepted update, then `finish`. Updates are deltas: trained weights
minus the global weights they started from. Tensors may be read lazily, one at a time.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from deeprad.core.errors import ConfigError

Tensors = Mapping[str, torch.Tensor]


class Strategy(abc.ABC):
    """Combine site updates into the next global model."""

    name: ClassVar[str]
    summary: ClassVar[str]
    # True: memory independent of the number of sites (updates folded in one at a time).
    streaming: ClassVar[bool] = True

    def __init__(self) -> None:
        self._global: Tensors = {}
        self._state: dict[str, torch.Tensor] = {}

    def params(self) -> dict[str, Any]:
        """Hyper-parameters, as recorded in the checkpoint manifest."""
        return {}

    def begin(self, global_weights: Tensors, state: Tensors | None = None) -> None:
        """Start a round from `global_weights`; `state` is what the last `finish` returned."""
        self._global = global_weights
        self._state = {k: v.clone() for k, v in (state or {}).items()}

    @abc.abstractmethod
    def add(self, update: Tensors, num_samples: int) -> None:
        """Take one site's update (a delta) trained on `num_samples` samples."""

    @abc.abstractmethod
    def finish(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(new global weights, state to carry to the next round; empty if stateless)."""

    def _apply(self, name: str, step: torch.Tensor) -> torch.Tensor:
        """global[name] + step, in the global tensor's dtype (integers are rounded)."""
        ref = self._global[name]
        new = step.add_(ref.to(step.dtype))
        return (new.round() if not ref.is_floating_point() else new).to(ref.dtype)


class WeightedMean:
    """Sample-weighted mean of deltas, folded in one update at a time (one model of memory)."""

    def __init__(self) -> None:
        self.acc: dict[str, torch.Tensor] = {}
        self.total = 0.0
        self.count = 0

    def add(self, update: Tensors, weight: float) -> None:
        if weight <= 0:
            raise ConfigError(f"update weight must be positive, got {weight}")
        for name in update:
            t = update[name]
            if name in self.acc:
                self.acc[name].add_(t.to(torch.float32), alpha=weight)
            else:
                self.acc[name] = t.to(torch.float32).mul(weight)
        self.total += weight
        self.count += 1

    def mean(self) -> dict[str, torch.Tensor]:
        """The mean, computed in place (the accumulator is consumed)."""
        if not self.count:
            raise ConfigError("no updates to aggregate")
        for t in self.acc.values():
            t.div_(self.total)
        acc, self.acc = self.acc, {}
        return acc


class MeanStrategy(Strategy):
    """Base for strategies that start from the sample-weighted mean of the updates (FedAvg and
    the server-optimizer family): updates are folded in one at a time, so memory is one model
    whatever the number of sites. Subclasses turn the mean into a step in `finish`."""

    def __init__(self) -> None:
        super().__init__()
        self._mean = WeightedMean()

    def begin(self, global_weights: Tensors, state: Tensors | None = None) -> None:
        super().begin(global_weights, state)
        self._mean = WeightedMean()

    def add(self, update: Tensors, num_samples: int) -> None:
        self._mean.add(update, num_samples)


class BufferedStrategy(Strategy):
    """Base for robust strategies, which need every update at once.

    Memory: the updates are kept as given (lazy files stay on disk), and `finish` works one
    tensor at a time, so resident memory is about N x the largest tensor plus one model.
    """

    streaming = False
    min_updates: ClassVar[int] = 1

    def __init__(self) -> None:
        super().__init__()
        self._updates: list[Tensors] = []

    def begin(self, global_weights: Tensors, state: Tensors | None = None) -> None:
        super().begin(global_weights, state)
        self._updates = []

    def add(self, update: Tensors, num_samples: int) -> None:
        self._updates.append(update)

    def _require(self, needed: int) -> None:
        if len(self._updates) < needed:
            raise ConfigError(f"strategy {self.name} with {self.params()} needs at least "
                              f"{needed} updates, got {len(self._updates)}")

    def _stacked(self, name: str) -> torch.Tensor:
        """Tensor `name` of every update, stacked on a new first axis, as float32."""
        return torch.stack([u[name].to(torch.float32) for u in self._updates])
