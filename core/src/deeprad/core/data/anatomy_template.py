"""The real anatomy under the anatomy benchmark: the MNI152 2009 (ICBM 152 nonlinear symmetric
09a) T1, grey- and white-matter templates that nilearn's wheel ships, as tissue fractions on the
study's cube.

The files are read with nibabel straight from the installed nilearn package, exactly what
`nilearn.datasets.load_mni152_{,gm_,wm_}template()` return at 1 mm (uint8 scaled to [0, 1];
tests/unit/test_anatomy.py checks that), because importing nilearn.datasets and its 2 mm
resampling cost about 5 s in every worker process while this costs 0.1 s; the resampling to
the study's much coarser cube is done here anyway. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from deeprad.core.errors import DataError

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
MARGIN_MM = 4  # room around the brain's bounding box for the per-patient rotation and shift


@dataclass(frozen=True)
class TissueTemplate:
    """Tissue fractions [3, S, S, S] (grey matter, white matter, CSF; their sum is the brain,
    0 outside) in (D, H, W) = (inferior->superior, anterior->posterior, right->left) order (the
    layout `deeprad.core.data.volumes` gives hospital scans: DICOM's axial view), and the
    isotropic voxel size in mm."""

    tissues: torch.Tensor
    spacing_mm: float


def template_folder() -> Path:
    """Where the installed nilearn keeps its bundled MNI152 templates (nilearn is not imported)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset kind 'anatomy' needs nilearn (the MNI152 templates ship in its "
                        "wheel): pip install 'deeprad-core[ml]'")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def read_template(name: str) -> np.ndarray:
    """One 1 mm MNI152 template as float32 scaled to [0, 1], axes (x, y, z) in RAS."""
    import nibabel as nib

    path = template_folder() / TEMPLATE_FILES[name]
    if not path.is_file():
        raise DataError(f"MNI152 template {path} is missing: the anatomy benchmark needs "
                        "nilearn>=0.14,<0.15, whose wheel ships it")
    data = np.asarray(nib.Nifti1Image.from_filename(path).dataobj, dtype=np.float32)
    return data / data.max()


def ras_to_dhw(volume: torch.Tensor) -> torch.Tensor:
    """[..., x, y, z] on RAS voxel axes (x toward the right, y anterior, z superior, as the
    MNI152 files store them) -> [..., D, H, W] = (inferior->superior, anterior->posterior,
    right->left), the orientation of every volume a model sees (`volumes.AXES`): the benchmark
    and real scans must not be mirror images of each other."""
    return volume.transpose(-3, -1).flip(-2, -1)


@functools.lru_cache(maxsize=4)
def tissue_template(image_size: int) -> TissueTemplate:
    """The templates cropped to the brain's bounding box (plus a margin), padded to a cube and
    area-averaged to `image_size`^3 voxels; read once per process and size."""
    t1, gm, wm = (read_template(k) for k in ("t1", "gm", "wm"))
    brain = t1 > 0  # the template is skull-stripped: 0 outside the brain
    extent = [np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != k)))
              for k in range(3)]
    low = np.maximum([e[0] - MARGIN_MM for e in extent], 0)
    high = np.array([e[-1] + 1 + MARGIN_MM for e in extent])
    box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
    inside = brain[box].astype(np.float32)
    gm, wm = gm[box] * inside, wm[box] * inside
    csf = np.clip(inside - gm - wm, 0.0, 1.0)  # ventricles and sulci: brain that is no tissue
    edge = int((high - low).max())
    cube = np.zeros((3, edge, edge, edge), np.float32)
    start = [(edge - n) // 2 for n in inside.shape]
    place = tuple(slice(a, a + n) for a, n in zip(start, inside.shape, strict=True))
    for channel, tissue in enumerate((gm, wm, csf)):
        cube[channel][place] = tissue
    # Pooling before reorienting: it is 4x faster on the contiguous cube.
    small = F.adaptive_avg_pool3d(torch.from_numpy(cube)[None], image_size)[0]
    spacing_mm = edge / image_size  # the templates have 1 mm voxels
    return TissueTemplate(ras_to_dhw(small).contiguous(), spacing_mm)
