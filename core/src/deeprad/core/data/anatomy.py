"""The anatomy benchmark: SYNTHETIC tumours on REAL anatomy, for 3D multi-sequence lesion
segmentation across simulated hospitals.

The anatomy is real MRI: the MNI152 2009 T1, grey- and white-matter templates shipped in
nilearn's wheel (anatomy_template.py), cropped to the brain and resampled to the study's cube
(`image_size`^3, ~4 mm voxels at the default 48; `VolumeSet.spacing` says how many mm). Each
patient is a new brain (random rotation, scale, shift and elastic deformation of the tissue maps)
with 0-3 synthetic tumours in grey or white matter: irregular blobs from early-stage lesions of a
few voxels up to large tumours with an enhancing rim, a necrotic core and surrounding oedema
(anatomy_patient.py). T1 (post-contrast-like), T2 and FLAIR are synthesised from the tissue and
tumour fractions, then each hospital's scanner degrades them (bias field, point spread, slice
thickness, contrast curve, ghosting, Rician noise; anatomy_scanner.py), and each sequence is
scaled so the brain's 99th percentile is 1 (float32).

The segmentation mask is the TUMOUR (enhancing rim + necrotic core), NOT the oedema.

`DatasetSpec(kind="anatomy", image_size=48, split_seed=..., options={...})` options:
  profile        the hospital, `AnatomySite.as_dict()` (default: hospital-a); see anatomy_sites()
  patients       patients in the train/validation pool (default 40, at least 2)
  test_patients  a separate held-out test set of new patients, same hospital (default 10;
                 0 for none)
  seed           patients' seed (default 0)
Everything is deterministic from (profile, patients, test_patients, seed, image_size). Training
patients are `<site>-p0001`..., test patients `<site>-t0001`... (their own seeds, so the test set
does not change with `patients`); each pool holds at least one patient with a tumour and one
without. Unknown options are refused.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch

from deeprad.core.data.anatomy_patient import CHANNELS, deform, grow_tumours, sequences
from deeprad.core.data.anatomy_scanner import (
    DEFAULT_SITES,
    HELD_OUT_SITE,
    AnatomySite,
    anatomy_sites,
    scan,
)
from deeprad.core.data.anatomy_template import tissue_template
from deeprad.core.data.volumeset import VolumeSet
from deeprad.core.errors import DataError
from deeprad.core.protocol import DatasetSpec

__all__ = ["CHANNELS", "DEFAULT_SITES", "DESCRIPTION", "HELD_OUT_SITE", "AnatomySite",
           "anatomy_sites", "generate_patients", "load_anatomy"]

DESCRIPTION = ("anatomy benchmark: SYNTHETIC tumours (rim, necrotic core, oedema) on REAL "
               "anatomy (MNI152 2009 templates from nilearn), T1/T2/FLAIR, simulated scanners; "
               "the mask is the tumour, not the oedema")
OPTIONS = {"profile": None, "patients": 40, "test_patients": 10, "seed": 0}
TUMOUR_COUNTS = (1, 1, 1, 2, 2, 3)  # tumours in a patient who has any: mostly one


def _int_option(opts: dict[str, Any], key: str, minimum: int) -> int:
    value = opts.get(key, OPTIONS[key])
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"dataset kind 'anatomy': option {key} must be an integer >= {minimum}, "
                        f"got {value!r}")
    return value


def generate_patients(site: AnatomySite, count: int, seed: int, image_size: int,
                      pool: str = "p") -> VolumeSet:
    """`count` patients of `site` scanned by its scanner, ids `<site>-<pool>0001`...; patient i
    depends only on (site, seed, pool, i, image_size)."""
    template = tissue_template(image_size)
    site_key = zlib.crc32(site.name.encode())
    images = torch.empty(count, len(CHANNELS), *(image_size,) * 3)
    masks = torch.zeros(count, 1, *(image_size,) * 3, dtype=torch.uint8)
    for i in range(count):
        rng = np.random.default_rng([seed, site_key, ord(pool), i])
        tissues = deform(template.tissues, template.spacing_mm, rng)
        draw = rng.random()
        ill = i == 0 or (i != 1 and draw < site.prevalence)  # both kinds in every pool
        count_tumours = int(rng.choice(TUMOUR_COUNTS)) if ill else 0
        tumours = grow_tumours(tissues, template.spacing_mm, count_tumours,
                               (site.lesion_min_mm, site.lesion_max_mm), rng)
        clean = sequences(tissues, tumours, rng)
        images[i] = scan(clean, tissues.sum(0), site, rng)
        masks[i, 0] = tumours.mask.to(torch.uint8)
    patients = tuple(f"{site.name}-{pool}{i + 1:04d}" for i in range(count))
    return VolumeSet(images, masks, patients, (template.spacing_mm,) * 3, CHANNELS)


def load_anatomy(spec: DatasetSpec) -> dict[str, VolumeSet]:
    """One hospital's patients split by patient: "train" and "val" from the pool
    (`spec.val_fraction`, `spec.split_seed`) and "test" (separate new patients, if any)."""
    opts = dict(spec.options)
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise DataError(f"dataset kind 'anatomy': unknown option(s) {', '.join(unknown)}; "
                        f"accepted: {', '.join(OPTIONS)}")
    profile = opts.get("profile")
    site = AnatomySite.from_dict(profile) if profile is not None else DEFAULT_SITES[0]
    count = _int_option(opts, "patients", 2)
    test_count = _int_option(opts, "test_patients", 0)
    seed = _int_option(opts, "seed", 0)
    pool = generate_patients(site, count, seed, spec.image_size)
    train, val = pool.split_by_patient(spec.val_fraction, spec.split_seed)
    splits = {"train": train, "val": val}
    if test_count:
        splits["test"] = generate_patients(site, test_count, seed, spec.image_size, pool="t")
    return splits
