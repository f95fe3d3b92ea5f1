"""The hospitals of the anatomy benchmark: how each one's scanner degrades a clean synthetic
patient (bias field, point spread, slice thickness, contrast, ghosting, Rician noise) and how its
patients differ (tumour prevalence and size). SYNTHETIC: these are simulated scanners.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import GaussianSmooth

from deeprad.core.errors import DataError


@dataclass(frozen=True)
class AnatomySite:
    """One simulated hospital: its scanner and its patient mix. Options of `DatasetSpec(kind=
    "anatomy")` carry it as `profile` (`as_dict()`)."""

    name: str = "hospital-a"
    bias_field: float = 0.15  # std of the log of the smooth multiplicative bias field
    noise: float = 0.03  # Rician noise std relative to the mean brain intensity
    blur: float = 0.4  # Gaussian point-spread sigma in voxels
    slice_thickness: float = 1.0  # slices averaged along D (axial), then interpolated back
    gamma: float = 1.0  # contrast curve: intensity ** gamma
    ghosting: float = 0.0  # amplitude of motion ghosts along the phase-encoding axis (H)
    prevalence: float = 0.6  # fraction of patients with at least one tumour
    lesion_min_mm: float = 5.0  # tumour radius range (uniform): early-stage lesions of a few
    lesion_max_mm: float = 20.0  # voxels up to large tumours with a necrotic core

    def __post_init__(self) -> None:
        limits = {"bias_field": (0.0, 1.0), "noise": (0.0, 0.5), "blur": (0.0, 4.0),
                  "slice_thickness": (1.0, 8.0), "gamma": (0.3, 3.0), "ghosting": (0.0, 0.5),
                  "prevalence": (0.0, 1.0), "lesion_min_mm": (0.5, 60.0),
                  "lesion_max_mm": (0.5, 60.0)}
        for key, (low, high) in limits.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not low <= value <= high:
                raise DataError(f"anatomy profile {self.name!r}: {key} must be a number in "
                                f"[{low}, {high}], got {value!r}")
        if self.lesion_min_mm > self.lesion_max_mm:
            raise DataError(f"anatomy profile {self.name!r}: lesion_min_mm {self.lesion_min_mm}"
                            f" exceeds lesion_max_mm {self.lesion_max_mm}")
        if not isinstance(self.name, str) or not self.name:
            raise DataError(f"anatomy profile: name must be a non-empty string, got {self.name!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(values: dict[str, Any]) -> AnatomySite:
        """A profile from `as_dict()` output; unknown keys are refused, missing ones default."""
        if not isinstance(values, dict):
            raise DataError(f"anatomy option profile must be a mapping, got {values!r}")
        known = {f.name for f in fields(AnatomySite)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DataError(f"anatomy profile: unknown field(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(known))}")
        return AnatomySite(**values)


# Four deliberately different training hospitals, then the held-out one: a distinct scanner
# (thick slices, strong bias and ghosting, flatter contrast) that no training site resembles.
DEFAULT_SITES = (
    AnatomySite("hospital-a", bias_field=0.10, noise=0.03, blur=0.4, slice_thickness=1.0,
                gamma=1.0, ghosting=0.0, prevalence=0.6, lesion_min_mm=5.0, lesion_max_mm=20.0),
    AnatomySite("hospital-b", bias_field=0.25, noise=0.06, blur=0.7, slice_thickness=2.0,
                gamma=0.85, ghosting=0.03, prevalence=0.5, lesion_min_mm=5.0, lesion_max_mm=16.0),
    AnatomySite("hospital-c", bias_field=0.20, noise=0.045, blur=0.3, slice_thickness=1.0,
                gamma=1.2, ghosting=0.06, prevalence=0.7, lesion_min_mm=6.0, lesion_max_mm=22.0),
    AnatomySite("hospital-d", bias_field=0.15, noise=0.08, blur=0.9, slice_thickness=1.5,
                gamma=1.1, ghosting=0.0, prevalence=0.4, lesion_min_mm=5.0, lesion_max_mm=14.0),
)
HELD_OUT_SITE = AnatomySite(
    "hospital-x", bias_field=0.30, noise=0.07, blur=1.0, slice_thickness=2.5, gamma=0.75,
    ghosting=0.12, prevalence=0.5, lesion_min_mm=5.0, lesion_max_mm=20.0)


def _extra_name(i: int) -> str:
    letters = [c for c in string.ascii_lowercase[len(DEFAULT_SITES):] if c != "x"]
    return f"hospital-{letters[i] if i < len(letters) else i + 1 + len(DEFAULT_SITES)}"


def anatomy_sites(n_sites: int, seed: int) -> list[AnatomySite]:
    """`n_sites` hospitals, deterministic from `seed`: the four defaults, then seeded random
    ones, and LAST the held-out hospital `hospital-x` (a scanner unlike the others), meant to be
    kept out of training. A single site is `hospital-a`."""
    if n_sites < 1:
        raise DataError(f"anatomy_sites: n_sites must be >= 1, got {n_sites}")
    if n_sites == 1:
        return [DEFAULT_SITES[0]]
    training = list(DEFAULT_SITES[:n_sites - 1])
    rng = np.random.default_rng([seed, 15])
    while len(training) < n_sites - 1:
        low = float(rng.uniform(4.0, 7.0))
        training.append(AnatomySite(
            _extra_name(len(training) - len(DEFAULT_SITES)),
            bias_field=float(rng.uniform(0.05, 0.35)), noise=float(rng.uniform(0.02, 0.08)),
            blur=float(rng.uniform(0.2, 0.9)), slice_thickness=float(rng.uniform(1.0, 2.0)),
            gamma=float(rng.uniform(0.85, 1.2)), ghosting=float(rng.uniform(0.0, 0.06)),
            prevalence=float(rng.uniform(0.35, 0.75)), lesion_min_mm=low,
            lesion_max_mm=float(rng.uniform(low + 8.0, 22.0))))
    return [*training, HELD_OUT_SITE]


def smooth_noise(rng: np.random.Generator, size: int, coarse: int,
                 channels: int = 1) -> torch.Tensor:
    """[channels, size^3] smooth random field, unit std at the `coarse`^3 control points."""
    grid = rng.standard_normal((1, channels, coarse, coarse, coarse)).astype(np.float32)
    return F.interpolate(torch.from_numpy(grid), size=(size,) * 3, mode="trilinear",
                         align_corners=True)[0]


def percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The `q` quantile (0..1) of a 1-D tensor, linearly interpolated like torch.quantile, which
    refuses more than 2^24 elements (a brain at an image_size of ~350 and above); kthvalue has
    no such limit."""
    position = q * (values.numel() - 1)  # results agree with torch.quantile to a float32 ulp
    low = int(position)
    below = values.kthvalue(low + 1).values
    if low + 1 >= values.numel():
        return below
    above = values.kthvalue(low + 2).values
    return torch.lerp(below, above, position - low)


def scan(clean: torch.Tensor, brain: torch.Tensor, site: AnatomySite,
         rng: np.random.Generator) -> torch.Tensor:
    """One patient's sequences [C, S, S, S] as `site`'s scanner records them, each scaled so
    the brain's 99th percentile is 1 (float32, roughly [0, 1])."""
    size = clean.shape[-1]
    gammas = site.gamma * rng.uniform(0.93, 1.07, len(clean))
    image = clean.clamp(min=0.0) ** torch.as_tensor(gammas, dtype=torch.float32).view(-1, 1, 1, 1)
    if site.blur > 0:
        image = torch.as_tensor(GaussianSmooth(sigma=site.blur)(image))
    if site.slice_thickness > 1.0:  # thick axial slices: average along D, interpolate back
        slices = max(2, round(size / site.slice_thickness))
        thick = F.interpolate(image[None], size=(slices, size, size), mode="area")
        image = F.interpolate(thick, size=(size,) * 3, mode="trilinear", align_corners=False)[0]
    field = smooth_noise(rng, size, 3)
    image = image * torch.exp(site.bias_field * field / field.std().clamp(min=1e-6))
    amplitude = site.ghosting * rng.uniform(0.5, 1.5)
    if amplitude > 0:  # periodic motion: attenuated copies shifted along the phase axis
        shift = int(rng.integers(size // 5, size // 2 + 1))
        image = image + 0.5 * amplitude * (image.roll(shift, dims=-2) + image.roll(-shift, dims=-2))
    inside = brain > 0.5
    level = torch.stack([c[inside].mean() for c in image]).view(-1, 1, 1, 1)
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    sigma = site.noise * level
    real = image + sigma * torch.randn(image.shape, generator=gen)
    imaginary = sigma * torch.randn(image.shape, generator=gen)
    image = torch.sqrt(real**2 + imaginary**2)  # magnitude of complex Gaussian noise: Rician
    top = torch.stack([percentile(c[inside], 0.99) for c in image]).view(-1, 1, 1, 1)
    return (image / top.clamp(min=1e-6)).clamp(max=2.0).float()
