"""A small 3D segmentation study through `deeprad simulate --task segmentation`, as a user runs
it: the anatomy benchmark (synthetic lesions on real MNI152 anatomy), two training hospitals and
one held out, both baselines, leave-one-site-out, the cross-site matrix."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from deeprad.core.checkpoint import read_checkpoint
from deeprad.core.layout import StudyLayout
from deeprad.core.store.local import LocalStore

pytestmark = pytest.mark.e2e

TRAINING = ["hospital-a", "hospital-b"]


def _dice(metrics: dict[str, object]) -> float:
    value = metrics["dice"]
    assert isinstance(value, float) and 0.0 <= value <= 1.0, metrics
    return value


def test_small_3d_study_reports_dice_held_out_and_leave_one_out(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        ["deeprad", "simulate", "--task", "segmentation", "--sites", "2", "--rounds", "2",
         "--image-size", "24", "--patch-size", "16", "--samples-per-site", "6",
         "--local-epochs", "1", "--leave-one-out", "--output", str(out)],
        capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SYNTHETIC tumours" in proc.stderr and "REAL anatomy" in proc.stderr
    assert "SYNTHETIC lesions on real MNI152 anatomy" in proc.stdout
    for printed in ("Held-out hospital hospital-x", "Leave-one-site-out", "sens@1FP",
                    "Dice: federated / centralized", "Cross-site evaluation: DICE"):
        assert printed in proc.stdout, proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert (report["task"], report["primary_metric"], report["synthetic_data"]) == \
        ("segmentation", "dice", True)
    assert report["config"]["model"]["name"] == "unet3d"
    assert report["config"]["model"]["kwargs"]["in_channels"] == 3  # T1, T2, FLAIR
    assert list(report["sites"]) == TRAINING
    assert list(report["held_out_hospitals"]) == ["hospital-x"]

    final = report["final"]
    for name in ("federated", "centralized"):
        _dice(final[name])
        assert "1" in final[name]["lesion_sensitivity"]
    assert set(final["local_only"]["sites"]) == set(TRAINING)
    _dice(final["local_only"]["mean"])
    held = final["held_out"]
    assert held["sites"] == ["hospital-x"]
    for name in ("federated", "centralized"):
        _dice(held[name])
    assert set(held["local_only"]["sites"]) == set(TRAINING)

    # the held-out hospital never trained: no update of it in any round
    store, layout = LocalStore(out / "store"), StudyLayout("local", "simulated-study")
    for round_no in (1, 2):
        _, manifest = read_checkpoint(store, layout, round_no)
        assert sorted(c.site for c in manifest.contributors) == TRAINING

    best = report["best_round"]
    pooled = {r["round"]: r["validation_pooled"]["dice"] for r in report["rounds"]}
    assert best["chosen_on"] == "pooled validation Dice"
    assert pooled[best["round"]] == max(pooled.values())

    matrix = report["cross_site"]
    assert matrix["metric"] == "dice"
    assert matrix["columns"] == [*TRAINING, "pooled"]
    assert list(matrix["rows"]) == ["federated", "centralized", "local:hospital-a",
                                    "local:hospital-b"]
    # the pooled column is one score over the pooled validation scans: for the final federated
    # model it is the last round's pooled validation Dice
    assert matrix["rows"]["federated"]["pooled"] == pytest.approx(pooled[2])

    loso = report["leave_one_out"]
    assert set(loso["sites"]) == set(TRAINING)
    for row in loso["sites"].values():
        assert row["rounds"] == 2
        _dice(row["without_site"])
        _dice(row["with_site"])
    _dice(loso["mean"])
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
