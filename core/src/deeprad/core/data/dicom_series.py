"""Assemble a folder of single-frame DICOM files (one file per slice, as PACS exports them) into a
volume. Slices are ordered by where they lie along the slice normal, never by file name or
InstanceNumber (both are routinely wrong after anonymisation or re-export), and a series with
gaps or irregular spacing is refused rather than silently stretched."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from deeprad.core.data.volumeset import MAX_VOXELS
from deeprad.core.errors import DataError

# A slice step may deviate this much (relative) from the series' median step before the series
# counts as irregular; a missing slice shows up as a step of about twice the median.
SPACING_TOLERANCE = 0.1
# DICOM patient coordinates are LPS+; NIfTI/MONAI affines are RAS+: flip x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SKIPPED_NAMES = {"DICOMDIR"}
# The most files a series folder may hold: every header is read before any pixel, so a folder of
# millions of files is refused up front. Rows x Columns x slices is bounded by MAX_VOXELS.
MAX_SLICES = 2048
REQUIRED_TAGS = ("SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient",
                 "PixelSpacing", "Rows", "Columns")


@dataclass(frozen=True)
class DicomSeries:
    """`voxels` float32 [D, H, W]: slices ordered along the slice normal (D), rows (H), columns
    (W), rescaled to real values (RescaleSlope/Intercept). `spacing` mm in the same order.
    `affine` maps voxel indices (d, h, w) to RAS+ mm, as NIfTI and MONAI expect."""

    voxels: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    patient_id: str
    series_uid: str


def _read_header(path: Path) -> pydicom.Dataset:
    try:
        # Pixel data stays on disk until a slice of the chosen series asks for it.
        return pydicom.dcmread(path, defer_size="4 KB")
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable DICOM file ({exc}); a series folder holds only "
                        "the series' DICOM files") from exc


def _series_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"DICOM series folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.name not in SKIPPED_NAMES)
    if not files:
        raise DataError(f"DICOM series folder {folder}: no files")
    if len(files) > MAX_SLICES:
        raise DataError(f"DICOM series folder {folder}: {len(files)} files, over the limit of "
                        f"{MAX_SLICES} slices per series; keep one series per folder")
    return files


def _group_by_series(folder: Path, series_uid: str | None) -> list[tuple[Path, Any]]:
    by_uid: dict[str, list[tuple[Path, Any]]] = {}
    for path in _series_files(folder):
        ds = _read_header(path)
        missing = [tag for tag in REQUIRED_TAGS if tag not in ds]
        if missing:
            raise DataError(f"{path}: DICOM file lacks {', '.join(missing)}; only image slices "
                            "with patient geometry can be assembled into a volume")
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise DataError(f"{path}: multi-frame (enhanced) DICOM is not supported; export the "
                            "series as classic single-frame files")
        by_uid.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    if series_uid is not None:
        if series_uid not in by_uid:
            raise DataError(f"DICOM folder {folder}: no series {series_uid}; it holds "
                            f"{', '.join(sorted(by_uid))}")
        return by_uid[series_uid]
    if len(by_uid) > 1:
        raise DataError(f"DICOM folder {folder} holds {len(by_uid)} series "
                        f"({', '.join(sorted(by_uid))}): keep one series per folder or name the "
                        "SeriesInstanceUID to read")
    return next(iter(by_uid.values()))


def _same(values: Sequence[Any], what: str, folder: Path, tol: float = 1e-4) -> np.ndarray:
    first = np.asarray(values[0], dtype=np.float64)
    for value in values[1:]:
        if not np.allclose(np.asarray(value, dtype=np.float64), first, atol=tol):
            raise DataError(f"DICOM series {folder}: {what} differs between slices "
                            f"({list(first)} vs {list(np.asarray(value, dtype=float))}); a "
                            "volume needs one geometry for every slice")
    return first


def _slice_step(positions: np.ndarray, folder: Path, tolerance: float) -> float:
    """The distance between neighbouring slices, refusing duplicates, gaps and irregular steps."""
    steps = np.diff(positions)
    if np.any(steps < 1e-3):
        at = float(positions[1:][steps < 1e-3][0])
        raise DataError(f"DICOM series {folder}: two slices at the same position ({at:.2f} mm "
                        "along the normal); split echoes/phases into separate series folders")
    step = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - step) > tolerance * step)
    if bad.size:
        k = int(bad[0])
        gap = float(steps[k])
        kind = "a missing slice" if gap > step else "an irregular step"
        raise DataError(f"DICOM series {folder}: {kind} between positions "
                        f"{positions[k]:.2f} and {positions[k + 1]:.2f} mm (step {gap:.2f} mm, "
                        f"usual {step:.2f} mm); re-export the complete series")
    return step


def _pixels(path: Path, ds: Any) -> np.ndarray:
    try:
        arr = np.asarray(ds.pixel_array, dtype=np.float32)
    except Exception as exc:  # pydicom raises many types for unsupported/corrupt pixel data
        raise DataError(f"{path}: cannot decode pixel data ({exc}); export uncompressed or "
                        "with a transfer syntax pydicom reads without plugins") from exc
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return arr * slope + intercept


def read_dicom_series(folder: Path, series_uid: str | None = None,
                      tolerance: float = SPACING_TOLERANCE) -> DicomSeries:
    """One DICOM series folder as a volume; refuses several series (unless `series_uid` names
    one), mixed geometry, duplicate or missing slices and irregular spacing."""
    folder = Path(folder)
    slices = _group_by_series(folder, series_uid)
    if len(slices) < 2:
        raise DataError(f"DICOM series {folder}: {len(slices)} slice; a volume needs at least 2")
    headers = [ds for _, ds in slices]
    orientation = _same([ds.ImageOrientationPatient for ds in headers],
                        "ImageOrientationPatient", folder)
    pixel = _same([ds.PixelSpacing for ds in headers], "PixelSpacing", folder)
    rows_cols = _same([(ds.Rows, ds.Columns) for ds in headers], "Rows/Columns", folder, tol=0)
    voxel_count = int(rows_cols[0]) * int(rows_cols[1]) * len(headers)
    if voxel_count > MAX_VOXELS:
        raise DataError(f"DICOM series {folder}: {len(headers)} slices of {int(rows_cols[0])} x "
                        f"{int(rows_cols[1])} = {voxel_count} voxels, over the limit of "
                        f"{MAX_VOXELS} per volume; crop or downsample the series before loading")
    row_dir, col_dir = orientation[:3], orientation[3:]  # along a row (columns), down a column
    normal = np.cross(row_dir, col_dir)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise DataError(f"DICOM series {folder}: ImageOrientationPatient {list(orientation)} "
                        "is not two orthogonal unit vectors")
    where = np.array([float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float)))
                      for ds in headers])
    order = np.argsort(where)
    positions = where[order]
    step = _slice_step(positions, folder, tolerance)
    first = np.asarray(headers[order[0]].ImagePositionPatient, dtype=np.float64)
    last = np.asarray(headers[order[-1]].ImagePositionPatient, dtype=np.float64)
    travel = last - first
    if np.linalg.norm(np.cross(travel, normal)) > tolerance * step * len(order):
        raise DataError(f"DICOM series {folder}: slices are offset within their plane (gantry "
                        "tilt or a sheared stack); resample it to an orthogonal grid first")
    patient_ids = {str(getattr(ds, "PatientID", "") or "") for ds in headers}
    if len(patient_ids) > 1:
        raise DataError(f"DICOM series {folder}: slices from several patients "
                        f"({', '.join(sorted(patient_ids))}); one patient per series")
    voxels = np.stack([_pixels(slices[int(k)][0], slices[int(k)][1]) for k in order])
    row_spacing, col_spacing = float(pixel[0]), float(pixel[1])
    lps = np.eye(4)
    lps[:3, 0] = travel / (len(order) - 1)  # d: one slice along the stack
    lps[:3, 1] = col_dir * row_spacing  # h: one row down
    lps[:3, 2] = row_dir * col_spacing  # w: one column across
    lps[:3, 3] = first
    return DicomSeries(voxels=voxels.astype(np.float32),
                       spacing=(step, row_spacing, col_spacing),
                       affine=LPS_TO_RAS @ lps, patient_id=patient_ids.pop(),
                       series_uid=str(headers[0].SeriesInstanceUID))
