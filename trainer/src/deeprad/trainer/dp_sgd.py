"""DP-SGD at a hospital with Opacus: Poisson sampling, per-sample clipping, Gaussian noise.

The accounting (ε of what ran, budgets, calibration) is in the core's `privacy` module, which the
operator shares; this wiring needs torch and Opacus, so it lives with the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deeprad.core.errors import ConfigError
from deeprad.core.privacy import DPConfig, DPSteps, epsilon_of


@dataclass
class PrivateTraining:
    """The wrapped model, optimizer and Poisson-sampling loader, and how to account them."""

    model: Any  # opacus GradSampleModule
    optimizer: Any  # opacus DPOptimizer (or AdaClipDPOptimizer)
    data_loader: Any  # opacus DPDataLoader
    engine: Any  # opacus PrivacyEngine; its accountant's history counts the steps
    sample_rate: float
    config: DPConfig

    @property
    def steps(self) -> int:
        """DP-SGD steps taken so far."""
        return int(sum(h[2] for h in self.engine.accountant.history))

    def spent(self) -> DPSteps:
        """The run so far, for the study's ledger."""
        return DPSteps(noise_multiplier=self.config.noise_multiplier,
                       sample_rate=self.sample_rate, steps=self.steps)

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        return epsilon_of([self.spent()], delta, accountant)


def _unsupported_networks() -> dict[type, str]:
    """Networks whose layers pass Opacus' validator but whose per-sample gradients fail at the
    first step (found by training each catalogue network with DP-SGD), and why."""
    from monai.networks.nets import DynUNet, SegResNet

    return {SegResNet: "its residual blocks add in place (x += identity), which Opacus' "
                       "backward hooks forbid",
            DynUNet: "its blocks fail Opacus' functorch fallback for per-sample gradients"}


def check_model(model: Any) -> None:
    """Raise ConfigError when Opacus cannot compute per-sample gradients for `model` (e.g.
    BatchNorm, which mixes records within a batch)."""
    from opacus.validators import ModuleValidator

    for network, why in _unsupported_networks().items():
        if isinstance(model, network):
            raise ConfigError(f"model cannot train with DP-SGD: MONAI {network.__name__}: "
                              f"{why}; use unet3d for private segmentation")
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError(f"model cannot train with DP-SGD: {errors[0]}; use a GroupNorm or "
                          "InstanceNorm variant (opacus ModuleValidator.fix swaps BatchNorm)")


def make_private(model: Any, optimizer: Any, data_loader: Any, config: DPConfig
                 ) -> PrivateTraining:
    """Wrap a model, optimizer and DataLoader for DP-SGD: Poisson sampling (each record joins
    each batch with probability batch_size / len(dataset)), per-sample clipping to
    `max_grad_norm` (or adaptive), Gaussian noise `noise_multiplier * max_grad_norm`."""
    from opacus import PrivacyEngine

    check_model(model)
    engine = PrivacyEngine(accountant="rdp", secure_mode=config.secure_mode)
    kwargs: dict[str, Any] = {}
    expected_batch = max(1, round(len(data_loader.dataset) / max(1, len(data_loader))))
    if config.clipping == "adaptive":
        if config.min_clipbound >= config.max_clipbound:
            raise ConfigError("adaptive clipping: min_clipbound must be below max_clipbound")
        std = config.unclipped_num_std or max(expected_batch / 20.0,
                                              0.5 * config.noise_multiplier + 1e-3)
        if config.noise_multiplier >= 2 * std:
            raise ConfigError(f"adaptive clipping: noise_multiplier {config.noise_multiplier} "
                              f"must be below 2 * unclipped_num_std ({2 * std:g})")
        kwargs = {"target_unclipped_quantile": config.target_unclipped_quantile,
                  "clipbound_learning_rate": config.clipbound_learning_rate,
                  "max_clipbound": config.max_clipbound, "min_clipbound": config.min_clipbound,
                  "unclipped_num_std": std}
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=data_loader,
        noise_multiplier=config.noise_multiplier, max_grad_norm=config.max_grad_norm,
        poisson_sampling=True, clipping=config.clipping, **kwargs)
    return PrivateTraining(model=model, optimizer=optimizer, data_loader=loader, engine=engine,
                           sample_rate=float(loader.sample_rate), config=config)

