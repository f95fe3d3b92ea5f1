"""`deeprad simulate` picks its model and training defaults from the demo's recipe, or from the
DP recipe when a privacy budget is given; flags on the command line always win."""

from __future__ import annotations

from dataclasses import asdict

from deeprad.cli import apply_recipe, build_parser
from deeprad.simulate.config import DEFAULT_RECIPE, DP_RECIPE


def _resolved(*argv: str) -> dict[str, object]:
    args = build_parser().parse_args(["simulate", *argv])
    apply_recipe(args)
    return {name: getattr(args, name) for name in asdict(DEFAULT_RECIPE)}


def test_without_a_budget_the_demo_recipe_applies() -> None:
    assert _resolved() == asdict(DEFAULT_RECIPE)
    assert DEFAULT_RECIPE.model == "tumor-cnn" and DEFAULT_RECIPE.optimizer == "adam"


def test_a_budget_switches_to_the_dp_recipe() -> None:
    assert _resolved("--dp-epsilon", "8") == asdict(DP_RECIPE)
    assert DP_RECIPE.model == "tumor-jet" and DP_RECIPE.optimizer == "sgd"


def test_flags_given_win_over_either_recipe() -> None:
    got = _resolved("--dp-epsilon", "8", "--model", "tumor-cnn", "--lr", "0.01")
    assert got["model"] == "tumor-cnn" and got["lr"] == 0.01
    assert got["optimizer"] == DP_RECIPE.optimizer and got["batch_size"] == DP_RECIPE.batch_size
    assert _resolved("--batch-size", "8")["batch_size"] == 8
