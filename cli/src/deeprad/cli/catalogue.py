"""`deeprad models` and `deeprad strategies`: what a study can name."""

from __future__ import annotations

import argparse
import json
from typing import Any


def _models(args: argparse.Namespace) -> int:
    from deeprad.core.model_catalogue import MODELS, model_digest

    if args.digest:
        return _digest(args.digest, args.kwargs, MODELS, model_digest)
    for name, summary in MODELS.items():
        print(f"{name:<14} {summary}")
    print("deeprad simulate also runs your own: --model package.module:factory (on your "
          "machine only: studies name the networks above)")
    return 0


def _digest(name: str, kwargs_json: str, models: dict[str, str], digest: Any) -> int:
    """Print the digest a site policy's `models` list uses to allow exactly this network with
    exactly these arguments (the same `spec.model` a study names)."""
    from deeprad.core.errors import ConfigError

    if name not in models:
        raise ConfigError(f"--digest {name!r}: not a catalogue network; one of "
                          f"{', '.join(models)}")
    try:
        kwargs = json.loads(kwargs_json)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--kwargs: not JSON ({exc.msg}); e.g. --kwargs '{{\"width\": 32}}'"
                          ) from None
    if not isinstance(kwargs, dict):
        raise ConfigError("--kwargs: a JSON object of the model's arguments, e.g. "
                          "'{\"width\": 32}'")
    print(digest(name, kwargs))
    return 0


def _strategies(args: argparse.Namespace) -> int:
    # The core's catalogue, not the aggregator's classes: no torch, so this prints at once.
    from deeprad.core.strategies import CATALOGUE, number_text

    for i, info in enumerate(CATALOGUE.values()):
        memory = ("streaming (memory independent of the number of sites)" if info.streaming
                  else "holds every update (memory grows with the number of sites)")
        secure = ("runs on a secure sum" if info.runs_on_secure_sum else
                  "needs updates in the clear" if info.needs_clear_updates else
                  "no secure sum")
        print(("\n" if i else "") + f"{info.name:<12} {info.summary}")
        print(f"{'':<12} {memory}; {secure}")
        for p in info.params:
            print(f"{'':<12} {p.name:<10} {number_text(p.default):<6} {p.valid_range:<16} "
                  f"{p.help}")
    print("\nParameters: name, default, valid values. Set them with --strategy-params "
          "(deeprad simulate)\nor spec.strategy.params (FederatedRound, a FederatedStudy's "
          "roundTemplate). Secure aggregation\n(on by default in the cluster) needs a "
          "strategy that runs on a secure sum.")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `models` and `strategies` to the `deeprad` command."""
    models = sub.add_parser(
        "models", help="list registered networks, or print one's digest for a site policy",
        description="Lists the catalogue networks a study may name. With --digest NAME "
                    "[--kwargs JSON] prints sha256:<hex> of that network with exactly those "
                    "arguments: the entry a hospital's site policy (policy.models) uses to "
                    "allow it and nothing else.")
    models.add_argument("--digest", metavar="NAME", help="a catalogue network's name")
    models.add_argument("--kwargs", default="{}", metavar="JSON",
                        help="its arguments as in the study's spec.model.kwargs (default {})")
    models.set_defaults(func=_models)
    sub.add_parser("strategies", help="list aggregation strategies").set_defaults(func=_strategies)
