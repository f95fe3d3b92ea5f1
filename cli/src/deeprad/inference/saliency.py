"""Grad-CAM heat-maps (MONAI's `monai.visualize.GradCAM`) for one image: where in the slice
the network's tumour evidence lies. Needs the PyTorch model, since it follows gradients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from monai.visualize import GradCAM
from PIL import Image
from torch import nn

from deeprad.core.errors import ConfigError
from deeprad.core.models import TumorCNN

# Grad-CAM's usual layers for the registered networks: the last feature maps before pooling.
KNOWN_LAYERS = {"densenet121": "class_layers.relu", "resnet18": "layer4"}
MIN_PNG_SIDE = 256
HEAT_ALPHA = 0.45


def default_layer(model: nn.Module, model_name: str) -> str:
    """The layer whose activations Grad-CAM weighs: a known one for the registry's networks,
    the last convolution block of TumorCNN, else the model's last Conv2d."""
    names = dict(model.named_modules())
    if model_name in KNOWN_LAYERS and KNOWN_LAYERS[model_name] in names:
        return KNOWN_LAYERS[model_name]
    if isinstance(model, TumorCNN):
        blocks = [i for i, m in enumerate(model.features)
                  if any(isinstance(c, nn.Conv2d) for c in m.modules())]
        return f"features.{blocks[-1]}"
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ConfigError(f"model {model_name!r} has no Conv2d layer for Grad-CAM; name one "
                          "with --saliency-layer")
    return convs[-1]


def gradcam(model: nn.Module, image: torch.Tensor, layer: str) -> np.ndarray:
    """Grad-CAM of the tumour logit for one [1, S, S] image: an [S, S] map in [0, 1]."""
    names = {n for n, _ in model.named_modules() if n}
    if layer not in names:
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-3:]
        raise ConfigError(f"--saliency-layer {layer!r} is not a module of the model; "
                          f"e.g. {', '.join(convs)}")
    model.eval()
    device = next(model.parameters()).device
    cam = GradCAM(nn_module=model, target_layers=layer)
    with torch.enable_grad():
        heat = cam(x=image[None].float().to(device), class_idx=0)
    return np.asarray(heat.detach().cpu().numpy()[0, 0], dtype=np.float32)


def save_overlay(image: torch.Tensor, heat: np.ndarray, out: Path) -> Path:
    """A PNG with the slice on the left and the heat-map over it on the right."""
    grey = np.clip(image[0].detach().cpu().numpy(), 0.0, 1.0)
    base = np.repeat(grey[..., None], 3, axis=-1)
    colour = colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3]
    blend = (1 - HEAT_ALPHA) * base + HEAT_ALPHA * colour
    pair = np.concatenate([base, blend], axis=1)
    img = Image.fromarray((pair * 255).round().astype(np.uint8))
    scale = max(1, -(-MIN_PNG_SIDE // grey.shape[0]))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, format="PNG")
    return out
