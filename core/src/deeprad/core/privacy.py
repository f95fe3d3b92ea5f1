"""Differential privacy accounting for record-level DP-SGD at each site: ε with Google's
dp-accounting (RDP or PLD), the study budget check, noise calibration. The Opacus wiring that
runs DP-SGD is the trainer's (`deeprad.trainer.dp_sgd`): this module never needs torch.

Accounting. One site's local training is a sequence of DP-SGD steps, each a Poisson-subsampled
Gaussian mechanism (sampling rate q = expected batch / records, noise multiplier z). Its privacy
loss is that event composed over all its steps, in all rounds so far: a study's rounds compose
as their steps do. Every record lives at exactly one site, so the study's ε is the largest of
the sites' ε (parallel composition), and a round starts only when no site would pass the
budget (ε, δ) after it.

Adaptive clipping (Andrew et al. 2021) is available through Opacus' AdaClipDPOptimizer
(`clipping="adaptive"`): the clipping bound follows a target quantile of the per-sample gradient
norms, estimated with noise σ_b. Opacus then draws the gradient noise with the adjusted
multiplier (z^-2 - (2σ_b)^-2)^(-1/2) so that the pair of mechanisms together costs what a
Gaussian mechanism with multiplier z costs: the accounting here stays exact with z.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from deeprad.core.errors import ConfigError, DeepRadError

if TYPE_CHECKING:  # dp-accounting takes a second to import; the operator rarely needs it
    import dp_accounting

AccountantName = Literal["rdp", "pld"]
ACCOUNTANTS: tuple[AccountantName, ...] = ("rdp", "pld")


class PrivacyBudgetExceeded(DeepRadError):
    """The next round would spend more ε than the study's budget allows."""


# ---- accounting -------------------------------------------------------------------------------


def _rdp_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """dp-accounting's `dp_event` and `rdp.rdp_privacy_accountant` modules.

    `import dp_accounting` runs the package's __init__, which also loads its PLD and calibration
    code and with them scipy's signal, stats and optimize: 0.7-1.2 s on a 2-core machine, most
    of `deeprad privacy epsilon`'s time. The RDP path needs none of it, so while the package is
    not loaded its two modules are imported under a bare parent that is dropped right after: a
    later `import dp_accounting` runs the real __init__, which reuses these same modules."""
    if "dp_accounting" not in sys.modules:
        spec = importlib.util.find_spec("dp_accounting")
        if spec is not None and spec.submodule_search_locations is not None:
            parent = types.ModuleType("dp_accounting")
            parent.__path__ = list(spec.submodule_search_locations)
            parent.__spec__ = spec
            sys.modules["dp_accounting"] = parent
            try:
                from dp_accounting import dp_event
                from dp_accounting.rdp import rdp_privacy_accountant
            finally:
                if sys.modules.get("dp_accounting") is parent:
                    del sys.modules["dp_accounting"]
            return dp_event, rdp_privacy_accountant
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    return dp_event, rdp_privacy_accountant


class DPSteps(BaseModel):
    """A run of DP-SGD steps with one configuration (one site's training in one round)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    noise_multiplier: float = Field(ge=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=0)

    def event(self) -> dp_accounting.DpEvent:
        """The dp-accounting event: Poisson-sampled Gaussian, self-composed `steps` times."""
        dp_event, _ = _rdp_modules()
        composed: dp_accounting.DpEvent = dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(
                sampling_probability=self.sample_rate,
                event=dp_event.GaussianDpEvent(noise_multiplier=self.noise_multiplier)),
            self.steps)
        return composed


def round_steps(records: int, *, batch_size: int, local_epochs: int,
                noise_multiplier: float) -> DPSteps:
    """The DP-SGD steps one round of local training costs a site with `records` training
    records: Opacus takes len(loader) = ceil(records / batch_size) batches per epoch, each at
    sample rate 1/len(loader), for `local_epochs` epochs."""
    batches = max(1, math.ceil(records / batch_size))
    return DPSteps(noise_multiplier=noise_multiplier, sample_rate=1.0 / batches,
                   steps=local_epochs * batches)


def make_accountant(accountant: str) -> dp_accounting.PrivacyAccountant:
    """A fresh dp-accounting accountant: RDP (default orders) or PLD (default discretization)."""
    if accountant == "rdp":
        rdp: dp_accounting.PrivacyAccountant = _rdp_modules()[1].RdpAccountant()
        return rdp
    if accountant == "pld":
        from dp_accounting.pld import pld_privacy_accountant

        return pld_privacy_accountant.PLDAccountant()
    raise ConfigError(f"privacy accountant must be one of {', '.join(ACCOUNTANTS)}, "
                      f"got {accountant!r}")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ConfigError(f"privacy delta must be in (0, 1), got {delta}; a usual choice is "
                          "below 1/(number of records)")


def merge_runs(runs: Sequence[DPSteps]) -> list[DPSteps]:
    """The same composition in as few runs as possible: runs with the same noise multiplier and
    sample rate are one mechanism composed with itself, so their steps add up exactly. A study
    whose rounds share one plan is one event per site, however many rounds it ran."""
    merged: dict[tuple[float, float], int] = {}
    for run in runs:
        if run.steps > 0:
            key = (run.noise_multiplier, run.sample_rate)
            merged[key] = merged.get(key, 0) + run.steps
    return [DPSteps(noise_multiplier=z, sample_rate=q, steps=t)
            for (z, q), t in sorted(merged.items())]


def epsilon_of(runs: Sequence[DPSteps], delta: float, accountant: str = "rdp") -> float:
    """ε at `delta` of the composition of `runs` (0 when no step was taken, inf with no
    noise)."""
    _check_delta(delta)
    acc = make_accountant(accountant)
    runs = merge_runs(runs)
    if not runs:
        return 0.0
    if any(r.noise_multiplier == 0 for r in runs):
        return math.inf
    for r in runs:
        acc.compose(r.event())
    return float(acc.get_epsilon(delta))


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
    """ε at `delta` of `steps` DP-SGD steps with Poisson sampling rate `sample_rate` and Gaussian
    noise multiplier `noise_multiplier`."""
    try:
        run = DPSteps(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    except ValueError as exc:
        raise ConfigError(f"privacy parameters are invalid: {_first_error(exc)}") from None
    return epsilon_of([run], delta, accountant)


def noise_for_target_epsilon(target_epsilon: float, sample_rate: float, steps: int,
                             delta: float, accountant: str = "rdp",
                             tolerance: float = 1e-4) -> float:
    """The smallest noise multiplier (within `tolerance`) whose ε after `steps` steps at
    `sample_rate` is at most `target_epsilon`, by dp-accounting's calibration."""
    if not target_epsilon > 0:
        raise ConfigError(f"target epsilon must be > 0, got {target_epsilon}")
    if not 0 < sample_rate <= 1 or steps < 1:
        raise ConfigError(f"sample rate must be in (0, 1] and steps >= 1, got {sample_rate}, "
                          f"{steps}")
    _check_delta(delta)
    make_accountant(accountant)
    from dp_accounting import mechanism_calibration

    def event(z: float) -> dp_accounting.DpEvent:
        return DPSteps(noise_multiplier=z, sample_rate=sample_rate, steps=steps).event()

    bracket: mechanism_calibration.BracketInterval = \
        mechanism_calibration.LowerEndpointAndGuess(1e-3, 1.0)
    if accountant == "pld":
        # PLD's discretisation explodes for tiny multipliers: bracket it with the RDP answer,
        # which is never below PLD's (RDP bounds are looser).
        upper = noise_for_target_epsilon(target_epsilon, sample_rate, steps, delta, "rdp",
                                         tolerance)
        lower = 0.8 * upper  # PLD usually needs 5-10 % less noise than RDP claims
        while lower > 0.05 and epsilon(lower, sample_rate, steps, delta, "pld") <= target_epsilon:
            lower /= 2
        bracket = mechanism_calibration.ExplicitBracketInterval(lower, upper + tolerance)
    try:
        z = mechanism_calibration.calibrate_dp_mechanism(
            lambda: make_accountant(accountant), event, target_epsilon, delta, bracket,
            tol=tolerance)
    except (mechanism_calibration.NoBracketIntervalFoundError, ValueError):
        raise ConfigError(f"no noise multiplier reaches ε={target_epsilon} at δ={delta} with "
                          f"{steps} steps at sample rate {sample_rate} ({accountant})") from None
    return float(z)


def calibrate_noise(budget: PrivacyBudget, history: Sequence[DPSteps], shape: DPSteps,
                    rounds: int, tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier (within `tolerance`, rounded up) with which `rounds` more
    rounds of `shape` (its sampling rate and steps per round) keep ε, composed with the site's
    past runs `history`, within the budget. PrivacyBudgetExceeded when the past alone spends
    it; ConfigError when no multiplier up to 100 does."""
    if rounds < 1:
        raise ConfigError(f"rounds to calibrate for must be >= 1, got {rounds}")
    spent = epsilon_of(history, budget.delta, budget.accountant)
    if spent >= budget.epsilon:
        raise PrivacyBudgetExceeded(
            f"ε={spent:.4g} is spent already (δ={budget.delta:g}, {budget.accountant}), the "
            f"budget is ε={budget.epsilon:g}: no noise leaves room for another round")

    def fits(z: float) -> bool:
        planned = shape.model_copy(update={"noise_multiplier": z,
                                           "steps": shape.steps * rounds})
        return epsilon_of([*history, planned], budget.delta,
                          budget.accountant) <= budget.epsilon

    lo, hi = 0.0, 1.0
    while not fits(hi):
        lo, hi = hi, hi * 2
        if hi > 100 and history:
            raise PrivacyBudgetExceeded(
                f"ε={spent:.4g} is spent already (δ={budget.delta:g}, {budget.accountant}) of "
                f"the budget ε={budget.epsilon:g}: even a noise multiplier of 100 leaves no "
                f"room for {rounds} more round(s)")
        if hi > 100:
            raise ConfigError(
                f"no noise multiplier up to 100 keeps ε within {budget.epsilon:g} over "
                f"{rounds} round(s) of {shape.steps} step(s) at sample rate "
                f"{shape.sample_rate:.4g}: raise the budget, or train fewer rounds or epochs")
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        if mid > 0 and fits(mid):
            hi = mid
        else:
            lo = mid
    return math.ceil(hi / tolerance) * tolerance


class PrivacyBudget(BaseModel):
    """A study's (ε, δ) and the accountant that enforces it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epsilon: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    accountant: AccountantName = "rdp"


@dataclass(frozen=True)
class RoundPrivacy:
    """ε before and after a planned round, per site and for the study (the largest site)."""

    spent_before: float
    spent_after: float
    round_epsilon: float  # the planned round alone, largest site
    per_site_after: dict[str, float]


def plan_round(budget: PrivacyBudget, history: Mapping[str, Sequence[DPSteps]],
               planned: Mapping[str, DPSteps]) -> RoundPrivacy:
    """Check a round before it starts: ε per site after composing its past runs with the
    planned one; raises PrivacyBudgetExceeded, naming the sites, if any would pass the budget."""

    def eps(runs: Sequence[DPSteps]) -> float:
        return epsilon_of(runs, budget.delta, budget.accountant)

    before = {s: eps(list(r)) for s, r in history.items()}
    after = {s: eps([*history.get(s, ()), run]) for s, run in planned.items()}
    alone = max((eps([run]) for run in planned.values()), default=0.0)
    spent_before = max(before.values(), default=0.0)
    spent_after = max([spent_before, *after.values()])
    over = sorted(s for s, e in after.items() if e > budget.epsilon)
    if over:
        raise PrivacyBudgetExceeded(
            f"the next round would raise ε to {spent_after:.4g} (δ={budget.delta:g}, "
            f"{budget.accountant}), over the study budget ε={budget.epsilon:g} at site(s) "
            f"{', '.join(over)}; the study stops here (to train further raise the budget: "
            "FederatedStudy spec.privacyBudget.epsilon, deeprad simulate --dp-epsilon)")
    return RoundPrivacy(spent_before=spent_before, spent_after=spent_after, round_epsilon=alone,
                        per_site_after=after)


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        e = errors()[0]
        return f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
    return str(exc)


# ---- DP-SGD with Opacus -----------------------------------------------------------------------


class DPConfig(BaseModel):
    """Local DP-SGD settings of a round."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    noise_multiplier: float = Field(ge=0)
    max_grad_norm: float = Field(gt=0)
    clipping: Literal["flat", "adaptive"] = "flat"
    # adaptive clipping (Andrew et al.): the bound tracks this quantile of per-sample norms
    target_unclipped_quantile: float = Field(default=0.5, gt=0, lt=1)
    clipbound_learning_rate: float = Field(default=0.2, gt=0)
    min_clipbound: float = Field(default=1e-3, gt=0)
    max_clipbound: float = Field(default=100.0, gt=0)
    unclipped_num_std: float | None = Field(default=None, gt=0)  # default: expected batch / 20
    secure_mode: bool = False  # Opacus' cryptographically secure noise (needs torchcsprng)
