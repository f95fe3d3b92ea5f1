"""A hospital's own 3D studies, read from a site folder (`DatasetSpec(kind="volumes")`).

Folder format (one site)::

    <site>/
      splits.json            optional: {"<patient>": "train" | "val" | "test", ...}
      <patient>/             the folder name is the patient id
        <sequence>.nii.gz    one entry per sequence (MR contrast): a NIfTI file (.nii / .nii.gz)
        <sequence>/          ... or a DICOM series folder (one file per slice)
        mask.nii.gz          the lesion mask (NIfTI, nonzero = lesion) on the same anatomy
      <patient>/             a patient with several scans (e.g. follow-ups):
        <scan>/              one folder per scan, each laid out as above
          <sequence>..., mask.nii.gz

Every scan must hold the same sequences (their names are read from the files; or choose and
order them with `options["sequences"]`). Each volume is turned to one orientation (D, H, W) =
(inferior->superior, anterior->posterior, right->left, DICOM's axial view), resampled to the
study cube `image_size`^3 (masks with nearest neighbour) and scaled per `options["normalize"]`:
"image" (each sequence of each scan to [0, 1]), "dataset" (one min-max per sequence over the
site's TRAINING patients, applied to every split, so test patients never shape preprocessing)
or "none". Splits are by patient, never by scan; see `deeprad.core.data.patient_splits`.

Every scan of a site must cover the same field of view: its voxel size after resizing to the
cube (the `spacing`, used for mm distances such as HD95) may differ from the site's median by
at most `FIELD_OF_VIEW_TOLERANCE`. A volume may hold at most `volumeset.MAX_VOXELS` voxels, checked
on the header before any voxel is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, ResampleToMatch, Resize
from nibabel.spatialimages import SpatialImage

from deeprad.core.data.dicom_series import read_dicom_series
from deeprad.core.data.patient_splits import split_patients
from deeprad.core.data.volumeset import MAX_VOXELS, VolumeSet
from deeprad.core.errors import DataError
from deeprad.core.protocol import NORMALIZATIONS, DatasetSpec

MASK_NAMES = ("mask.nii.gz", "mask.nii")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# MONAI affines are RAS+; "LPS" axes give DICOM's axial view once reversed to (z, y, x).
AXES = "LPS"
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
# Largest relative difference between a scan's voxel size (after resizing) and the site median.
FIELD_OF_VIEW_TOLERANCE = 0.05


@dataclass(frozen=True)
class Scan:
    """One scan of one patient: its sequences (name -> NIfTI file or DICOM folder) and mask."""

    patient: str
    folder: Path
    sequences: dict[str, Path]
    mask: Path


def _mask_in(folder: Path) -> Path | None:
    return next((folder / n for n in MASK_NAMES if (folder / n).is_file()), None)


def _sequences_in(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.name in MASK_NAMES:
            continue
        suffix = next((s for s in NIFTI_SUFFIXES if entry.name.lower().endswith(s)), None)
        if entry.is_file() and suffix:
            name = entry.name[: -len(suffix)]
        elif entry.is_dir():
            name = entry.name
        else:
            continue
        if name in found:
            raise DataError(f"{folder}: sequence {name!r} twice ({found[name].name} and "
                            f"{entry.name}); keep one file or folder per sequence")
        found[name] = entry
    return found


def find_scans(site: Path) -> list[Scan]:
    """Every scan of every patient in a site folder (format in the module docstring)."""
    if not site.is_dir():
        raise DataError(f"volumes dataset folder {site} does not exist")
    scans: list[Scan] = []
    for patient in sorted(p for p in site.iterdir() if p.is_dir() and not p.name.startswith(".")):
        mask = _mask_in(patient)
        if mask is not None:
            scans.append(Scan(patient.name, patient, _sequences_in(patient), mask))
            continue
        subs = sorted(p for p in patient.iterdir() if p.is_dir() and not p.name.startswith("."))
        scan_dirs = [s for s in subs if _mask_in(s) is not None]
        if not scan_dirs or len(scan_dirs) != len(subs):
            lacking = patient if not scan_dirs else next(s for s in subs if s not in scan_dirs)
            raise DataError(f"volumes {site}: patient {patient.name} has no lesion mask in "
                            f"{lacking} (put mask.nii.gz beside each scan's sequences)")
        scans += [Scan(patient.name, s, _sequences_in(s), _mask_in(s) or s) for s in scan_dirs]
    if not scans:
        raise DataError(f"volumes dataset folder {site}: no patient folders (expected "
                        "<site>/<patient>/<sequence>.nii.gz or <sequence>/ DICOM + mask.nii.gz)")
    return scans


def _sequence_names(scans: list[Scan], chosen: list[str] | None) -> list[str]:
    """The sequences every scan holds, in channel order; one line naming the odd scan out."""
    names = list(chosen) if chosen else sorted(scans[0].sequences)
    if not names:
        raise DataError(f"volumes: patient {scans[0].patient} ({scans[0].folder}) has a mask "
                        "but no sequences")
    for scan in scans:
        missing = [n for n in names if n not in scan.sequences]
        if missing:
            raise DataError(f"volumes: patient {scan.patient} ({scan.folder}) lacks sequence "
                            f"{missing[0]!r} (has {', '.join(sorted(scan.sequences)) or 'none'}); "
                            "every patient needs the same sequences")
        extra = sorted(set(scan.sequences) - set(names))
        if extra and not chosen:
            raise DataError(f"volumes: patient {scan.patient} ({scan.folder}) has sequence "
                            f"{extra[0]!r} that patient {scans[0].patient} lacks; give every "
                            "patient the same sequences or choose them with options.sequences")
    return names


def _read(path: Path, patient: str) -> MetaTensor:
    """A NIfTI file or DICOM series folder as a channel-first MetaTensor with its RAS affine."""
    if path.is_dir():
        series = read_dicom_series(path)
        if series.patient_id and series.patient_id != patient:
            raise DataError(f"{path}: DICOM PatientID {series.patient_id!r} differs from the "
                            f"patient folder name {patient!r}; rename the folder to the "
                            "PatientID (or move the series to its patient)")
        return MetaTensor(torch.from_numpy(series.voxels)[None],
                          affine=torch.from_numpy(series.affine))
    try:
        image = nib.load(str(path))
        if not isinstance(image, SpatialImage):
            raise TypeError(f"a {type(image).__name__}, not an image with an affine")
        shape = tuple(int(n) for n in image.header.get_data_shape())
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise DataError(f"{path}: cannot read NIfTI ({exc})") from exc
    if int(np.prod(shape, dtype=np.float64)) > MAX_VOXELS:
        raise DataError(f"{path}: header declares shape {shape}, over the limit of {MAX_VOXELS} "
                        "voxels per volume; crop or downsample it before loading")
    try:
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise DataError(f"{path}: cannot read NIfTI ({exc})") from exc
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {data.shape}; store one "
                        "sequence per file")
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(data))[None],
                      affine=torch.as_tensor(image.affine, dtype=torch.float64))


def _same_grid(a: MetaTensor, b: MetaTensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.affine.double(), b.affine.double(), atol=1e-3)


def _oriented(volume: MetaTensor) -> MetaTensor:
    """Axes turned (an exact permutation/flip) so that, reversed, they read (D, H, W)."""
    oriented = Orientation(axcodes=AXES, labels=RAS_LABELS)(volume)
    assert isinstance(oriented, MetaTensor)
    return oriented


def _to_cube(volume: MetaTensor, size: int, mode: str) -> tuple[torch.Tensor, np.ndarray]:
    """An oriented volume resized to size^3 as (D, H, W); also its new voxel size (D, H, W)."""
    voxel = np.sqrt((volume.affine[:3, :3].double().numpy() ** 2).sum(0))
    old = np.asarray(volume.shape[1:], dtype=float)
    cube = Resize((size, size, size), mode=mode, anti_aliasing=mode != "nearest")(volume)
    # A plain tensor: MetaTensor's bookkeeping would follow the volumes into training.
    plain = cube.as_tensor() if isinstance(cube, MetaTensor) else torch.as_tensor(cube)
    zyx = plain.permute(0, 3, 2, 1).contiguous()
    return zyx, (voxel * old / size)[::-1]


def load_scan(scan: Scan, sequences: list[str], size: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                     np.ndarray]:
    """(images [C, S, S, S], mask [1, S, S, S] uint8, voxel size mm) of one scan; a sequence
    on another grid than the mask is first resampled onto the mask's grid."""
    mask = _read(scan.mask, scan.patient)
    mask = _oriented(MetaTensor((mask.as_tensor() > 0).float(), affine=mask.affine))
    channels = []
    for name in sequences:
        volume = _oriented(_read(scan.sequences[name], scan.patient))
        if not _same_grid(volume, mask):
            resampled = ResampleToMatch(mode="bilinear", padding_mode="border")(volume, mask)
            assert isinstance(resampled, MetaTensor)
            volume = resampled
        channels.append(_to_cube(volume, size, "trilinear")[0])
    labels, spacing = _to_cube(mask, size, "nearest")
    return torch.cat(channels).float(), (labels > 0.5).to(torch.uint8), spacing


def _min_max(images: torch.Tensor, reference: torch.Tensor,
             dims: tuple[int, ...]) -> torch.Tensor:
    """[N, C, D, H, W] images scaled per sequence (channel) by `reference`'s min and max."""
    low = reference.amin(dim=dims, keepdim=True)
    return (images - low) / (reference.amax(dim=dims, keepdim=True) - low).clamp_min(1e-12)


def _common_spacing(scans: list[Scan], spacings: list[np.ndarray]) -> tuple[float, float, float]:
    """The site's voxel size (median over scans); refuses scans of another field of view,
    whose mm distances would be off by more than `FIELD_OF_VIEW_TOLERANCE`."""
    median = np.median(np.stack(spacings), axis=0)
    for scan, spacing in zip(scans, spacings, strict=True):
        if np.any(np.abs(spacing - median) > FIELD_OF_VIEW_TOLERANCE * median):
            raise DataError(f"volumes: patient {scan.patient} ({scan.folder}) has voxel size "
                            f"{np.round(spacing, 3).tolist()} mm after resizing, over "
                            f"{FIELD_OF_VIEW_TOLERANCE:.0%} off the site's "
                            f"{np.round(median, 3).tolist()} mm; crop or pad the scans to one "
                            "field of view")
    return float(median[0]), float(median[1]), float(median[2])


def dataset_scaled(splits: dict[str, VolumeSet]) -> dict[str, VolumeSet]:
    """Every split min-max scaled per sequence with the TRAINING split's range (test and
    validation values may fall outside [0, 1]); the statistics never see held-out patients."""
    train = splits["train"].images
    return {name: replace(part, images=_min_max(part.images, train, dims=(0, 2, 3, 4)))
            for name, part in splits.items()}


def read_site(spec: DatasetSpec) -> VolumeSet:
    """Every scan of a site folder as one VolumeSet (all patients, before any split). With
    normalize="dataset" the images are returned unscaled: that scaling needs the training split
    (`load_volumes` applies it)."""
    if not spec.path:
        raise DataError("dataset kind 'volumes' needs a path: the site folder")
    opts: dict[str, Any] = dict(spec.options)
    normalize = str(opts.get("normalize", "image"))
    if normalize not in NORMALIZATIONS:
        raise DataError(f"dataset option normalize={normalize!r}: use one of "
                        f"{', '.join(NORMALIZATIONS)}")
    chosen = opts.get("sequences")
    if chosen is not None and (not isinstance(chosen, list) or not chosen
                               or not all(isinstance(s, str) for s in chosen)):
        raise DataError(f"dataset option sequences={chosen!r}: give a list of sequence names, "
                        "e.g. [\"t1\", \"flair\"]")
    scans = find_scans(Path(spec.path))
    names = _sequence_names(scans, chosen)
    loaded = [load_scan(scan, names, spec.image_size) for scan in scans]
    images = torch.stack([images for images, _, _ in loaded])
    if normalize == "image":
        images = _min_max(images, images, dims=(2, 3, 4))
    spacing = _common_spacing(scans, [s for _, _, s in loaded])
    return VolumeSet(images, torch.stack([mask for _, mask, _ in loaded]),
                     tuple(scan.patient for scan in scans), spacing, tuple(names))


def load_volumes(spec: DatasetSpec) -> dict[str, VolumeSet]:
    """A site folder's patient-level splits {"train", "val", "test"} (no patient in two)."""
    splits = split_patients(read_site(spec), spec, Path(spec.path or "."))
    if dict(spec.options).get("normalize") == "dataset" and len(splits["train"]):
        return dataset_scaled(splits)
    return splits
