"""The best round is chosen on validation data alone; the test set only rides along."""

from __future__ import annotations

import pytest

from deeprad.simulate.cross_site import best_round

pytestmark = pytest.mark.unit


def _row(round_no: int, validation: float | None, test: float) -> dict[str, object]:
    return {"round": round_no, "validation_pooled": {"auroc": validation},
            "global": {"auroc": test}}


def test_the_best_round_is_chosen_on_validation_never_on_test() -> None:
    rounds = [_row(1, 0.70, 0.99), _row(2, 0.80, 0.60), _row(3, 0.75, 0.95)]
    best = best_round(rounds)
    assert best is not None
    assert best["round"] == 2  # the test set's favourite (round 1) is not chosen
    assert best["test"] == {"auroc": 0.60}


def test_a_tie_goes_to_the_earlier_round_and_unscored_rounds_are_skipped() -> None:
    best = best_round([_row(1, None, 0.9), _row(2, 0.8, 0.7), _row(3, 0.8, 0.9)])
    assert best is not None and best["round"] == 2
    assert best_round([_row(1, None, 0.9)]) is None
    assert best_round([]) is None


def test_a_segmentation_study_picks_its_round_on_validation_dice() -> None:
    rounds = [{"round": 1, "validation_pooled": {"dice": 0.61, "auroc": 0.99},
               "global": {"dice": 0.90}},
              {"round": 2, "validation_pooled": {"dice": 0.66, "auroc": 0.70},
               "global": {"dice": 0.40}}]
    best = best_round(rounds, "dice")
    assert best is not None
    assert (best["round"], best["chosen_on"], best["test"]) == (2, "pooled validation Dice",
                                                                {"dice": 0.40})
