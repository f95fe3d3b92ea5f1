"""Hospital volume folders (NIfTI / DICOM series + NIfTI masks) -> VolumeSets split by patient."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from deeprad.core.data.loaders import load_dataset, load_split
from deeprad.core.data.patient_splits import split_patients
from deeprad.core.data.volumes import load_volumes, read_site
from deeprad.core.data.volumeset import VolumeSet
from deeprad.core.errors import DataError
from deeprad.core.protocol import DatasetSpec
from tests.support.volume_files import synthetic_volumes, write_nifti_volume, write_site

pytestmark = pytest.mark.unit


def _spec(site: Path, size: int = 16, **options: object) -> DatasetSpec:
    return DatasetSpec(kind="volumes", path=str(site), image_size=size, options=dict(options))


def _refusal(site: Path, **options: object) -> str:
    with pytest.raises(DataError) as err:
        read_site(_spec(site, **options))
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("layout", ["nifti", "nifti-ras", "dicom", "dicom-ras-mask"])
def test_round_trip_gives_the_same_voxels(tmp_path: Path, layout: str) -> None:
    original = synthetic_volumes(3, size=16, channels=("t1", "t2", "flair"))
    write_site(tmp_path, original, dicom=layout.startswith("dicom"), ras_layout="ras" in layout)

    got = read_site(_spec(tmp_path, normalize="none"))

    assert got.patients == original.patients and got.channels == ("flair", "t1", "t2")
    assert type(got.images) is torch.Tensor and type(got.masks) is torch.Tensor
    order = [original.channels.index(c) for c in got.channels]
    # DICOM stores 4000 grey levels per slice; NIfTI float32 is exact.
    assert torch.allclose(got.images, original.images[:, order], atol=1e-3)
    assert torch.equal(got.masks, original.masks) and got.masks.dtype == torch.uint8
    assert got.spacing == pytest.approx(original.spacing)


def test_volumes_are_resampled_to_the_study_cube(tmp_path: Path) -> None:
    original = synthetic_volumes(2, size=24, channels=("t1",))
    write_site(tmp_path, original, dicom=True)

    got = read_site(_spec(tmp_path, size=16, normalize="none"))

    assert got.images.shape == (2, 1, 16, 16, 16) and got.masks.shape == (2, 1, 16, 16, 16)
    assert got.spacing == pytest.approx(tuple(s * 24 / 16 for s in original.spacing))
    expected = torch.nn.functional.interpolate(original.images, size=(16,) * 3, mode="trilinear")
    assert (got.images - expected).abs().mean() < 0.02
    lesion = torch.nn.functional.interpolate(original.masks.float(), size=(16,) * 3)
    overlap = 2 * (lesion * got.masks).sum() / (lesion.sum() + got.masks.sum())
    assert overlap > 0.8


def test_a_sequence_on_another_grid_is_resampled_onto_the_mask(tmp_path: Path) -> None:
    # Both sequences hold the same function of position: 1 per 100 mm along W.
    ramp = np.broadcast_to(np.arange(16, dtype=np.float32) * 2.0 / 100, (16, 16, 16)).copy()
    write_nifti_volume(tmp_path / "p00" / "t1.nii.gz", ramp, (2.0, 2.0, 2.0))
    # t2 covers the same anatomy at half the resolution (8^3 voxels of 4 mm).
    coarse = np.broadcast_to(np.arange(8, dtype=np.float32) * 4.0 / 100, (8, 8, 8)).copy()
    write_nifti_volume(tmp_path / "p00" / "t2.nii.gz", coarse, (4.0, 4.0, 4.0))
    write_nifti_volume(tmp_path / "p00" / "mask.nii.gz", np.zeros((16, 16, 16), np.uint8),
                       (2.0, 2.0, 2.0))

    got = read_site(_spec(tmp_path, normalize="none"))

    t1, t2 = got.images[0]
    assert torch.allclose(t1, torch.from_numpy(ramp))
    # Linear interpolation of a linear ramp is exact inside the coarse grid (voxel centres
    # 0..28 mm); beyond it the border value is repeated.
    assert torch.allclose(t2[..., :15], t1[..., :15], atol=1e-5)


def test_no_patient_in_two_splits_even_with_several_scans(tmp_path: Path) -> None:
    original = synthetic_volumes(10, size=8, channels=("t1",), scans_per_patient=2)
    write_site(tmp_path, original)
    assert (tmp_path / "p03" / "scan-2" / "t1.nii.gz").is_file()
    site = read_site(_spec(tmp_path, size=8))
    assert site.patients == original.patients  # both scans of each patient, under its id
    test_sets = set()
    for seed in range(6):
        spec = DatasetSpec(kind="volumes", path=str(tmp_path), image_size=8, val_fraction=0.25,
                           split_seed=seed, options={"test_fraction": 0.2})
        splits = split_patients(site, spec, tmp_path)
        patients = {name: set(s.patients) for name, s in splits.items()}
        assert all(patients.values())
        assert not patients["train"] & patients["val"]
        assert not patients["train"] & patients["test"]
        assert not patients["val"] & patients["test"]
        assert set.union(*patients.values()) == set(original.patients)
        # Both scans of every patient went with it.
        assert sum(len(s) for s in splits.values()) == 20
        assert all(s.patients.count(p) == 2 for s in splits.values() for p in s.patients)
        test_sets.add(tuple(sorted(patients["test"])))
    # The test patients do not move when only the validation split's seed changes.
    assert len(test_sets) == 1
    moved = split_patients(site, _spec(tmp_path, size=8, test_seed=5), tmp_path)["test"]
    assert tuple(sorted(set(moved.patients))) not in test_sets


def test_loaders_serve_train_val_and_test_of_a_site(tmp_path: Path) -> None:
    write_site(tmp_path, synthetic_volumes(10, size=8, channels=("t1", "t2")))
    spec = DatasetSpec(kind="volumes", path=str(tmp_path), image_size=8, val_fraction=0.25)
    train, val = load_dataset(spec)
    test = load_split(spec, "test")
    assert isinstance(train, VolumeSet) and isinstance(val, VolumeSet)
    assert isinstance(test, VolumeSet)
    assert (len(train), len(val), len(test)) == (6, 2, 2)
    assert train.positives and val.positives and test.positives  # stratified by lesion


def test_a_missing_sequence_or_mask_is_refused(tmp_path: Path) -> None:
    write_site(tmp_path, synthetic_volumes(3, size=8, channels=("t1", "t2")))
    (tmp_path / "p01" / "t2.nii.gz").unlink()
    message = _refusal(tmp_path)
    assert "patient p01" in message and "lacks sequence 't2'" in message
    # Choosing the sequences that every patient has is the fix.
    assert read_site(_spec(tmp_path, size=8, sequences=["t1"])).channels == ("t1",)

    shutil.copy(tmp_path / "p00" / "t1.nii.gz", tmp_path / "p02" / "dwi.nii.gz")
    (tmp_path / "p01" / "t2.nii.gz").write_bytes((tmp_path / "p00" / "t2.nii.gz").read_bytes())
    assert "patient p02" in _refusal(tmp_path) and "'dwi'" in _refusal(tmp_path)

    (tmp_path / "p02" / "dwi.nii.gz").unlink()
    (tmp_path / "p02" / "mask.nii.gz").unlink()
    message = _refusal(tmp_path)
    assert "patient p02 has no lesion mask" in message


def test_a_scan_without_mask_is_refused(tmp_path: Path) -> None:
    write_site(tmp_path, synthetic_volumes(2, size=8, channels=("t1",), scans_per_patient=2))
    (tmp_path / "p01" / "scan-2" / "mask.nii.gz").unlink()
    message = _refusal(tmp_path)
    assert "patient p01 has no lesion mask in" in message and "scan-2" in message


def test_dicom_patient_id_must_match_the_patient_folder(tmp_path: Path) -> None:
    write_site(tmp_path, synthetic_volumes(2, size=8, channels=("t1",)), dicom=True)
    (tmp_path / "p01").rename(tmp_path / "p07")
    message = _refusal(tmp_path)
    assert "DICOM PatientID 'p01' differs from the patient folder name 'p07'" in message


def test_normalization_options(tmp_path: Path) -> None:
    original = synthetic_volumes(3, size=8, channels=("t1", "t2"))
    write_site(tmp_path, original)
    per_image = read_site(_spec(tmp_path, size=8)).images
    assert per_image.amin(dim=(2, 3, 4)) == pytest.approx(0.0)
    assert per_image.amax(dim=(2, 3, 4)) == pytest.approx(1.0)
    per_site = read_site(_spec(tmp_path, size=8, normalize="dataset")).images
    assert per_site.amin(dim=(0, 2, 3, 4)) == pytest.approx(0.0)
    assert per_site.amax(dim=(0, 2, 3, 4)) == pytest.approx(1.0)
    assert not torch.allclose(per_image, per_site)
    assert "normalize='zscore'" in _refusal(tmp_path, normalize="zscore")


def test_splits_file_is_honoured_and_validated(tmp_path: Path) -> None:
    write_site(tmp_path, synthetic_volumes(4, size=8, channels=("t1",), scans_per_patient=2))
    chosen = {"p00": "train", "p01": "test", "p02": "val", "p03": "train"}
    (tmp_path / "splits.json").write_text(json.dumps(chosen))
    splits = load_volumes(_spec(tmp_path, size=8))
    assert {name: sorted(set(s.patients)) for name, s in splits.items()} == {
        "train": ["p00", "p03"], "val": ["p02"], "test": ["p01"]}

    for bad, expected in [({**chosen, "p02": "holdout"}, "patient p02 has split 'holdout'"),
                          ({**chosen, "p09": "test"}, "names patient(s) p09 that have no folder"),
                          ({"p00": "train"}, "patient(s) p01, p02, p03 not assigned"),
                          (["p00"], "expected an object")]:
        (tmp_path / "splits.json").write_text(json.dumps(bad))
        with pytest.raises(DataError, match=re.escape(expected)):
            load_volumes(_spec(tmp_path, size=8))
