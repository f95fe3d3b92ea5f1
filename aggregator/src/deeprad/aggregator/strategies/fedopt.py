"""The adaptive server optimizers of Reddi et al. 2021 ("Adaptive Federated Optimization").

With Δ the sample-weighted mean update, each round:
    m ← β₁·m + (1 − β₁)·Δ
    v ← (see each class)
    x ← x + η · m / (√v + τ)
m and v start at zero and travel between rounds in the checkpoint's strategy state.
"""

from __future__ import annotations

import abc

import torch

from deeprad.aggregator.strategies.base import MeanStrategy


class FedOpt(MeanStrategy, abc.ABC):
    """Shared first-moment and step logic; subclasses give the second-moment rule."""

    def __init__(self, *, server_lr: float = 1e-2, beta1: float = 0.9,
                 tau: float = 1e-3) -> None:
        super().__init__()
        self.server_lr, self.beta1, self.tau = float(server_lr), float(beta1), float(tau)

    @abc.abstractmethod
    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        """The new v from the old v and Δ² (may update v in place)."""

    def finish(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        new, state = {}, {}
        for k, d in self._mean.mean().items():
            m = self._state.get(f"m/{k}", torch.zeros_like(d))
            v = self._state.get(f"v/{k}", torch.zeros_like(d))
            m = m.mul_(self.beta1).add_(d, alpha=1 - self.beta1)
            v = self.second_moment(v, d.mul_(d))
            state[f"m/{k}"], state[f"v/{k}"] = m, v
            step = m / (v.sqrt() + self.tau) * self.server_lr
            new[k] = self._apply(k, step)
        return new, state


class FedAdagrad(FedOpt):
    """v ← v + Δ² (no decay, so no β₂)."""

    name = "fedadagrad"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v.add_(d2)


class DecayingFedOpt(FedOpt, abc.ABC):
    """The rules that forget old squares at rate β₂ (Adam, Yogi)."""

    def __init__(self, *, server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> None:
        super().__init__(server_lr=server_lr, beta1=beta1, tau=tau)
        self.beta2 = float(beta2)


class FedAdam(DecayingFedOpt):
    """v ← β₂·v + (1 − β₂)·Δ²."""

    name = "fedadam"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v.mul_(self.beta2).add_(d2, alpha=1 - self.beta2)


class FedYogi(DecayingFedOpt):
    """v ← v − (1 − β₂)·Δ²·sign(v − Δ²)."""

    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v.sub_((1 - self.beta2) * d2 * torch.sign(v - d2))
