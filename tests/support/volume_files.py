"""Test support: write volumes to disk the way a hospital holds them — one NIfTI file per
sequence, or a DICOM series folder per sequence (one file per slice, shuffled file names), with
the lesion mask as NIfTI — in the site layout `deeprad.core.data.volumes` reads.

Volume arrays are (D, H, W) = (inferior->superior, anterior->posterior, right->left), the
layout `deeprad.core.data.volumes` returns and the anatomy benchmark generates.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import torch
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from deeprad.core.data.volumeset import VolumeSet

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # DICOM's standard axial ImageOrientationPatient (LPS)


def synthetic_volumes(patients: int, size: int = 16, channels: Sequence[str] = ("t1", "t2"),
                      scans_per_patient: int = 1, seed: int = 0,
                      spacing: tuple[float, float, float] = (3.0, 2.0, 2.5)) -> VolumeSet:
    """SYNTHETIC test volumes: smooth noise plus a bright ball on every other patient."""
    gen = torch.Generator().manual_seed(seed)
    n = patients * scans_per_patient
    images = torch.nn.functional.avg_pool3d(
        torch.rand(n, len(channels), size, size, size, generator=gen), 3, 1, 1)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3,
                                      indexing="ij"))
    masks = torch.zeros(n, 1, size, size, size, dtype=torch.uint8)
    ids = []
    for i in range(n):
        patient = i // scans_per_patient
        ids.append(f"p{patient:02d}")
        if patient % 2:
            centre = torch.randint(size // 4, 3 * size // 4, (3, 1, 1, 1), generator=gen)
            ball = ((grid - centre) ** 2).sum(0) <= (size / 6) ** 2
            masks[i, 0] = ball.to(torch.uint8)
            images[i, :, ball] += torch.linspace(0.5, 1.0, len(channels))[:, None]
    return VolumeSet(images.float(), masks, tuple(ids), spacing, tuple(channels))


def write_nifti_volume(path: Path, voxels: np.ndarray, spacing: Sequence[float],
                       ras_layout: bool = False) -> None:
    """Write (D, H, W) voxels as NIfTI. The default stores them as DICOM-like LPS axes; with
    `ras_layout` the array is flipped to RAS axes (same anatomy, another storage order), as
    many tools write it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sd, sh, sw = (float(s) for s in spacing)
    xyz = np.ascontiguousarray(np.asarray(voxels).transpose(2, 1, 0))  # x: toward L, y: P, z: S
    affine = np.diag([-sw, -sh, sd, 1.0])
    if ras_layout:
        xyz = np.ascontiguousarray(xyz[::-1, ::-1, :])
        affine = np.diag([sw, sh, sd, 1.0])
        affine[0, 3] = -sw * (xyz.shape[0] - 1)
        affine[1, 3] = -sh * (xyz.shape[1] - 1)
    nib.save(nib.Nifti1Image(xyz, affine), str(path))


def write_dicom_series(folder: Path, voxels: np.ndarray, spacing: Sequence[float],
                       patient_id: str, *, orientation: Sequence[float] = AXIAL,
                       origin: Sequence[float] = (0.0, 0.0, 0.0), study_uid: str | None = None,
                       series_uid: str | None = None, seed: int = 0,
                       skip_slices: Sequence[int] = ()) -> str:
    """Write (D, H, W) voxels as one MR DICOM file per slice; file names and InstanceNumbers
    are shuffled (so neither orders the slices) and every slice has its own RescaleSlope /
    Intercept. Returns the SeriesInstanceUID."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    row_dir = np.asarray(orientation[:3], dtype=float)
    col_dir = np.asarray(orientation[3:], dtype=float)
    normal = np.cross(row_dir, col_dir)
    sd, sh, sw = (float(s) for s in spacing)
    depth = len(voxels)
    numbers = rng.permutation(depth) + 1
    for d in range(depth):
        if d in skip_slices:
            continue
        plane = np.asarray(voxels[d], dtype=np.float64)
        low, high = float(plane.min()), float(plane.max())
        slope = (high - low) / 4000.0 if high > low else 1.0
        stored = np.round((plane - low) / slope).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = pydicom.uid.MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{rng.integers(1 << 62):016x}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "MR"
        ds.PatientID = patient_id
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.InstanceNumber = int(numbers[d])
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + d * sd * normal]
        ds.PixelSpacing = [sh, sw]
        ds.SliceThickness = sd
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{low:.10g}"
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = stored.tobytes()
        ds.save_as(path, enforce_file_format=True)
    return series_uid


def write_site(root: Path, volumes: VolumeSet, dicom: bool = False, seed: int = 0,
               ras_layout: bool = False) -> None:
    """Write a VolumeSet as a hospital site folder: `<root>/<patient>/` per patient (with
    `scan-<k>/` sub-folders when a patient has several scans), each holding one `<sequence>`
    per channel (NIfTI file or DICOM series folder) and `mask.nii.gz` (`ras_layout`: NIfTI
    files stored along RAS axes instead of DICOM's LPS ones)."""
    channels = volumes.channels or tuple(f"seq{c}" for c in range(volumes.images.shape[1]))
    scans: dict[str, list[int]] = {}
    for i, patient in enumerate(volumes.patients):
        scans.setdefault(patient, []).append(i)
    for patient, rows in scans.items():
        study_uid = generate_uid()
        for k, i in enumerate(rows):
            folder = root / patient if len(rows) == 1 else root / patient / f"scan-{k + 1}"
            for c, name in enumerate(channels):
                voxels = volumes.images[i, c].numpy()
                if dicom:
                    write_dicom_series(folder / name, voxels, volumes.spacing, patient,
                                       study_uid=study_uid, seed=seed + 7919 * i + c)
                else:
                    write_nifti_volume(folder / f"{name}.nii.gz", voxels, volumes.spacing,
                                       ras_layout)
            write_nifti_volume(folder / "mask.nii.gz", volumes.masks[i, 0].numpy(),
                               volumes.spacing, ras_layout)
