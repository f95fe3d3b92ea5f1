"""The anatomy benchmark (synthetic tumours on real MNI152 anatomy): reproducible patients,
tumours in the brain from a few voxels to large, hospitals that differ, patient-level splits."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from deeprad.core.data import VolumeSet, load_dataset
from deeprad.core.data.anatomy import (
    CHANNELS,
    DEFAULT_SITES,
    DESCRIPTION,
    HELD_OUT_SITE,
    AnatomySite,
    anatomy_sites,
    generate_patients,
    load_anatomy,
)
from deeprad.core.data.anatomy_patient import deform, grow_tumours
from deeprad.core.data.anatomy_scanner import percentile
from deeprad.core.data.anatomy_template import ras_to_dhw, read_template, tissue_template
from deeprad.core.data.volumes import load_volumes
from deeprad.core.errors import DataError
from deeprad.core.protocol import DatasetSpec

pytestmark = pytest.mark.unit


def _spec(**options: object) -> DatasetSpec:
    opts: dict[str, object] = {"patients": 6, "test_patients": 3, "seed": 0, **options}
    return DatasetSpec(kind="anatomy", image_size=24, split_seed=1, val_fraction=0.34,
                       options=opts)


def test_the_anatomy_is_nilearns_mni152_template() -> None:
    from nilearn.datasets import load_mni152_gm_template  # type: ignore[import-untyped]

    expected = np.asarray(load_mni152_gm_template().get_fdata(), dtype=np.float32)
    assert np.allclose(read_template("gm"), expected)
    assert "SYNTHETIC" in DESCRIPTION and "REAL" in DESCRIPTION


def test_splits_are_by_patient_with_the_promised_shape() -> None:
    splits = load_anatomy(_spec())
    assert sorted(splits) == ["test", "train", "val"]
    assert [len(splits[k]) for k in ("train", "val", "test")] == [4, 2, 3]
    ids = [set(s.patients) for s in splits.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert all(p.startswith("hospital-a-t") for p in splits["test"].patients)
    spacing = tissue_template(24).spacing_mm
    for part in splits.values():
        assert part.images.shape[1:] == (3, 24, 24, 24) and part.images.dtype == torch.float32
        assert part.masks.dtype == torch.uint8 and part.channels == CHANNELS
        assert part.spacing == (spacing,) * 3 and 7.0 < spacing < 8.5  # ~190 mm over 24 voxels
        assert float(part.images.min()) >= 0.0 and float(part.images.max()) <= 2.0
    assert load_anatomy(_spec(test_patients=0)).keys() == {"train", "val"}


def test_patients_are_reproducible_and_differ_across_seeds() -> None:
    site = DEFAULT_SITES[1]
    first = generate_patients(site, 3, seed=4, image_size=24)
    again = generate_patients(site, 3, seed=4, image_size=24)
    other = generate_patients(site, 3, seed=5, image_size=24)
    assert torch.equal(first.images, again.images) and torch.equal(first.masks, again.masks)
    assert not torch.allclose(first.images, other.images, atol=0.05)
    assert not torch.equal(first.images[0], first.images[1])  # no two patients share a brain
    train, _ = load_dataset(_spec(seed=4))
    assert isinstance(train, VolumeSet) and train.patients[0].startswith("hospital-a-p")


def test_every_pool_has_tumour_and_healthy_patients_with_tumours_in_the_brain() -> None:
    volumes = generate_patients(AnatomySite(prevalence=0.0), 4, seed=2, image_size=24)
    assert volumes.labels.tolist() == [1.0, 0.0, 0.0, 0.0]
    volumes = generate_patients(AnatomySite(prevalence=1.0), 4, seed=2, image_size=24)
    assert volumes.labels.tolist() == [1.0, 0.0, 1.0, 1.0]
    tumour = volumes.masks[:, 0].bool()
    background = volumes.images[:, :, 0, 0, 0]
    # tumour voxels are brain: brighter than the corners' noise floor on T2 and FLAIR
    assert float(volumes.images[:, 1][tumour].min()) > 3 * float(background.max())
    template = tissue_template(24)
    rng = np.random.default_rng(0)
    tissues = deform(template.tissues, template.spacing_mm, rng)
    tumours = grow_tumours(tissues, template.spacing_mm, 3, (5.0, 20.0), rng)
    assert len(tumours.sizes) == 3 and min(tumours.sizes) >= 1
    assert bool((tissues.sum(0)[tumours.mask] > 0.5).all())
    assert float(tumours.oedema[tumours.mask].max()) < 0.5  # the mask is tumour, not oedema


def test_tumours_range_from_a_few_voxels_to_large_at_48() -> None:
    template = tissue_template(48)
    sizes: list[int] = []
    for radius in (5.0, 20.0):
        rng = np.random.default_rng(int(radius))
        tissues = deform(template.tissues, template.spacing_mm, rng)
        sizes += grow_tumours(tissues, template.spacing_mm, 2, (radius, radius), rng).sizes
    assert max(sizes[:2]) < 30 and min(sizes[2:]) > 300, sizes


def test_hospitals_differ_and_the_last_is_held_out() -> None:
    sites = anatomy_sites(5, seed=0)
    assert sites[:4] == list(DEFAULT_SITES) and sites[-1] == HELD_OUT_SITE
    assert len({s.name for s in anatomy_sites(9, seed=0)}) == 9
    assert anatomy_sites(7, seed=1) == anatomy_sites(7, seed=1) != anatomy_sites(7, seed=2)
    assert AnatomySite.from_dict(HELD_OUT_SITE.as_dict()) == HELD_OUT_SITE

    def corner_noise(site: AnatomySite) -> float:
        volumes = generate_patients(site, 3, seed=0, image_size=24)
        return float(volumes.images[:, :, :3, :3, :3].std())

    quiet, noisy = DEFAULT_SITES[0], DEFAULT_SITES[3]
    assert noisy.noise > 2 * quiet.noise
    assert corner_noise(noisy) > 1.8 * corner_noise(quiet)


@pytest.mark.parametrize("options,message", [
    ({"sites": 3}, "unknown option(s) sites; accepted: profile, patients, test_patients, seed"),
    ({"patients": 1}, "option patients must be an integer >= 2, got 1"),
    ({"profile": {"noise": 0.03, "snr": 9}}, "unknown field(s) snr"),
    ({"profile": {"prevalence": 1.5}}, "prevalence must be a number in [0.0, 1.0], got 1.5"),
])
def test_bad_options_are_refused_in_one_line(options: dict[str, object], message: str) -> None:
    with pytest.raises(DataError) as caught:
        load_anatomy(_spec(**options))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_benchmark_and_hospital_volumes_share_one_orientation(tmp_path: Path) -> None:
    """The benchmark's template and a hospital's NIfTI scan of the same anatomy must not be
    mirror images: a marker in the LEFT anterior superior brain, stored on RAS axes as the
    MNI152 files are, lands on the same (D, H, W) voxel through `ras_to_dhw` (the template's
    reorientation) and through `load_volumes` (the hospitals')."""
    size = 12
    xyz = np.zeros((size, size, size), np.float32)
    x, y, z = 2, 9, 7  # low x = left (RAS), high y = anterior, high z = superior
    xyz[x, y, z] = 1.0
    site = tmp_path / "site"
    (site / "p00").mkdir(parents=True)
    nib.save(nib.Nifti1Image(xyz, np.diag([1.0, 1.0, 1.0, 1.0])), str(site / "p00" / "t1.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros_like(xyz, dtype=np.uint8), np.eye(4)),
             str(site / "p00" / "mask.nii.gz"))
    spec = DatasetSpec(kind="volumes", path=str(site), image_size=size,
                       options={"normalize": "none", "test_fraction": 0.0})
    hospital = load_volumes(spec)["train"].images[0, 0]
    benchmark = ras_to_dhw(torch.from_numpy(xyz))
    where = [np.unravel_index(int(v.argmax()), v.shape) for v in (hospital, benchmark)]
    assert where[0] == where[1] == (z, size - 1 - y, size - 1 - x)


def test_percentile_matches_torch_quantile_and_takes_any_size() -> None:
    """torch.quantile refused more than 2^24 elements in the torch versions that had the limit
    (a brain at image_size ~350+); the scanner's percentile uses kthvalue instead."""
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 1000):
        values = torch.rand(n, generator=gen)
        for q in (0.0, 0.5, 0.99, 1.0):
            assert float(percentile(values, q)) == pytest.approx(
                float(torch.quantile(values, q)), abs=1e-6)
    big = torch.linspace(0.0, 1.0, 2**24 + 1)
    assert float(percentile(big, 0.99)) == pytest.approx(0.99, abs=1e-5)
