"""Small local studies with security and privacy on, as a user runs them: the store never holds
a plaintext update, keys never reach the output, secure aggregation finishes a round, and a
study with a privacy budget stops before exceeding it."""

from __future__ import annotations

import json
import math
import stat
import subprocess
from pathlib import Path

import pytest
from safetensors import safe_open

from deeprad.core.checkpoint import read_checkpoint
from deeprad.core.data import load_dataset
from deeprad.core.layout import StudyLayout
from deeprad.core.privacy import DPSteps, epsilon_of
from deeprad.core.store.local import LocalStore
from deeprad.simulate.config import DP_RECIPE, SimulationConfig
from deeprad.simulate.sites import make_sites

SMALL = ["--sites", "3", "--rounds", "2", "--samples-per-site", "40", "--local-epochs", "1",
         "--no-baselines"]


def simulate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["deeprad", "simulate", *args], capture_output=True, text=True,
                          check=False, timeout=900)


def _is_safetensors(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            list(f.keys())
    except Exception:
        return False
    return True


def _check_store_and_keys(out: Path, proc: subprocess.CompletedProcess[str]) -> None:
    updates = sorted((out / "store").rglob("updates/*.bin"))
    assert len(updates) == 3 * 2
    for path in updates:
        assert path.read_bytes()[:5] == b"DRENV", path
        assert not _is_safetensors(path), f"{path} is a plaintext update"
    for path in (out / "store").rglob("*"):
        if path.is_file() and _is_safetensors(path):
            assert path.name in ("global.safetensors", "strategy-state.safetensors"), path
    text = proc.stdout + proc.stderr + (out / "report.json").read_text()
    for secret in sorted((out / "keys").rglob("*.key")):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert secret.read_text().strip() not in text
    manifest = json.loads((out / "final.json").read_text())
    assert manifest["signature"] and manifest["nonce"]


def test_plain_study_stores_only_sealed_signed_updates(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = simulate(*SMALL, "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    _check_store_and_keys(out, proc)


def test_secure_aggregation_with_dp_runs_a_study(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = simulate(*SMALL, "--secure-aggregation", "--dp-epsilon", "8", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    _check_store_and_keys(out, proc)
    report = json.loads((out / "report.json").read_text())
    assert report["secure_aggregation"] is True and report["stopped"] is None
    for row in report["rounds"]:
        sa = row["secure_aggregation"]
        assert sa["survivors"] == ["hospital-1", "hospital-2", "hospital-3"]
        assert 0 < sa["quantization_bound"] < 1e-6
        assert row["rejected"] == []
    assert report["epsilon_spent"] <= 8.0
    assert report["rounds"][-1]["epsilon_spent"] == pytest.approx(8.0, rel=1e-3)
    # the masked upload is no larger than the float32 update (one extra value: the weight)
    sealed = sorted((out / "store").rglob("rounds/1/updates/*.bin"))[0].stat().st_size
    params = sum(math.prod(s) for s in _shapes(out / "final.safetensors"))
    assert sealed <= 4 * (params + 1) + 200


TINY = ["--sites", "3", "--rounds", "2", "--samples-per-site", "16", "--image-size", "32",
        "--local-epochs", "1", "--no-baselines"]


@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_server_optimizers_run_under_secure_aggregation(tmp_path: Path, strategy: str) -> None:
    """`deeprad simulate --strategy fedadam --secure-aggregation` (and the other server
    optimizers) completes: the hub sees only the masked sum, and the optimizer's state built
    from the mean travels from round to round."""
    out = tmp_path / "run"
    proc = simulate(*TINY, "--strategy", strategy, "--secure-aggregation", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    _check_store_and_keys(out, proc)
    report = json.loads((out / "report.json").read_text())
    assert report["stopped"] is None and [r["round"] for r in report["rounds"]] == [1, 2]
    for row in report["rounds"]:
        sa = row["secure_aggregation"]
        assert sa["survivors"] == ["hospital-1", "hospital-2", "hospital-3"]
        assert sa["threshold"] == 2  # semi-honest by default: one of three may drop out
        assert row["rejected"] == []
    _, manifest = read_checkpoint(LocalStore(out / "store"),
                                  StudyLayout("local", "simulated-study"), 2)
    assert manifest.strategy is not None and manifest.strategy.name == strategy
    assert manifest.secagg is not None and manifest.secagg.survivors == sa["survivors"]
    for n in (1, 2):
        assert (out / "store" / "local" / "simulated-study" / "rounds" / str(n) /
                "strategy-state.safetensors").stat().st_size > 0


def _shapes(path: Path) -> list[list[int]]:
    with safe_open(str(path), framework="pt") as f:
        return [f.get_slice(k).get_shape() for k in f.keys()]  # noqa: SIM118 (not a dict)


def test_study_stops_before_exceeding_its_privacy_budget(tmp_path: Path) -> None:
    cfg = SimulationConfig(sites=2, samples_per_site=40)
    sizes = [len(load_dataset(s.dataset)[0]) for s in make_sites(cfg)]
    z, batch = 1.0, DP_RECIPE.batch_size  # a budget brings the DP recipe's batch size

    def eps(rounds: int) -> float:  # the study's ε: the largest site's
        return max(epsilon_of([DPSteps(noise_multiplier=z, sample_rate=1 / math.ceil(n / batch),
                                       steps=rounds * math.ceil(n / batch))], 1e-5)
                   for n in sizes)

    budget = (eps(1) + eps(2)) / 2  # room for one round, not two
    out = tmp_path / "run"
    proc = simulate("--sites", "2", "--rounds", "3", "--samples-per-site", "40",
                    "--local-epochs", "1", "--no-baselines", "--dp-epsilon", f"{budget}",
                    "--dp-noise-multiplier", f"{z}", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1]
    assert report["final_round"] == 1
    assert "privacy budget: before round 2" in report["stopped"]
    assert report["epsilon_spent"] == pytest.approx(eps(1), rel=1e-6)
    assert report["epsilon_spent"] <= budget
    assert "Study stopped early" in proc.stdout
    assert not (out / "store" / "local" / "simulated-study" / "rounds" / "2").exists()
