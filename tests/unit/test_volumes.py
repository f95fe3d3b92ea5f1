"""Hospital volume folders (NIfTI / DICOM series + NIfTI masks) -> VolumeSets split by patient."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import tracemalloc
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from deeprad.core.data.loaders import load_dataset, load_split
from deeprad.core.data.patient_splits import split_patients
from deeprad.core.data.volumes import load_volumes, read_site
from deeprad.core.data.volumeset import MAX_VOXELS, VolumeSet
from deeprad.core.errors import DataError
from deeprad.core.protocol import DatasetSpec
from tests.support.volume_files import synthetic_volumes, write_nifti_volume, write_site

pytestmark = pytest.mark.unit


def _spec(site: Path, size: int = 16, **options: object) -> DatasetSpec:
    return DatasetSpec(kind="volumes", path=str(site), image_size=size, options=dict(options))


def _refusal(site: Path, **options: object) -> str:
    with pytest.raises(DataError) as err:
        read_site(DatasetSpec(kind="volumes", path=str(site), image_size=16,
                              options=dict(options)))
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
    raw = read_site(_spec(tmp_path, size=8, normalize="none")).images
    # "dataset" needs the training split: read_site leaves it to load_volumes.
    assert torch.equal(read_site(_spec(tmp_path, size=8, normalize="dataset")).images, raw)
    assert not torch.allclose(per_image, raw)
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


def _gzip_bomb(path: Path, shape: tuple[int, int, int]) -> None:
    """A valid .nii.gz header declaring `shape` (uint8), followed by that many zero bytes
    streamed through gzip: a file of ~100 kB that decodes to hundreds of MB."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header.set_qform(np.eye(4), code=1)
    header["vox_offset"] = 352  # 348-byte header + 4-byte extension flag, then the voxels
    path.parent.mkdir(parents=True, exist_ok=True)
    chunk = bytes(1 << 20)
    remaining = int(np.prod(shape))
    with gzip.open(path, "wb", compresslevel=1) as out:
        out.write(header.binaryblock)
        out.write(bytes(int(header["vox_offset"]) - len(header.binaryblock)))
        while remaining > 0:
            out.write(chunk[:remaining])
            remaining -= len(chunk)


def test_a_nifti_declaring_a_huge_shape_is_refused_before_decoding(tmp_path: Path) -> None:
    """Attack: a gzip bomb, a small .nii.gz whose header declares just over MAX_VOXELS voxels
    (decoding it as float32 would allocate ~0.5 GiB). It is refused from the header alone:
    the peak of Python/numpy allocations while reading the site stays under 16 MB."""
    write_site(tmp_path, synthetic_volumes(1, size=8, channels=("t1",)))
    shape = (513, 512, 512)
    assert int(np.prod(shape)) > MAX_VOXELS
    _gzip_bomb(tmp_path / "p00" / "t1.nii.gz", shape)
    assert (tmp_path / "p00" / "t1.nii.gz").stat().st_size < 2_000_000
    tracemalloc.start()
    try:
        message = _refusal(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "t1.nii.gz: header declares shape (513, 512, 512)" in message
    assert f"limit of {MAX_VOXELS} voxels" in message
    assert peak < 16_000_000, peak


def test_scans_of_another_field_of_view_are_refused(tmp_path: Path) -> None:
    """Within a site one voxel size serves every scan's mm distances (HD95): a scan covering
    a 10% larger field of view would be measured 10% off, so the site is refused."""
    volumes = synthetic_volumes(3, size=8, channels=("t1",))
    write_site(tmp_path, volumes)
    for name in ("t1.nii.gz", "mask.nii.gz"):
        source = volumes.images[2, 0] if name == "t1.nii.gz" else volumes.masks[2, 0]
        write_nifti_volume(tmp_path / "p02" / name, source.numpy(),
                           tuple(s * 1.1 for s in volumes.spacing))
    message = _refusal(tmp_path)  # read on a 16^3 cube: half the 8^3 files' voxel size
    assert "patient p02" in message and "over 5% off the site's [1.5, 1.0, 1.25] mm" in message
    # 3% larger stays within the tolerance; the median voxel size is the site's.
    for name in ("t1.nii.gz", "mask.nii.gz"):
        source = volumes.images[2, 0] if name == "t1.nii.gz" else volumes.masks[2, 0]
        write_nifti_volume(tmp_path / "p02" / name, source.numpy(),
                           tuple(s * 1.03 for s in volumes.spacing))
    assert read_site(_spec(tmp_path, size=8)).spacing == pytest.approx(volumes.spacing)


def test_dataset_normalization_uses_training_patients_only(tmp_path: Path) -> None:
    """Attack on the evaluation: a test patient with extreme intensities must not change how
    the training patients are scaled (that would leak the test set into preprocessing)."""
    volumes = synthetic_volumes(4, size=8, channels=("t1", "t2"))
    images = volumes.images.clone()
    images[3, :, 0, 0, 0] = 1000.0  # the test patient's outlier
    write_site(tmp_path, replace(volumes, images=images))
    (tmp_path / "splits.json").write_text(json.dumps(
        {"p00": "train", "p01": "train", "p02": "val", "p03": "test"}))
    splits = load_volumes(_spec(tmp_path, size=8, normalize="dataset"))
    train = splits["train"].images
    assert train.amin(dim=(0, 2, 3, 4)) == pytest.approx(0.0)
    assert train.amax(dim=(0, 2, 3, 4)) == pytest.approx(1.0)
    # The test patient got the training range: its outlier lies far above 1.
    assert float(splits["test"].images.amax()) > 100.0
    low = images[:2].amin(dim=(0, 2, 3, 4), keepdim=True)
    span = images[:2].amax(dim=(0, 2, 3, 4), keepdim=True) - low
    assert torch.allclose(splits["val"].images, (images[2:3] - low) / span, atol=1e-5)


def test_sets_of_different_sequences_are_not_pooled() -> None:
    """Pooling T1/T2 with FLAIR/T1 would mix sequences within a channel."""
    a = synthetic_volumes(2, size=8, channels=("t1", "t2"))
    b = synthetic_volumes(2, size=8, channels=("flair", "t1"))
    with pytest.raises(DataError) as err:
        VolumeSet.concat([a, b])
    message = str(err.value)
    assert "different sequences" in message and "options.sequences" in message
    assert "\n" not in message
    assert len(VolumeSet.concat([a, a])) == 4


def test_adding_a_patient_keeps_the_test_set() -> None:
    """A site that grows by one patient keeps its test patients (at most one moves out per
    stratum): a reshuffled test set would put patients the previous model trained on into the
    new test set."""
    spec = DatasetSpec(kind="volumes", path="/site", image_size=8,
                       options={"test_fraction": 0.25})
    before = set(split_patients(synthetic_volumes(40, size=4, channels=("t1",)), spec,
                                Path("/site"))["test"].patients)
    after = set(split_patients(synthetic_volumes(41, size=4, channels=("t1",)), spec,
                               Path("/site"))["test"].patients)
    assert len(before) == 10 and len(before - after) <= 1


def test_a_volume_edge_beyond_the_cap_is_refused_in_the_spec() -> None:
    """image_size is the cube's edge: 1024 would mean 4 GiB per sequence and scan."""
    from pydantic import ValidationError

    from deeprad.core.protocol import MAX_VOLUME_EDGE, DatasetSpec

    with pytest.raises(ValidationError, match=f"use at most {MAX_VOLUME_EDGE}"):
        DatasetSpec(kind="volumes", path="/data", image_size=MAX_VOLUME_EDGE + 1)
    assert DatasetSpec(kind="volumes", path="/data", image_size=MAX_VOLUME_EDGE).image_size \
        == MAX_VOLUME_EDGE
    assert DatasetSpec(kind="folder", image_size=1024).image_size == 1024  # 2D images
