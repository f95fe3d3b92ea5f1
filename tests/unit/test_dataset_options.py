"""A site's data as the user brings it: its own validation and test splits are used (never a
slice of its training data), the intensity scaling is chosen, and the tumour label is set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deeprad.core.data import load_dataset
from deeprad.core.data.loaders import load_npz
from deeprad.core.errors import ConfigError, DataError
from deeprad.core.protocol import DatasetSpec
from deeprad.simulate.config import SimulationConfig
from deeprad.simulate.sites import describe_test_set, make_sites, make_test_set

pytestmark = pytest.mark.unit


def _npz(path: Path, splits: dict[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, n in splits.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 12, 12), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3).reshape(n, 1)
    np.savez(path, **arrays)
    return path


def test_a_sites_own_validation_split_is_used_whole(tmp_path: Path) -> None:
    path = _npz(tmp_path / "a.npz", {"train": 30, "val": 9, "test": 6})
    train, val = load_dataset(DatasetSpec(kind="npz", path=str(path), image_size=12))
    assert (len(train), len(val)) == (30, 9)  # not 24 / 6 from a 20% slice of train
    without = _npz(tmp_path / "b.npz", {"train": 30})
    train, val = load_dataset(DatasetSpec(kind="npz", path=str(without), image_size=12))
    assert (len(train), len(val)) == (24, 6)


def test_the_test_set_is_the_sites_own_test_splits(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    _npz(root / "north.npz", {"train": 20, "val": 5, "test": 7}, seed=1)
    _npz(root / "south.npz", {"train": 20, "val": 5, "test": 4}, seed=2)
    cfg = SimulationConfig(sites=2, dataset=str(root), image_size=12, output=tmp_path / "o")
    assert len(make_test_set(cfg, make_sites(cfg))) == 11
    assert "own test splits" in describe_test_set(cfg, make_sites(cfg))
    (root / "east.npz").unlink(missing_ok=True)
    _npz(root / "east.npz", {"train": 20, "val": 3}, seed=3)  # one site without a test split
    cfg = SimulationConfig(sites=3, dataset=str(root), image_size=12, output=tmp_path / "o")
    assert len(make_test_set(cfg, make_sites(cfg))) == 5 + 5 + 3  # the validation splits
    # ... and the report says so: the best round is chosen on these same splits
    assert describe_test_set(cfg, make_sites(cfg)).startswith(
        "the union of the hospitals' validation splits")


def test_dataset_scaling_keeps_brightness_between_images(tmp_path: Path) -> None:
    images = np.stack([np.full((8, 8), 40, np.uint8), np.full((8, 8), 200, np.uint8)])
    images[:, 0, 0] = 0  # some contrast inside each image
    path = tmp_path / "x.npz"
    np.savez(path, train_images=images, train_labels=np.array([0, 1]))
    per_image = load_npz(path, 8)
    assert torch.allclose(per_image.images.amax(dim=(1, 2, 3)), torch.ones(2))
    whole = load_npz(path, 8, normalize="dataset")
    brightest = whole.images.amax(dim=(1, 2, 3))
    assert brightest[0] == pytest.approx(40 / 255, abs=1e-3)
    assert brightest[1] == pytest.approx(200 / 255, abs=1e-3)
    raw = load_npz(path, 8, normalize="none")
    assert float(raw.images.max()) == pytest.approx(200.0, abs=1e-3)


def test_the_positive_label_can_be_chosen_and_a_wrong_one_is_refused(tmp_path: Path) -> None:
    path = _npz(tmp_path / "a.npz", {"train": 9})  # labels 0, 1, 2
    assert load_npz(path, 12).labels.tolist() == [0, 1, 1] * 3  # default: nonzero
    assert load_npz(path, 12, positive_labels=[2]).labels.tolist() == [0, 0, 1] * 3
    with pytest.raises(DataError, match=r"positive label\(s\) \[7\] never occur"):
        load_npz(path, 12, positive_labels=[7])


def test_flags_reach_the_loader_and_bad_ones_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    _npz(root / "a.npz", {"train": 9})
    cfg = SimulationConfig(sites=1, dataset=str(root), image_size=12, normalize="dataset",
                           positive_label="2", output=tmp_path / "o")
    (site,) = make_sites(cfg)
    assert site.dataset.options == {"normalize": "dataset", "positive_labels": [2]}
    bad = SimulationConfig(sites=1, dataset=str(root), image_size=12, positive_label="tumor",
                           output=tmp_path / "o")
    with pytest.raises(ConfigError, match="labels are integers"):
        make_sites(bad)
    with pytest.raises(ConfigError, match="--normalize must be one of image, dataset, none"):
        SimulationConfig(sites=1, dataset=str(root), normalize="zscore")
    with pytest.raises(ConfigError, match="apply to a --dataset folder"):
        SimulationConfig(positive_label="1")
