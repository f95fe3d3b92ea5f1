"""The study's privacy plan: per-site DP-SGD settings calibrated to the budget, and the ledger
that is checked before each round starts.

Each site's noise multiplier is the smallest that keeps its ε at or below the study budget
after all planned rounds (its own sampling rate and step count per round: the core's
`round_steps`). A study's ε is the largest site's (parallel composition: every record lives at
one site). Before a round, `check_round` composes each site's past steps with the planned ones
and refuses a round that would pass the budget.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from deeprad.core.privacy import (
    DPConfig,
    DPSteps,
    PrivacyBudget,
    RoundPrivacy,
    noise_for_target_epsilon,
    plan_round,
    round_steps,
)
from deeprad.core.protocol import RoundEpsilon

# dp-accounting logs through absl when an RDP order fails to converge and is skipped (the
# bound stays valid); that is noise in a user's terminal.
logging.getLogger("absl").setLevel(logging.ERROR)


@dataclass
class PrivacyPlan:
    """Per-site DP settings and the steps spent so far."""

    budget: PrivacyBudget
    configs: dict[str, DPConfig]
    per_round: dict[str, DPSteps]  # what one round costs each site
    history: dict[str, list[DPSteps]] = field(default_factory=dict)

    @classmethod
    def create(cls, budget: PrivacyBudget, train_sizes: Mapping[str, int], batch_size: int,
               local_epochs: int, rounds: int, max_grad_norm: float,
               noise_multiplier: float | None = None) -> PrivacyPlan:
        """Calibrate each site's noise to spend the budget over `rounds` rounds, unless a fixed
        `noise_multiplier` is given (then the budget may stop the study early)."""
        configs, per_round = {}, {}
        for site, n in train_sizes.items():
            # the sampling rate and step count of a round; the noise is what is being chosen
            shape = round_steps(n, batch_size=batch_size, local_epochs=local_epochs,
                                noise_multiplier=0.0)
            z = noise_multiplier if noise_multiplier is not None else noise_for_target_epsilon(
                budget.epsilon, shape.sample_rate, rounds * shape.steps, budget.delta,
                budget.accountant)
            configs[site] = DPConfig(noise_multiplier=z, max_grad_norm=max_grad_norm)
            per_round[site] = shape.model_copy(update={"noise_multiplier": z})
        return cls(budget=budget, configs=configs, per_round=per_round)

    def check_round(self) -> RoundPrivacy:
        """ε before and after the next round; PrivacyBudgetExceeded if it would pass the
        budget."""
        return plan_round(self.budget, self.history, self.per_round)

    def record(self, site: str, spent: DPSteps | None) -> None:
        """Add the steps a site reported after a round."""
        if spent is not None and spent.steps:
            self.history.setdefault(site, []).append(spent)

    def round_epsilon(self, planned: RoundPrivacy) -> RoundEpsilon:
        return RoundEpsilon(epsilon_round=planned.round_epsilon,
                            epsilon_spent=planned.spent_after, delta=self.budget.delta,
                            accountant=self.budget.accountant)
