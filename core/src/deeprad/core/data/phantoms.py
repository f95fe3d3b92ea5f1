"""Seeded synthetic tumour phantoms: MRI-like brain slices, some with a small lesion.

SYNTHETIC DATA, for demos and tests only. Positive slices carry one early-stage lesion (from a
few pixels up to about 5% of the slice). Each simulated hospital has its own scanner (intensity
scale, bias field, noise, blur, via MONAI transforms) and its own label prevalence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.transforms import GaussianSmooth, RandBiasField, RandRicianNoise, ScaleIntensity

from deeprad.core.data.imageset import ImageSet
from deeprad.core.errors import DataError

MAX_LESION_FRACTION = 0.05
MIN_LESION_PIXELS = 6.0


@dataclass(frozen=True)
class ScannerProfile:
    """How one hospital's scanner and patient mix differ from the others."""

    intensity_scale: float = 1.0
    bias_field: float = 0.2  # amplitude of the smooth multiplicative bias field
    noise: float = 0.04  # Rician noise std, relative to tissue intensity
    blur: float = 0.5  # Gaussian point-spread sigma in pixels
    prevalence: float = 0.4  # fraction of slices with a lesion

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


# A fixed, deliberately different set of hospitals for the default demo; more are drawn at random.
DEFAULT_PROFILES = (
    ScannerProfile(intensity_scale=1.0, bias_field=0.10, noise=0.03, blur=0.4, prevalence=0.50),
    ScannerProfile(intensity_scale=0.7, bias_field=0.35, noise=0.06, blur=0.8, prevalence=0.30),
    ScannerProfile(intensity_scale=1.3, bias_field=0.20, noise=0.09, blur=0.3, prevalence=0.20),
    ScannerProfile(intensity_scale=0.9, bias_field=0.45, noise=0.05, blur=1.1, prevalence=0.60),
)


def site_profiles(n_sites: int, seed: int) -> list[ScannerProfile]:
    """Profiles for `n_sites` hospitals: the four defaults first, then seeded random ones."""
    rng = np.random.default_rng(seed + 7919)
    profiles = list(DEFAULT_PROFILES[:n_sites])
    while len(profiles) < n_sites:
        profiles.append(
            ScannerProfile(
                intensity_scale=float(rng.uniform(0.6, 1.4)),
                bias_field=float(rng.uniform(0.05, 0.5)),
                noise=float(rng.uniform(0.02, 0.1)),
                blur=float(rng.uniform(0.0, 1.2)),
                prevalence=float(rng.uniform(0.15, 0.65)),
            )
        )
    return profiles


def _slice(rng: np.random.Generator, size: int, positive: bool) -> np.ndarray:
    """One clean slice: skull ring, brain tissue, ventricles and, if positive, a lesion."""
    ax = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    y, x = np.meshgrid(ax, ax, indexing="ij")
    cx, cy = rng.uniform(-0.05, 0.05, 2)
    a, b = rng.uniform(0.78, 0.92), rng.uniform(0.65, 0.82)
    theta = rng.uniform(-0.3, 0.3)
    xr = (x - cx) * math.cos(theta) + (y - cy) * math.sin(theta)
    yr = -(x - cx) * math.sin(theta) + (y - cy) * math.cos(theta)
    r = np.sqrt((xr / a) ** 2 + (yr / b) ** 2)
    img = np.zeros((size, size), np.float32)
    img[r <= 1.0] = 0.9  # skull
    brain = r <= 0.88
    img[brain] = 0.5 + 0.05 * rng.standard_normal()
    for side in (-1.0, 1.0):  # ventricles
        vx, vy = side * rng.uniform(0.08, 0.16), rng.uniform(-0.1, 0.05)
        va, vb = rng.uniform(0.05, 0.1), rng.uniform(0.15, 0.25)
        img[((xr - vx) / va) ** 2 + ((yr - vy) / vb) ** 2 <= 1.0] = 0.2
    if positive:
        area = math.exp(
            rng.uniform(math.log(MIN_LESION_PIXELS), math.log(MAX_LESION_FRACTION * size * size))
        )
        radius = math.sqrt(area / math.pi) * 2.0 / size  # pixels to [-1, 1] units
        for _ in range(100):  # place it inside the brain, away from the skull
            lx, ly = rng.uniform(-0.6, 0.6, 2)
            if math.hypot(lx / a, ly / b) + radius / min(a, b) < 0.85:
                break
        dist = np.sqrt((xr - lx) ** 2 + (yr - ly) ** 2) / radius
        contrast = rng.uniform(0.3, 0.7)
        img += (contrast * np.clip(1.5 - dist, 0.0, 1.0)).astype(np.float32)
    return img


def generate_phantoms(
    n: int, profile: ScannerProfile, size: int = 64, seed: int = 0
) -> ImageSet:
    """`n` slices from one hospital's scanner, reproducible from `seed`."""
    if n < 2:
        raise DataError(f"phantom dataset needs at least 2 samples, got {n}")
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < profile.prevalence
    labels[0], labels[1] = True, False  # both classes always present
    clean = np.stack([_slice(rng, size, bool(lab)) for lab in labels])
    tissue = clean > 0.3
    texture = GaussianSmooth(sigma=1.5)(rng.standard_normal(clean.shape).astype(np.float32))
    clean = clean + 0.25 * np.asarray(texture) * tissue
    # The scanner: point-spread blur, a smooth bias field, gain, and Rician noise.
    seed_t = int(rng.integers(2**31))
    img = torch.as_tensor(clean)
    if profile.blur > 0:
        img = torch.as_tensor(GaussianSmooth(sigma=profile.blur)(img))
    bias = RandBiasField(degree=3, coeff_range=(profile.bias_field, profile.bias_field), prob=1.0)
    bias.set_random_state(seed_t)
    noise = RandRicianNoise(prob=1.0, std=profile.noise, sample_std=False)
    noise.set_random_state(seed_t + 1)
    scale = ScaleIntensity()
    out = torch.empty(n, 1, size, size)
    for i in range(n):
        s = torch.as_tensor(bias(img[i : i + 1])) * profile.intensity_scale
        s = torch.as_tensor(noise(s))
        out[i] = torch.as_tensor(scale(s))
    return ImageSet(out.float(), torch.as_tensor(labels, dtype=torch.float32))
