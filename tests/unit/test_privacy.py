"""DP accounting matches dp-accounting exactly; budgets stop studies; DP-SGD runs via Opacus."""

from __future__ import annotations

import argparse
import json

import dp_accounting
import pytest
import torch
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deeprad.cli import privacy as privacy_cli
from deeprad.core.errors import ConfigError
from deeprad.core.models import build_model
from deeprad.core.privacy import (
    DPConfig,
    DPSteps,
    PrivacyBudget,
    PrivacyBudgetExceeded,
    epsilon,
    epsilon_of,
    noise_for_target_epsilon,
    plan_round,
    round_steps,
)
from deeprad.core.protocol import ModelSpec
from deeprad.trainer.dp_sgd import make_private


def _direct(accountant: object, z: float, q: float, steps: int, delta: float) -> float:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    return float(accountant.compose(event).get_epsilon(delta))  # type: ignore[attr-defined]


@pytest.mark.parametrize(("z", "q", "steps"), [(1.1, 0.01, 1000), (0.8, 0.05, 300),
                                               (2.0, 0.004, 5000)])
def test_epsilon_is_exactly_what_dp_accounting_computes(z: float, q: float, steps: int) -> None:
    assert epsilon(z, q, steps, 1e-5) == _direct(rdp_privacy_accountant.RdpAccountant(),
                                                 z, q, steps, 1e-5)
    if steps == 1000:  # PLD is slower: one configuration is enough
        assert epsilon(z, q, steps, 1e-5, "pld") == _direct(
            pld_privacy_accountant.PLDAccountant(), z, q, steps, 1e-5)


def test_epsilon_edge_cases_and_errors() -> None:
    assert epsilon(1.0, 0.01, 0, 1e-5) == 0.0
    assert epsilon(0.0, 0.01, 10, 1e-5) == float("inf")
    assert epsilon(1.0, 0.01, 200, 1e-5) < epsilon(1.0, 0.01, 400, 1e-5)
    with pytest.raises(ConfigError, match="delta"):
        epsilon(1.0, 0.01, 10, 0.0)
    with pytest.raises(ConfigError, match="sample_rate"):
        epsilon(1.0, 1.5, 10, 1e-5)
    with pytest.raises(ConfigError, match="accountant"):
        epsilon(1.0, 0.01, 10, 1e-5, "moments")


def test_rounds_compose_like_their_steps() -> None:
    run = DPSteps(noise_multiplier=1.2, sample_rate=0.02, steps=150)
    assert epsilon_of([run] * 4, 1e-5) == pytest.approx(epsilon(1.2, 0.02, 600, 1e-5), rel=1e-9)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_target_epsilon_gives_the_smallest_sufficient_noise(accountant: str) -> None:
    q, steps, delta, target = 0.02, 200, 1e-5, 2.0
    tol = 1e-3 if accountant == "rdp" else 3e-2
    z = noise_for_target_epsilon(target, q, steps, delta, accountant, tolerance=tol)
    assert epsilon(z, q, steps, delta, accountant) <= target
    assert epsilon(z - 2 * tol, q, steps, delta, accountant) > target


def test_budget_is_checked_before_each_round_and_the_study_stops() -> None:
    budget = PrivacyBudget(epsilon=6.0, delta=1e-5)
    per_round = {"a": DPSteps(noise_multiplier=1.0, sample_rate=0.05, steps=100),
                 "b": DPSteps(noise_multiplier=1.0, sample_rate=0.02, steps=100)}
    history: dict[str, list[DPSteps]] = {"a": [], "b": []}
    rounds = 0
    with pytest.raises(PrivacyBudgetExceeded) as err:
        while True:
            plan = plan_round(budget, history, per_round)
            assert plan.spent_after <= budget.epsilon
            assert plan.spent_after == max(plan.per_site_after.values())
            for s, run in per_round.items():
                history[s].append(run)
            rounds += 1
    assert rounds >= 2
    assert "site(s) a" in str(err.value) and "budget ε=6" in str(err.value)
    spent = epsilon_of(history["a"], budget.delta)
    assert spent <= budget.epsilon < epsilon_of([*history["a"], per_round["a"]], budget.delta)


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="deeprad")
    privacy_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_cli_prints_exactly_what_the_accountant_computes(
        accountant: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["privacy", "epsilon", "--noise-multiplier", "1.1", "--sample-rate", "0.01",
            "--steps", "1000", "--delta", "1e-5", "--accountant", accountant]
    assert _run_cli([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    direct = _direct(rdp_privacy_accountant.RdpAccountant() if accountant == "rdp"
                     else pld_privacy_accountant.PLDAccountant(), 1.1, 0.01, 1000, 1e-5)
    assert out["epsilon"] == direct and out["accountant"] == accountant
    assert _run_cli(argv) == 0
    assert f"epsilon = {direct!r}" in capsys.readouterr().out


def test_cli_target_epsilon(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_cli(["privacy", "epsilon", "--target-epsilon", "3", "--sample-rate", "0.01",
                     "--steps", "1000", "--delta", "1e-5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epsilon"] <= 3 and out["epsilon"] == epsilon(out["noise_multiplier"], 0.01,
                                                             1000, 1e-5)
    with pytest.raises(ConfigError, match="exactly one"):
        _run_cli(["privacy", "epsilon", "--sample-rate", "0.01", "--steps", "10",
                  "--delta", "1e-5"])


@pytest.mark.parametrize("clipping", ["flat", "adaptive"])
def test_dp_sgd_with_opacus_counts_its_steps(clipping: str) -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(48, 1, 16, 16), torch.randint(0, 2, (48,)).float())
    model = build_model(ModelSpec(name="tumor-cnn", kwargs={"channels": [4, 8]}))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    private = make_private(model, opt, DataLoader(data, batch_size=12),
                           DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, clipping=clipping))
    assert private.sample_rate == pytest.approx(12 / 48)
    for x, y in private.data_loader:
        private.optimizer.zero_grad()
        if len(x):
            loss = nn.functional.binary_cross_entropy_with_logits(
                private.model(x).flatten(), y)
            loss.backward()
        private.optimizer.step()
    assert private.steps == 4
    assert private.spent() == DPSteps(noise_multiplier=1.0, sample_rate=0.25, steps=4)
    assert private.epsilon(1e-5) == epsilon(1.0, 0.25, 4, 1e-5)
    after = list(private.model._module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


@pytest.mark.parametrize(("records", "batch_size"), [(48, 12), (50, 12), (5, 16), (999, 7)])
def test_round_steps_are_the_steps_opacus_takes(records: int, batch_size: int) -> None:
    """The accountant's rule (operator and simulator both plan with it) against the loader
    Opacus builds: same sampling rate, same batches per epoch."""
    data = TensorDataset(torch.zeros(records, 2), torch.zeros(records))
    model = nn.Linear(2, 1)
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                           DataLoader(data, batch_size=batch_size),
                           DPConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    batches_per_epoch = sum(1 for _ in private.data_loader)
    assert round_steps(records, batch_size=batch_size, local_epochs=3,
                       noise_multiplier=1.0) == DPSteps(
        noise_multiplier=1.0, sample_rate=private.sample_rate, steps=3 * batches_per_epoch)


def test_batchnorm_models_are_refused_for_dp_sgd() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(1))
    data = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.zeros(8)), batch_size=4)
    with pytest.raises(ConfigError, match=r"BatchNorm|GroupNorm"):
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), data,
                     DPConfig(noise_multiplier=1.0, max_grad_norm=1.0))


def test_rdp_epsilon_loads_no_pld_code_and_the_full_package_still_works() -> None:
    """`deeprad privacy epsilon` (RDP) imports dp-accounting's RDP modules only (not its PLD
    and calibration code, nor scipy.signal/stats with them); a later `import dp_accounting`
    gets the real package, with the same modules, and the same ε."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from deeprad.core.privacy import epsilon\n"
        "light = epsilon(1.1, 0.01, 1000, 1e-5)\n"
        "heavy = [m for m in ('scipy.signal', 'scipy.stats', 'dp_accounting.pld') "
        "if m in sys.modules]\n"
        "import dp_accounting\n"
        "from dp_accounting.rdp import rdp_privacy_accountant as rdp\n"
        "acc = rdp.RdpAccountant()\n"
        "acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(\n"
        "    0.01, dp_accounting.GaussianDpEvent(1.1)), 1000))\n"
        "print(heavy, light == acc.get_epsilon(1e-5), hasattr(dp_accounting, 'pld'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[] True True", out
