"""Registry of medical-imaging networks (MONAI building blocks) plus bring-your-own.

Every registered network uses instance or group normalisation instead of BatchNorm: BatchNorm
cannot be used with DP-SGD and its running statistics drift under non-IID federated data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import DenseNet121, DynUNet, SegResNet, UNet, resnet18
from torch import nn
from torch.nn import functional as F

from deeprad.core.errors import ConfigError
from deeprad.core.importing import is_import_path, load_object
from deeprad.core.model_catalogue import MODEL_TASKS, MODELS
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


class GaussianJet(nn.Module):
    """A fixed, untrained front end: at each scale σ the smoothed image, its gradient magnitude
    and the two eigenvalues of its Hessian, scale-normalised (σ·∂, σ²·∂²). A bright blob of
    radius about σ√2 makes both eigenvalues strongly negative; an edge or the thin skull ring
    only one. The filters are buffers computed from σ alone: nothing here is learned, so it
    costs no privacy and adds nothing to checkpoints."""

    OUTPUTS_PER_SCALE = 4

    def __init__(self, scales: tuple[float, ...] = (1.0, 2.0, 4.0)) -> None:
        super().__init__()
        if not scales or min(scales) <= 0:
            raise ConfigError(f"tumor-jet scales must be positive numbers, got {list(scales)}")
        self.scales = tuple(float(s) for s in scales)
        for i, sigma in enumerate(self.scales):
            radius = math.ceil(3 * sigma)
            x = torch.arange(-radius, radius + 1, dtype=torch.float64)
            g = torch.exp(-(x**2) / (2 * sigma**2))
            g = g / g.sum()
            g1 = -x / sigma**2 * g  # first and second derivatives of the Gaussian
            g2 = (x**2 / sigma**4 - 1 / sigma**2) * g
            self.register_buffer(f"taps{i}", torch.stack([g, g1, g2]).float(), persistent=False)

    @property
    def out_channels(self) -> int:
        return self.OUTPUTS_PER_SCALE * len(self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, 4 * scales, H, W)."""
        out = []
        for i, sigma in enumerate(self.scales):
            taps: torch.Tensor = getattr(self, f"taps{i}")
            r = (taps.shape[1] - 1) // 2
            padded = F.pad(x, (r, r, r, r), mode="replicate")
            # Separable: filter the columns with g, g', g'' once, then the rows of each.
            cols = F.conv2d(padded, taps[:, None, :, None])  # (B, 3, H, W + 2r)
            rows = taps[:, None, None, :]
            smooth = F.conv2d(cols[:, 0:1], rows)  # L, L_x, L_xx
            d_y = F.conv2d(cols[:, 1:2], rows[:2])  # L_y, L_xy
            d_yy = F.conv2d(cols[:, 2:3], rows[:1])  # L_yy
            lx, ly = sigma * smooth[:, 1], sigma * d_y[:, 0]
            lxx, lyy, lxy = sigma**2 * smooth[:, 2], sigma**2 * d_yy[:, 0], sigma**2 * d_y[:, 1]
            mean = (lxx + lyy) / 2
            spread = torch.sqrt(((lxx - lyy) / 2) ** 2 + lxy**2 + 1e-8)
            out += [smooth[:, 0], torch.sqrt(lx**2 + ly**2 + 1e-8), mean - spread, mean + spread]
        return torch.stack(out, 1)


class TumorJet(nn.Module):
    """Lesion detector for differentially private training (209 trained parameters).

    DP-SGD adds the same noise to every trained parameter, so the fewer there are, the more of
    the clipped signal survives (Tramèr & Boneh 2021: fixed hand-made front ends beat end-to-end
    CNNs under DP on small data). The spatial filters are a fixed `GaussianJet`, each of its
    maps standardised per image (which also evens out scanner gain); only pixel-wise mixing
    (two 1x1 convolutions with GroupNorm) and a head over the mean and the maximum of the
    resulting lesion maps are trained. Bounded tanh activations keep noisy steps from blowing
    activations up (Papernot et al. 2021, "tempered sigmoids"). Trains well with plain SGD,
    whose updates average the noise away across sites, unlike Adam's per-coordinate rescaling.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 1, width: int = 8,
                 scales: tuple[float, ...] = (1.0, 2.0, 4.0)) -> None:
        super().__init__()
        self.jet = GaussianJet(scales)
        maps = in_channels * self.jet.out_channels
        self.mix = nn.Sequential(
            nn.Conv2d(maps, width, 1), nn.GroupNorm(1, width), nn.Tanh(),
            nn.Conv2d(width, width, 1), nn.Tanh())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        maps = self.jet(x.reshape(b * c, 1, h, w)).reshape(b, -1, h, w)
        lesion = self.mix(F.instance_norm(maps))
        return self.head(torch.cat([lesion.mean((2, 3)), lesion.amax((2, 3))], 1))


def _tumor_jet(in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    if "scales" in kwargs:
        kwargs["scales"] = tuple(kwargs["scales"])
    return TumorJet(in_channels=in_channels, num_classes=num_classes, **kwargs)


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


def _unet3d(in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    channels = tuple(kwargs.pop("channels", (8, 16, 32, 64)))
    return UNet(spatial_dims=3, in_channels=in_channels, out_channels=num_classes,
                channels=channels,
                strides=tuple(kwargs.pop("strides", (2,) * (len(channels) - 1))),
                num_res_units=kwargs.pop("num_res_units", 1), norm=kwargs.pop("norm", "instance"),
                **kwargs)


def _segresnet3d(in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    kwargs.setdefault("init_filters", 8)
    kwargs.setdefault("norm", ("group", {"num_groups": 8}))
    return SegResNet(spatial_dims=3, in_channels=in_channels, out_channels=num_classes, **kwargs)


def _dynunet3d(in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    kernels = [tuple(k) if isinstance(k, list) else k
               for k in kwargs.pop("kernel_size", [3, 3, 3, 3])]
    strides = [tuple(s) if isinstance(s, list) else s
               for s in kwargs.pop("strides", [1, 2, 2, 2])]
    kwargs.setdefault("filters", [8, 16, 32, 64][: len(kernels)])
    kwargs.setdefault("norm_name", "instance")
    return DynUNet(spatial_dims=3, in_channels=in_channels, out_channels=num_classes,
                   kernel_size=kernels,
                   strides=strides, upsample_kernel_size=strides[1:], **kwargs)


# The builder of every network in the catalogue (deeprad.core.model_catalogue), by name.
FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "tumor-cnn": _tumor_cnn,
    "tumor-jet": _tumor_jet,
    "densenet121": _densenet121,
    "resnet18": _resnet18,
    "unet3d": _unet3d,
    "segresnet3d": _segresnet3d,
    "dynunet3d": _dynunet3d,
}
if set(FACTORIES) != set(MODELS):  # a catalogue entry without a builder, or the reverse
    raise RuntimeError(f"model builders {sorted(FACTORIES)} != catalogue {sorted(MODELS)}")


def build_model(spec: ModelSpec, in_channels: int = 1, num_classes: int = 1, *,
                allow_code: bool = False) -> nn.Module:
    """Instantiate a catalogue network with the spec's kwargs. A `package.module:factory` is
    code: it runs only with `allow_code` (`deeprad simulate` on the user's own machine), never
    in a Job, whatever a study, a task or a checkpoint manifest names."""
    kwargs = dict(spec.kwargs)
    if is_import_path(spec.name):
        if not allow_code:
            raise ConfigError(
                f"model {spec.name!r}: an import path is code, and only `deeprad simulate` runs "
                f"your own code; name a catalogue network ({', '.join(MODELS)})")
        factory = load_object(spec.name, "model")
        model = factory(**kwargs)
    elif spec.name == "bundle":  # a MONAI bundle by digest: verified, allowlisted targets only
        from deeprad.core.bundle_model import build_bundle_model

        model = build_bundle_model(spec, allow_code=allow_code)
    elif spec.name in FACTORIES:
        if MODEL_TASKS[spec.name] != spec.task:
            raise ConfigError(f"model {spec.name!r} is a {MODEL_TASKS[spec.name]} network but "
                              f"the study's task is {spec.task}; set model.task: "
                              f"{MODEL_TASKS[spec.name]} or name a {spec.task} network")
        # the number of input sequences is part of the architecture, so the spec may fix it
        in_channels = int(kwargs.pop("in_channels", in_channels))
        try:
            model = FACTORIES[spec.name](in_channels, num_classes, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"model {spec.name!r}: bad kwargs {kwargs}: {exc}") from exc
    else:
        known = ", ".join(sorted(MODELS))
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
