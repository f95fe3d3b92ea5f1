"""The networks a study can name: name and one-line summary. No torch here: the operator's API
and `deeprad models` read it; `deeprad.core.models` builds each one (and checks at import that it
builds exactly these)."""

from __future__ import annotations

MODELS: dict[str, str] = {
    "tumor-cnn": "small 2D max-pooling CNN (23.6k params); the CPU demo",
    "tumor-jet": "fixed Gaussian-jet filters + 209 trained params; for DP-SGD",
    "densenet121": "MONAI DenseNet121, GroupNorm (6.9M params); GPUs",
    "resnet18": "MONAI ResNet-18, GroupNorm (11.2M params); GPUs",
}
MODEL_NAMES: tuple[str, ...] = tuple(MODELS)
