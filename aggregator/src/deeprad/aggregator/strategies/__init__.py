"""Aggregation strategies: one class per file, behind `Strategy`, each named after its entry in
the core's catalogue (deeprad.core.strategies), which holds its summary, parameters, valid
ranges and capabilities. Every module of this folder is imported below, so adding a strategy is
one class file here plus one catalogue entry.
"""

from __future__ import annotations

import importlib
import pkgutil

from deeprad.aggregator.strategies.base import Strategy, registered
from deeprad.aggregator.strategies.fedavg import FedAvg
from deeprad.aggregator.strategies.fedavgm import FedAvgM
from deeprad.aggregator.strategies.fedopt import FedAdagrad, FedAdam, FedYogi
from deeprad.aggregator.strategies.robust import FedMedian, Krum, TrimmedMean
from deeprad.core.protocol import StrategySpec
from deeprad.core.strategies import CATALOGUE, strategy_info

# The classes listed above are this package's public names; a new file registers its class
# just by being imported here.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

_missing = [name for name in CATALOGUE if name not in registered()]
if _missing:
    raise ImportError(f"catalogue strategies without a class in {__name__}: {_missing}")

# Name -> class, in catalogue order.
STRATEGIES: dict[str, type[Strategy]] = {name: registered()[name] for name in CATALOGUE}


def make_strategy(spec: StrategySpec) -> Strategy:
    """Build the strategy `spec` names with its parameters checked by the catalogue; unknown
    names, unknown parameters and values out of range get a one-line ConfigError."""
    info = strategy_info(spec.name)
    return STRATEGIES[info.name](**info.validate(spec.params))


__all__ = ["STRATEGIES", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedMedian", "FedYogi",
           "Krum", "Strategy", "TrimmedMean", "make_strategy"]
