"""One SYNTHETIC patient of the anatomy benchmark before the scanner: the real MNI152 tissue maps
deformed into a new brain, synthetic tumours grown in it, and clean T1 / T2 / FLAIR contrasts
synthesised from the tissue and tumour fractions.

A tumour is a blob with a noise-perturbed radius (so shapes are irregular) and a partial-volume
edge about one voxel wide: an enhancing rim, for larger tumours a necrotic core, and around it
oedema that follows the white matter. The segmentation target is the tumour (rim + core), NOT the
oedema: the oedema is as bright as the tumour on FLAIR and T2, so finding the tumour takes the
enhancing rim on T1 as well, as in real glioma imaging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from deeprad.core.data.anatomy_scanner import smooth_noise

CHANNELS = ("t1", "t2", "flair")
# Clean signal per sequence for: CSF, grey matter, white matter, oedema, fully enhancing rim,
# necrosis. T1 is post-contrast-like (enhancing rim bright, necrosis dark); T2 has bright CSF;
# FLAIR suppresses CSF and shows oedema brightest.
CONTRAST = {
    "t1": (0.20, 0.55, 0.80, 0.55, 1.40, 0.22),
    "t2": (1.00, 0.55, 0.40, 0.82, 0.65, 0.95),
    "flair": (0.10, 0.60, 0.45, 0.82, 0.85, 0.45),
}
MAX_ROTATION = 0.14  # radians (about 8 degrees) about each axis
MAX_SHIFT_MM = 4.0
ELASTIC_MM = 3.0  # std of the elastic displacement at its control points
ELASTIC_CONTROL = 6  # control points per axis of the elastic field


@dataclass(frozen=True)
class Tumours:
    """Per-voxel fractions [S, S, S]: tumour (rim + core), necrotic core (part of the tumour),
    oedema (outside it); `enhancement` and `conspicuity` of the tumour owning each voxel;
    `mask` the segmentation target (tumour voxels inside the brain); `sizes` voxels per tumour."""

    tumour: torch.Tensor
    necrosis: torch.Tensor
    oedema: torch.Tensor
    enhancement: torch.Tensor
    conspicuity: torch.Tensor
    mask: torch.Tensor
    sizes: tuple[int, ...]


def _rotation(angles: np.ndarray) -> np.ndarray:
    a, b, c = (float(x) for x in angles)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def deform(tissues: torch.Tensor, spacing_mm: float, rng: np.random.Generator) -> torch.Tensor:
    """A new brain from the template: random rotation, scale and shift, then a smooth elastic
    displacement, applied to the tissue fractions [3, S, S, S] in one resampling."""
    size = tissues.shape[-1]
    half_mm = size * spacing_mm / 2.0  # grid_sample's coordinates run from -1 to 1
    scale = rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, 3)
    matrix = _rotation(rng.uniform(-MAX_ROTATION, MAX_ROTATION, 3)) @ np.diag(1.0 / scale)
    shift = rng.uniform(-MAX_SHIFT_MM, MAX_SHIFT_MM, 3) / half_mm
    theta = torch.as_tensor(np.concatenate([matrix, shift[:, None]], axis=1),
                            dtype=torch.float32)[None]
    grid = F.affine_grid(theta, [1, 3, size, size, size], align_corners=False)
    elastic = smooth_noise(rng, size, ELASTIC_CONTROL, 3) * (ELASTIC_MM / half_mm)
    grid = grid + elastic.permute(1, 2, 3, 0)[None]
    return F.grid_sample(tissues[None], grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)[0]


def _positions(size: int, spacing_mm: float) -> torch.Tensor:
    axis = torch.arange(size, dtype=torch.float32) * spacing_mm
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))


def _centre_weights(tissues: torch.Tensor) -> torch.Tensor:
    """Where tumours start: deep in grey or (twice as likely) white matter, at least 2 voxels
    inside the brain."""
    outside = (tissues.sum(0) < 0.5).float()[None, None]
    inner = F.max_pool3d(outside, 5, stride=1, padding=2)[0, 0] == 0
    weight = (2.0 * tissues[1] + tissues[0]) * (inner & (tissues[:2].sum(0) > 0.6))
    weight = weight.flatten().double()
    return weight / weight.sum()


def _centre(weights: torch.Tensor, size: int, rng: np.random.Generator) -> tuple[int, int, int]:
    index = int(rng.choice(weights.numel(), p=weights.numpy()))
    d, rest = divmod(index, size * size)
    h, w = divmod(rest, size)
    return d, h, w


def _ramp(signed_voxels: torch.Tensor) -> torch.Tensor:
    """Partial-volume fraction from a signed distance to a boundary (voxels, >0 inside)."""
    return (0.5 + signed_voxels).clamp(0.0, 1.0)


def grow_tumours(tissues: torch.Tensor, spacing_mm: float, count: int,
                 radius_mm: tuple[float, float], rng: np.random.Generator) -> Tumours:
    """`count` tumours (0 for a healthy patient) in plausible tissue of the deformed brain."""
    size = tissues.shape[-1]
    zeros = torch.zeros((size,) * 3)
    tumour, necrosis, oedema = zeros.clone(), zeros.clone(), zeros.clone()
    enhancement, conspicuity = zeros.clone(), zeros.clone()
    mask = torch.zeros((size,) * 3, dtype=torch.bool)
    brain = tissues.sum(0)
    sizes = []
    positions = _positions(size, spacing_mm) if count else zeros
    weights = _centre_weights(tissues) if count else zeros
    follows_wm = (tissues[1] + 0.4 * tissues[0]) / brain.clamp(min=1e-3)
    for _ in range(count):
        centre = _centre(weights, size, rng)
        radius = rng.uniform(*radius_mm)
        radius_vox = radius / spacing_mm
        offset = positions - torch.tensor([c * spacing_mm for c in centre]).view(3, 1, 1, 1)
        stretch = torch.as_tensor(rng.uniform(0.75, 1.3, 3), dtype=torch.float32)
        distance = (offset / stretch.view(3, 1, 1, 1)).norm(dim=0) / radius
        bumps = smooth_noise(rng, size, 8, 2)
        bumps = bumps / bumps.std(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
        shape = distance / (1.0 + rng.uniform(0.15, 0.4) * bumps[0]).clamp(min=0.5)
        this = _ramp((1.0 - shape) * radius_vox)
        this_mask = (shape < 1.0) & (brain > 0.5)
        this_mask[centre] = True  # the smallest lesions still hold their centre voxel
        this = torch.maximum(this, this_mask.float() * 0.5)
        core = rng.uniform(0.35, 0.65) if radius_vox >= 2.0 and rng.random() < 0.75 else 0.0
        this_necrosis = _ramp((core - shape) * radius_vox) if core else zeros
        # Small early lesions have little oedema and enhance and stand out less than large ones.
        small = radius_vox < 1.5
        extent = rng.uniform(1.0, 1.4) if small else rng.uniform(1.3, 2.4)
        swelling = distance / (extent * (1.0 + rng.uniform(0.2, 0.5) * bumps[1]).clamp(min=0.5))
        this_oedema = (_ramp((1.0 - swelling) * radius_vox * extent) * (0.5 if small else 0.9)
                       * follows_wm.clamp(0, 1))
        owns = this > tumour
        enhancement = torch.where(owns, float(rng.uniform(0.4, 0.9) if small
                                              else rng.uniform(0.6, 1.0)), enhancement)
        conspicuity = torch.where(owns, float(rng.uniform(0.6, 1.0) if small
                                              else rng.uniform(0.8, 1.0)), conspicuity)
        tumour = torch.maximum(tumour, this)
        necrosis = torch.maximum(necrosis, torch.minimum(this_necrosis, this))
        oedema = torch.maximum(oedema, this_oedema)
        mask |= this_mask
        sizes.append(int(this_mask.sum()))
    inside = (brain.clamp(max=1.0) > 0).float()
    return Tumours(tumour * inside, necrosis * inside, oedema * (1.0 - tumour) * inside,
                   enhancement, conspicuity, mask, tuple(sizes))


def sequences(tissues: torch.Tensor, tumours: Tumours, rng: np.random.Generator) -> torch.Tensor:
    """Clean T1, T2 and FLAIR [3, S, S, S] from tissue and tumour fractions, with per-patient
    contrast jitter and a faint tissue texture."""
    size = tissues.shape[-1]
    brain = tissues.sum(0).clamp(max=1.0)
    texture = 1.0 + 0.05 * smooth_noise(rng, size, max(4, size // 3))[0]
    normal_share = (1.0 - tumours.tumour - tumours.oedema).clamp(min=0.0)
    rim = (tumours.tumour - tumours.necrosis).clamp(min=0.0)
    out = []
    for name in CHANNELS:
        csf, gm, wm, oedema, rim_full, necrosis = (
            v * (1.0 + 0.04 * rng.standard_normal()) for v in CONTRAST[name])
        normal = (csf * tissues[2] + gm * tissues[0] + wm * tissues[1]) * texture
        if name == "t1":  # contrast uptake: an unenhanced rim looks like grey matter
            rim_signal = gm + tumours.enhancement * (rim_full - gm)
        else:
            rim_signal = gm + tumours.conspicuity * (rim_full - gm)
        lesion = oedema * tumours.oedema + rim_signal * rim + necrosis * tumours.necrosis
        out.append(normal * normal_share + lesion * brain)
    return torch.stack(out)
