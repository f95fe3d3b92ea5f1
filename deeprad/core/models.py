"""Registry of medical-imaging networks (MONAI building blocks) plus bring-your-own.

Every registered network uses instance or group normalisation instead of BatchNorm: BatchNorm
cannot be used with DP-SGD and its running statistics drift under non-IID federated data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import DenseNet121, resnet18
from torch import nn

from deeprad.core.errors import ConfigError
from deeprad.core.importing import is_import_path, load_object
from deeprad.core.protocol import ModelSpec


class TumorCNN(nn.Module):
    """Small 2D lesion detector that trains on a CPU in seconds.

    Max pooling all the way down, including the global pool: a lesion of a few pixels
    averaged over the whole slice would all but disappear. Instance normalisation (no running
    statistics, so DP-SGD works) evens out each scanner's contrast and made it learn several
    times faster than GroupNorm on the phantoms.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        channels: tuple[int, ...] = (16, 32, 64),
        norm: str = "instance",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for ch in channels:
            layers.append(
                Convolution(
                    spatial_dims=2,
                    in_channels=prev,
                    out_channels=ch,
                    kernel_size=3,
                    act="relu",
                    norm=norm,
                )
            )
            layers.append(nn.MaxPool2d(2))
            prev = ch
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def _tumor_cnn(in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    if "channels" in kwargs:
        kwargs["channels"] = tuple(kwargs["channels"])
    return TumorCNN(in_channels=in_channels, num_classes=num_classes, **kwargs)


def _densenet121(in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    kwargs.setdefault("norm", ("group", {"num_groups": 8}))
    return DenseNet121(
        spatial_dims=2, in_channels=in_channels, out_channels=num_classes, **kwargs
    )


def _resnet18(in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    from opacus.validators import ModuleValidator

    model = resnet18(spatial_dims=2, n_input_channels=in_channels, num_classes=num_classes,
                     **kwargs)
    # MONAI's ResNet blocks build BatchNorm whatever `norm` says; Opacus swaps in GroupNorm.
    fixed: nn.Module = ModuleValidator.fix(model)
    return fixed


@dataclass(frozen=True)
class ModelEntry:
    factory: Callable[..., nn.Module]
    summary: str


REGISTRY: dict[str, ModelEntry] = {
    "tumor-cnn": ModelEntry(_tumor_cnn, "small 2D max-pooling CNN (23.6k params); the CPU demo"),
    "densenet121": ModelEntry(_densenet121, "MONAI DenseNet121, GroupNorm (6.9M params); GPUs"),
    "resnet18": ModelEntry(_resnet18, "MONAI ResNet-18, GroupNorm (11.2M params); GPUs"),
}


def build_model(spec: ModelSpec, in_channels: int = 1, num_classes: int = 1) -> nn.Module:
    """Instantiate a registered network or a `package.module:factory` with the spec's kwargs."""
    kwargs = dict(spec.kwargs)
    if is_import_path(spec.name):
        factory = load_object(spec.name, "model")
        model = factory(**kwargs)
    elif spec.name in REGISTRY:
        try:
            model = REGISTRY[spec.name].factory(in_channels, num_classes, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"model {spec.name!r}: bad kwargs {kwargs}: {exc}") from exc
    else:
        known = ", ".join(sorted(REGISTRY))
        raise ConfigError(
            f"unknown model {spec.name!r}: use one of {known}, or 'package.module:factory'"
        )
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {spec.name!r}: factory returned {type(model).__name__}, "
                          "not a torch.nn.Module")
    return model


def model_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as detached, contiguous CPU tensors (what checkpoints hold)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
