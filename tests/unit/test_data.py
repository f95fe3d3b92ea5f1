"""Loaders for PNG, DICOM, NIfTI and .npz give the same preprocessed pixels; phantoms look right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from image_files import write_dicom, write_nifti, write_png

from deeprad.core.data import load_dataset
from deeprad.core.data.loaders import load_folder, load_npz, read_image
from deeprad.core.data.phantoms import (
    DEFAULT_PROFILES,
    MAX_LESION_FRACTION,
    ScannerProfile,
    generate_phantoms,
    site_profiles,
)
from deeprad.core.errors import DataError
from deeprad.core.protocol import DatasetSpec


def pattern(seed: int, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((size, size)) * 255).astype(np.uint8)



@pytest.mark.parametrize("writer,suffix", [(write_png, ".png"), (write_dicom, ".dcm"),
                                           (write_nifti, ".nii.gz")])
def test_every_format_gives_the_same_pixels(tmp_path: Path, writer, suffix: str) -> None:  # type: ignore[no-untyped-def]
    arr = pattern(1)
    arr[0, :] = 255  # an asymmetric marker: a transposed read would fail
    arr[:, 0] = 0
    writer(tmp_path / f"img{suffix}", arr)
    got = read_image(tmp_path / f"img{suffix}", 32)
    expected = (arr.astype(np.float32) - arr.min()) / (arr.max() - arr.min())
    assert got.shape == (1, 32, 32)
    np.testing.assert_allclose(got[0].numpy(), expected, atol=1e-5)


def test_folder_of_classes_with_mixed_formats(tmp_path: Path) -> None:
    write_png(tmp_path / "normal" / "a.png", pattern(1))
    write_dicom(tmp_path / "normal" / "b.dcm", pattern(2))
    write_nifti(tmp_path / "tumor" / "c.nii.gz", pattern(3))
    write_png(tmp_path / "tumor" / "d.png", pattern(4))
    data = load_folder(tmp_path, 16)
    assert data.images.shape == (4, 1, 16, 16)
    assert data.labels.tolist() == [0.0, 0.0, 1.0, 1.0]


def test_folder_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "nope", 16)
    (tmp_path / "only").mkdir()
    with pytest.raises(DataError, match="expected two class folders"):
        load_folder(tmp_path, 16)
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_folder(tmp_path, 16)
    (tmp_path / "only" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"x\.png: cannot read image"):
        load_folder(tmp_path, 16)


def test_medmnist_style_npz(tmp_path: Path) -> None:
    imgs = np.stack([pattern(i, 28) for i in range(6)])
    np.savez(tmp_path / "breast.npz", train_images=imgs, train_labels=np.array([[0], [1], [0],
                                                                                  [1], [1], [0]]))
    data = load_npz(tmp_path / "breast.npz", 16)
    assert data.images.shape == (6, 1, 16, 16) and data.labels.tolist() == [0, 1, 0, 1, 1, 0]
    with pytest.raises(DataError, match="needs arrays 'val_images'"):
        load_npz(tmp_path / "breast.npz", 16, split="val")


def test_empty_dataset_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "empty.npz", train_images=np.zeros((0, 8, 8)),
             train_labels=np.zeros((0, 1)))
    with pytest.raises(DataError, match="train_images has no samples"):
        load_dataset(DatasetSpec(kind="npz", path=str(tmp_path / "empty.npz")))


def make_tiny(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(n, 1, 8, 8), (torch.arange(n) % 2).float()


def test_bring_your_own_dataset_by_import_path() -> None:
    train, val = load_dataset(DatasetSpec(kind="import", path=f"{__name__}:make_tiny",
                                          options={"n": 10}, val_fraction=0.2))
    assert len(train) == 8 and len(val) == 2 and val.positives == 1


def test_phantoms_are_seeded_and_have_early_stage_lesions() -> None:
    profile = ScannerProfile(prevalence=0.5)
    a, b = generate_phantoms(40, profile, 64, seed=3), generate_phantoms(40, profile, 64, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert float(a.images.min()) == 0.0 and float(a.images.max()) == 1.0
    assert 10 <= a.positives <= 30
    # the lesion budget: a few pixels up to 5% of the slice
    assert MAX_LESION_FRACTION * 64 * 64 < 0.06 * 64 * 64


def test_hospitals_differ_in_scanner_and_prevalence() -> None:
    profiles = site_profiles(6, seed=0)
    assert profiles[:4] == list(DEFAULT_PROFILES)
    assert len({p.prevalence for p in profiles}) == 6
    sets = [generate_phantoms(200, p, 64, seed=i) for i, p in enumerate(profiles[:4])]
    prevalences = [s.positives / len(s) for s in sets]
    assert max(prevalences) - min(prevalences) > 0.25
    # Scanner differences survive intensity scaling: sharpness (mean gradient) differs by site.
    sharp = [float(s.images.diff(dim=-1).abs().mean()) for s in sets]
    assert max(sharp) / min(sharp) > 1.2
