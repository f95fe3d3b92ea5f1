"""The one interface every aggregation strategy implements.

The aggregator calls `begin` with the global model of the previous round (and the strategy's
saved state), `add` once per accepted update, then `finish`. Updates are deltas: trained weights
minus the global weights they started from. Tensors may be read lazily, one at a time.

What a strategy is called, takes and can do lives in its entry of the core's catalogue
(deeprad.core.strategies); each concrete class names its entry and is checked against it when
the class is defined: the same keyword-only parameters with the same defaults, and the same
memory behaviour.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from deeprad.core.errors import ConfigError
from deeprad.core.strategies import CATALOGUE, StrategyInfo

Tensors = Mapping[str, torch.Tensor]

# Concrete strategy classes by catalogue name, filled as their modules are imported.
_REGISTERED: dict[str, type[Strategy]] = {}


def registered() -> dict[str, type[Strategy]]:
    """Every concrete strategy class defined so far, by catalogue name."""
    return dict(_REGISTERED)


class Strategy(abc.ABC):
    """Combine site updates into the next global model."""

    # Set by a concrete class: the name of its catalogue entry.
    name: ClassVar[str]
    # Its catalogue entry (summary, parameters, capabilities), filled in from `name`.
    info: ClassVar[StrategyInfo]
    # How the class combines updates: True folds each into running sums as it comes, so the
    # update is not needed after `add`; False keeps them all until `finish`.
    streaming: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in vars(cls):
            return  # a shared base, not a strategy of its own
        info = CATALOGUE.get(cls.name)
        if info is None:
            raise TypeError(f"{cls.__name__}: strategy {cls.name!r} has no entry in "
                            "deeprad.core.strategies.CATALOGUE; add one")
        taken = [(p.name, p.default, p.kind) for p in inspect.signature(cls).parameters.values()]
        listed = [(p.name, p.default, inspect.Parameter.KEYWORD_ONLY) for p in info.params]
        if taken != listed:
            raise TypeError(f"{cls.__name__}: parameters {taken} differ from the catalogue "
                            f"entry's {listed} (keyword-only, same names, order and defaults)")
        if cls.streaming != info.streaming:
            raise TypeError(f"{cls.__name__}: streaming is {cls.streaming}, the catalogue "
                            f"entry says {info.streaming}")
        if info.runs_on_secure_sum and not issubclass(cls, MeanStrategy):
            # Under secure aggregation the aggregator hands it the survivors' mean as its one
            # update: only a strategy built on that mean gives the same result.
            raise TypeError(f"{cls.__name__}: the catalogue says strategy {cls.name!r} runs on "
                            "a secure sum, which only a MeanStrategy does")
        if cls.name in _REGISTERED:
            raise TypeError(f"{cls.__name__}: strategy {cls.name!r} is already "
                            f"{_REGISTERED[cls.name].__name__}")
        cls.info = info
        _REGISTERED[cls.name] = cls

    def __init__(self) -> None:
        self._global: Tensors = {}
        self._state: dict[str, torch.Tensor] = {}

    def params(self) -> dict[str, float]:
        """Hyper-parameters, as recorded in the checkpoint manifest."""
        return {p.name: getattr(self, p.name) for p in self.info.params}

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
