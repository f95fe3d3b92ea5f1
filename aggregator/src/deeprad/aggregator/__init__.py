"""The aggregator: strategies that combine site updates, and the hub Job that runs them.

Notebook use, with updates in memory::

    from deeprad.aggregator import aggregate
    new_weights, state = aggregate("fedavg", global_weights, [(delta_a, 120), (delta_b, 80)])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from deeprad.aggregator.strategies import STRATEGIES, Strategy, make_strategy
from deeprad.core.protocol import StrategySpec

Tensors = Mapping[str, torch.Tensor]


def aggregate(
    strategy: str | Strategy,
    global_weights: Tensors,
    updates: Iterable[tuple[Tensors, int]],
    state: Tensors | None = None,
    **params: Any,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run one round of `strategy` (a name from STRATEGIES or an instance) over in-memory
    updates given as (delta, num_samples); returns (new global weights, strategy state)."""
    strat = make_strategy(StrategySpec(name=strategy, params=params)) if isinstance(
        strategy, str) else strategy
    strat.begin(global_weights, state)
    for delta, n in updates:
        strat.add(delta, n)
    return strat.finish()


__all__ = ["STRATEGIES", "Strategy", "aggregate", "make_strategy"]
