"""The issue's utility promises on the default demo (4 hospitals, 5 rounds): DP-SGD at ε = 8
(δ = 1e-5) keeps federated AUROC >= 0.95 x the non-private run, and secure aggregation changes
the final AUROC by less than 0.005."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

# With a budget, `deeprad simulate` trains with its DP recipe (tumor-jet, SGD, Poisson batches
# of 64; see README, "Security and privacy"); the non-private run is the default demo.
DP_ARGS = ["--dp-epsilon", "8", "--dp-delta", "1e-5"]


def run_demo(out: Path, *args: str) -> dict[str, Any]:
    proc = subprocess.run(["deeprad", "simulate", "--no-baselines", "--output", str(out), *args],
                          capture_output=True, text=True, check=False, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    assert report["config"]["sites"] == 4 and report["config"]["rounds"] == 5
    return report


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_demo(tmp_path_factory.mktemp("plain") / "demo")


def test_dp_at_epsilon_8_keeps_95_percent_of_the_auroc(plain: dict[str, Any],
                                                       tmp_path: Path) -> None:
    dp = run_demo(tmp_path / "dp", *DP_ARGS)
    fed, ref = dp["final"]["federated"]["auroc"], plain["final"]["federated"]["auroc"]
    print(f"DP ε={dp['epsilon_spent']:.3f}: AUROC {fed:.3f}; non-private {ref:.3f}; "
          f"ratio {fed / ref:.3f}")
    assert dp["config"]["model"]["name"] == "tumor-jet"  # the DP recipe
    assert dp["config"]["train"]["optimizer"] == "sgd"
    assert plain["config"]["model"]["name"] == "tumor-cnn" and plain["privacy"] is None
    assert dp["stopped"] is None and len(dp["rounds"]) == 5
    assert dp["epsilon_spent"] <= 8.0
    assert dp["epsilon_spent"] == pytest.approx(8.0, rel=1e-3)
    assert fed >= 0.95 * ref


def test_secure_aggregation_changes_the_auroc_by_less_than_0_005(plain: dict[str, Any],
                                                                 tmp_path: Path) -> None:
    sa = run_demo(tmp_path / "sa", "--secure-aggregation")
    fed, ref = sa["final"]["federated"]["auroc"], plain["final"]["federated"]["auroc"]
    print(f"secure aggregation AUROC {fed:.4f}; plain {ref:.4f}")
    assert all(r["secure_aggregation"]["dropped"] == [] for r in sa["rounds"])
    assert abs(fed - ref) < 0.005
