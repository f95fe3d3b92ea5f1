"""Whole local studies through the `deeprad simulate` command, as a user runs them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from deeprad.core.checkpoint import read_checkpoint
from deeprad.core.layout import StudyLayout
from deeprad.core.store.local import LocalStore


def simulate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["deeprad", "simulate", *args], capture_output=True, text=True,
                          check=False, timeout=900)


def test_small_study_writes_every_artifact(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = simulate("--sites", "3", "--rounds", "2", "--samples-per-site", "40",
                    "--local-epochs", "1", "--output", str(out),
                    "--report-json", str(tmp_path / "report.json"))
    assert proc.returncode == 0, proc.stderr
    assert "SYNTHETIC" in proc.stderr and "synthetic phantom data" in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["synthetic_data"] is True
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for row in report["rounds"]:
        assert set(row["sites"]) == {"hospital-1", "hospital-2", "hospital-3"}
        assert 0.0 <= row["global"]["auroc"] <= 1.0
        assert row["federated_evaluation"]["n"] > 0
    assert set(report["final"]) == {"federated", "centralized", "local_only", "baselines_private"}
    assert report["final"]["baselines_private"] is False
    assert set(report["final"]["local_only"]["sites"]) == {"hospital-1", "hospital-2",
                                                           "hospital-3"}
    assert len(report["curves"]["centralized"]) == 2
    matrix = report["cross_site"]
    assert matrix["columns"] == ["hospital-1", "hospital-2", "hospital-3", "pooled"]
    assert list(matrix["rows"]) == ["federated", "centralized", "local:hospital-1",
                                    "local:hospital-2", "local:hospital-3"]
    assert all(0.0 <= v <= 1.0 for row in matrix["rows"].values() for v in row.values()
               if v is not None)
    best = report["best_round"]
    pooled = {r["round"]: r["validation_pooled"]["auroc"] for r in report["rounds"]}
    assert best["round"] in pooled and pooled[best["round"]] == max(pooled.values())
    assert best["chosen_on"] == "pooled validation AUROC"
    assert report["wall_time_s"] > 0
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "final.safetensors").stat().st_size > 0
    _, manifest = read_checkpoint(LocalStore(out / "store"),
                                  StudyLayout("local", "simulated-study"), 2)
    assert sorted(c.site for c in manifest.contributors) == ["hospital-1", "hospital-2",
                                                             "hospital-3"]
    assert json.loads((out / "final.json").read_text())["payload_sha256"] == \
        manifest.payload_sha256


def test_default_demo_meets_its_promise(tmp_path: Path) -> None:
    """README's claim: 4 non-IID hospitals, 5 rounds; federated AUROC >= 0.97 x centralized and
    above the mean of the hospitals training alone."""
    proc = simulate("--output", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["config"]["sites"] == 4 and report["config"]["rounds"] == 5
    final = report["final"]
    fed, cen = final["federated"]["auroc"], final["centralized"]["auroc"]
    local_mean = final["local_only"]["mean"]["auroc"]
    print(f"federated {fed:.3f} centralized {cen:.3f} local-only mean {local_mean:.3f} "
          f"wall {report['wall_time_s']:.0f}s")
    assert fed >= 0.97 * cen
    assert fed > local_mean
    aurocs = [r["global"]["auroc"] for r in report["rounds"]]
    assert aurocs[-1] > aurocs[0]


@pytest.mark.parametrize("args,message", [
    (["--strategy", "fedbest"], "unknown strategy 'fedbest'"),
    (["--model", "unet9000"], "unknown model 'unet9000'"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--dataset", "/no/such/folder"], "not one of phantom, anatomy and not a folder"),
    (["--strategy-params", "[1]"], "expected a JSON object"),
])
def test_bad_options_fail_fast_with_a_clear_message(tmp_path: Path, args: list[str],
                                                    message: str) -> None:
    proc = simulate(*args, "--output", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert message in proc.stderr
