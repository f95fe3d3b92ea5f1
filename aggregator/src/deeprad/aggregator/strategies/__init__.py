"""Aggregation strategies, one class each behind `Strategy`; adding one touches one file and
the registry below."""

from __future__ import annotations

from deeprad.aggregator.strategies.base import Strategy
from deeprad.aggregator.strategies.fedavg import FedAvg
from deeprad.aggregator.strategies.fedavgm import FedAvgM
from deeprad.aggregator.strategies.fedopt import FedAdagrad, FedAdam, FedYogi
from deeprad.aggregator.strategies.robust import FedMedian, Krum, TrimmedMean
from deeprad.core.errors import ConfigError
from deeprad.core.protocol import StrategySpec

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedMedian, TrimmedMean, Krum)
}


def make_strategy(spec: StrategySpec) -> Strategy:
    """Instantiate a strategy by name; unknown names and parameters get a clear error."""
    cls = STRATEGIES.get(spec.name)
    if cls is None:
        raise ConfigError(f"unknown strategy {spec.name!r}: use one of {', '.join(STRATEGIES)}")
    try:
        return cls(**spec.params)
    except TypeError as exc:
        raise ConfigError(f"strategy {spec.name!r}: bad parameters {spec.params}: {exc}") from exc


__all__ = ["STRATEGIES", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedMedian", "FedYogi",
           "Krum", "Strategy", "TrimmedMean", "make_strategy"]
