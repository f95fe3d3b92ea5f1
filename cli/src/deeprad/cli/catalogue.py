"""`deeprad models` and `deeprad strategies`: what a study can name."""

from __future__ import annotations

import argparse


def _models(args: argparse.Namespace) -> int:
    from deeprad.core.models import REGISTRY

    for name, entry in REGISTRY.items():
        print(f"{name:<14} {entry.summary}")
    print("or bring your own: --model package.module:factory")
    return 0


def _strategies(args: argparse.Namespace) -> int:
    from deeprad.aggregator.strategies import STRATEGIES

    for name, cls in STRATEGIES.items():
        print(f"{name:<12} {cls.summary}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `models` and `strategies` to the `deeprad` command."""
    sub.add_parser("models", help="list registered networks").set_defaults(func=_models)
    sub.add_parser("strategies", help="list aggregation strategies").set_defaults(func=_strategies)
