"""Assembling DICOM series into volumes: slice order from geometry, rescale, spacing, refusals."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest

from deeprad.core.data import dicom_series
from deeprad.core.data.dicom_series import read_dicom_series
from deeprad.core.data.volumeset import MAX_VOXELS
from deeprad.core.errors import DataError
from tests.support.volume_files import write_dicom_series

pytestmark = pytest.mark.unit

SPACING = (3.0, 0.8, 0.9)  # between slices, between rows, between columns (mm)
# A double-oblique plane: rows tilted 30 degrees out of the axial plane, then turned 20 degrees.
_a, _b = np.radians(30), np.radians(20)
ROW = np.array([np.cos(_b), np.sin(_b), 0.0])
COL = np.array([-np.sin(_b) * np.cos(_a), np.cos(_b) * np.cos(_a), np.sin(_a)])
OBLIQUE = (*ROW, *COL)


def _voxels(depth: int = 9, rows: int = 7, cols: int = 6) -> np.ndarray:
    """Values 0..~1000 that differ on every slice, row and column, so any misorder shows."""
    d, h, w = np.meshgrid(np.arange(depth), np.arange(rows), np.arange(cols), indexing="ij")
    return (100.0 * d + 10.0 * h + w + 0.25 * np.sin(d + h * w)).astype(np.float32)


def test_slices_sorted_by_position_along_an_oblique_normal(tmp_path: Path) -> None:
    voxels = _voxels()
    origin = (-40.0, 12.5, 77.0)
    write_dicom_series(tmp_path, voxels, SPACING, "anon-17", orientation=OBLIQUE, origin=origin,
                       seed=3)
    normal = np.cross(ROW, COL)
    # The writer shuffled names: sorting files by name would scramble the slices.
    by_name = [float(np.dot(normal, pydicom.dcmread(p).ImagePositionPatient))
               for p in sorted(tmp_path.iterdir())]
    assert by_name != sorted(by_name)

    series = read_dicom_series(tmp_path)

    assert series.voxels.shape == voxels.shape and series.voxels.dtype == np.float32
    # Stored as uint16 with a per-slice slope of (max-min)/4000: within half a step.
    assert np.abs(series.voxels - voxels).max() <= 0.5 * np.ptp(voxels, axis=(1, 2)).max() / 4000
    assert series.spacing == pytest.approx(SPACING)
    assert series.patient_id == "anon-17"
    # The affine puts voxel (d, h, w) where the writer put it (RAS = LPS with x, y negated).
    d, h, w = 4, 2, 5
    lps = np.asarray(origin) + d * SPACING[0] * normal + h * SPACING[1] * COL + w * SPACING[2] * ROW
    ras = series.affine @ np.array([d, h, w, 1.0])
    assert ras[:3] == pytest.approx(lps * np.array([-1, -1, 1]), abs=1e-6)


def test_rescale_slope_and_intercept_give_real_values(tmp_path: Path) -> None:
    voxels = _voxels(depth=3) - 500.0  # negative values only survive uint16 through the intercept
    write_dicom_series(tmp_path, voxels, SPACING, "p1")
    series = read_dicom_series(tmp_path)
    assert series.voxels.min() == pytest.approx(voxels.min(), abs=0.2)
    assert series.voxels.max() == pytest.approx(voxels.max(), abs=0.2)


def test_two_series_in_one_folder_are_refused_unless_one_is_named(tmp_path: Path) -> None:
    first = write_dicom_series(tmp_path, _voxels(depth=4), SPACING, "p1", seed=1)
    second = write_dicom_series(tmp_path, _voxels(depth=5), SPACING, "p1", seed=2)
    with pytest.raises(DataError) as err:
        read_dicom_series(tmp_path)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path) in message
    assert first in message and second in message
    assert read_dicom_series(tmp_path, series_uid=second).voxels.shape[0] == 5


def test_a_missing_slice_is_refused(tmp_path: Path) -> None:
    write_dicom_series(tmp_path, _voxels(), SPACING, "p1", skip_slices=[4])
    with pytest.raises(DataError, match=r"missing slice between positions 9\.00 and 15\.00 mm"):
        read_dicom_series(tmp_path)


def test_mixed_geometry_and_foreign_files_are_refused(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "mixed", _voxels(depth=4), SPACING, "p1", series_uid="1.2.3")
    write_dicom_series(tmp_path / "mixed", _voxels(depth=4, cols=5), SPACING, "p1",
                       series_uid="1.2.3", origin=(0, 0, 100.0), seed=9)
    with pytest.raises(DataError, match="Rows/Columns differs between slices"):
        read_dicom_series(tmp_path / "mixed")
    write_dicom_series(tmp_path / "junk", _voxels(depth=3), SPACING, "p1")
    (tmp_path / "junk" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.txt: not a readable DICOM file"):
        read_dicom_series(tmp_path / "junk")


def test_a_series_declaring_huge_slices_is_refused_before_decoding(tmp_path: Path) -> None:
    """Attack: slices whose Rows x Columns declare 65535^2 pixels each (2 slices: 8.6e9 voxels,
    34 GB as float32) over a few bytes of pixel data. The headers alone refuse the series: the
    peak of Python/numpy allocations stays under 16 MB, so no pixel array was built."""
    write_dicom_series(tmp_path, _voxels(depth=2), SPACING, "p1")
    for path in tmp_path.iterdir():
        ds = pydicom.dcmread(path)
        ds.Rows, ds.Columns = 65535, 65535
        ds.save_as(path)
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as err:
            read_dicom_series(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(err.value)
    assert "2 slices of 65535 x 65535" in message and f"limit of {MAX_VOXELS}" in message
    assert "\n" not in message and peak < 16_000_000, peak


def test_a_folder_of_too_many_files_is_refused_before_reading_any(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: a folder of millions of files (every header would be parsed). With the cap set to
    4, five files that are not even DICOM are refused for their number, proving that no header
    was read (reading one would fail with 'not a readable DICOM file')."""
    monkeypatch.setattr(dicom_series, "MAX_SLICES", 4)
    for k in range(5):
        (tmp_path / f"{k}.dcm").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"5 files, over the limit of 4 slices per series"):
        read_dicom_series(tmp_path)
