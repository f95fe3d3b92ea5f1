"""Loaders for a site's images: class folders of PNG/JPEG/DICOM/NIfTI, MedMNIST-style `.npz`,
bring-your-own by import path, and the synthetic phantoms. All return an `ImageSet`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Resize, ScaleIntensity

from deeprad.core.data.imageset import ImageSet
from deeprad.core.data.phantoms import ScannerProfile, generate_phantoms
from deeprad.core.data.volumeset import VolumeSet
from deeprad.core.errors import DataError
from deeprad.core.importing import load_object
from deeprad.core.protocol import NORMALIZATIONS, VOLUME_KINDS, DatasetSpec

# What a site's data is: labelled 2D images (classification) or volumes with masks
# (segmentation); a dataset kind decides which (VOLUME_KINDS).
Samples = ImageSet | VolumeSet

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".nii", ".nii.gz")
POSITIVE_NAMES = ("tumor", "tumour", "lesion", "positive", "malignant", "1")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()



def preprocess(image: Any, image_size: int, normalize: str = "image") -> torch.Tensor:
    """The one preprocessing every image gets: one grey channel, resized, and (by default)
    scaled to [0, 1] on its own; see NORMALIZATIONS."""
    t = torch.as_tensor(np.asarray(image), dtype=torch.float32)
    if t.ndim == 3 and t.shape[0] > 1:  # RGB(A) or a volume's slices: average to one channel
        t = t.mean(dim=0, keepdim=True)
    t = torch.as_tensor(Resize((image_size, image_size))(t), dtype=torch.float32)
    if normalize == "image":
        return torch.as_tensor(ScaleIntensity()(t), dtype=torch.float32)
    return t


def _normalization(opts: dict[str, Any]) -> str:
    value = str(opts.get("normalize", "image"))
    if value not in NORMALIZATIONS:
        raise DataError(f"dataset option normalize={value!r}: use one of "
                        f"{', '.join(NORMALIZATIONS)}")
    return value


def _scale_dataset(images: torch.Tensor, eight_bit: bool) -> torch.Tensor:
    """One min-max for the whole set (8-bit data: /255), so relative brightness survives."""
    if eight_bit:
        return images / 255.0
    low, high = images.min(), images.max()
    return (images - low) / (high - low) if high > low else images - low


def read_image(path: Path, image_size: int, normalize: str = "image") -> torch.Tensor:
    """Read a PNG/JPEG/DICOM/NIfTI file into a [1, S, S] tensor (a volume: its middle slice)."""
    try:
        img = Compose([LoadImage(image_only=True), EnsureChannelFirst()])(str(path))
    except Exception as exc:
        raise DataError(f"{path}: cannot read image: {exc}") from exc
    arr = np.asarray(img)
    if arr.ndim == 4:  # channel, x, y, z: the middle axial slice
        arr = arr[..., arr.shape[-1] // 2]
    if arr.ndim != 3:
        raise DataError(f"{path}: expected a 2D image or 3D volume, got shape {arr.shape}")
    # MONAI's readers give (x, y); images are shown as (row, column).
    return preprocess(np.swapaxes(arr, -1, -2), image_size, normalize)


def load_folder(root: Path, image_size: int, positive_class: str | None = None,
                normalize: str = "image") -> ImageSet:
    """`root/<class>/<image>` with exactly two class folders; one of them is the tumour class."""
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) != 2:
        raise DataError(
            f"dataset folder {root}: expected two class folders (e.g. normal/ and tumor/), "
            f"found {classes}"
        )
    if positive_class is None:
        named = [c for c in classes if c.lower() in POSITIVE_NAMES]
        positive_class = named[0] if named else classes[1]
    if positive_class not in classes:
        raise DataError(
            f"dataset folder {root}: positive class {positive_class!r} not in {classes}")
    images, labels = [], []
    for cls in classes:
        files = sorted(p for p in (root / cls).rglob("*") if _suffix(p) in IMAGE_SUFFIXES)
        images += [read_image(p, image_size, normalize) for p in files]
        labels += [float(cls == positive_class)] * len(files)
    if not images:
        raise DataError(f"dataset folder {root}: no images with suffix {', '.join(IMAGE_SUFFIXES)}")
    stacked = torch.stack(images)
    if normalize == "dataset":
        stacked = _scale_dataset(stacked, eight_bit=False)
    return ImageSet(stacked, torch.tensor(labels))


def npz_splits(path: Path) -> set[str]:
    """The splits a MedMNIST-style `.npz` holds (train, val, test: both arrays present)."""
    if not path.is_file():
        raise DataError(f"npz dataset {path} does not exist")
    with np.load(path, allow_pickle=False) as data:
        names = set(data.files)
    return {split for split in ("train", "val", "test")
            if f"{split}_images" in names and f"{split}_labels" in names}


def load_npz(path: Path, image_size: int, split: str = "train",
             positive_labels: list[int] | None = None, normalize: str = "image") -> ImageSet:
    """MedMNIST-style `.npz` with `<split>_images` and `<split>_labels`; nonzero labels are positive
    unless `positive_labels` lists them."""
    if not path.is_file():
        raise DataError(f"npz dataset {path} does not exist")
    with np.load(path, allow_pickle=False) as data:
        key_i, key_l = f"{split}_images", f"{split}_labels"
        if key_i not in data or key_l not in data:
            raise DataError(f"{path}: needs arrays {key_i!r} and {key_l!r}; has {sorted(data)}")
        raw, lab = data[key_i], data[key_l]
    if len(raw) == 0:
        raise DataError(f"{path}: {key_i} has no samples")
    lab = lab.reshape(len(lab), -1)[:, 0]
    if raw.ndim == 4:  # N, H, W, C
        raw = raw.transpose(0, 3, 1, 2)
    elif raw.ndim == 3:
        raw = raw[:, None]
    else:
        raise DataError(f"{path}: {key_i} must be [N, H, W] or [N, H, W, C], got {raw.shape}")
    if positive_labels:
        unknown = sorted(set(positive_labels) - {int(v) for v in np.unique(lab)})
        if len(unknown) == len(set(positive_labels)):
            raise DataError(f"{path}: positive label(s) {positive_labels} never occur in "
                            f"{key_l} (labels present: {sorted(int(v) for v in np.unique(lab))})")
    pos = np.isin(lab, positive_labels) if positive_labels else lab != 0
    images = torch.stack([preprocess(im, image_size, normalize) for im in raw])
    if normalize == "dataset":
        images = _scale_dataset(images, raw.dtype == np.uint8)
    return ImageSet(images, torch.as_tensor(pos, dtype=torch.float32))


def _load(spec: DatasetSpec) -> ImageSet:
    opts = dict(spec.options)
    if spec.kind == "phantom":
        profile = ScannerProfile(**opts.get("profile", {}))
        return generate_phantoms(int(opts.get("samples", 300)), profile, spec.image_size,
                                 int(opts.get("seed", 0)))
    if spec.kind == "import":
        if not spec.path:
            raise DataError("dataset kind 'import' needs path 'package.module:function'")
        result = load_object(spec.path, "dataset")(**opts)
        if isinstance(result, ImageSet):
            return result
        images, labels = result
        return ImageSet(torch.as_tensor(images, dtype=torch.float32),
                        torch.as_tensor(labels, dtype=torch.float32))
    if not spec.path:
        raise DataError(f"dataset kind {spec.kind!r} needs a path")
    normalize = _normalization(opts)
    if spec.kind == "folder":
        return load_folder(Path(spec.path), spec.image_size, opts.get("positive_class"),
                           normalize)
    return load_npz(Path(spec.path), spec.image_size, opts.get("split", "train"),
                    opts.get("positive_labels"), normalize)


@functools.lru_cache(maxsize=8)
def _volume_splits(spec_json: str) -> dict[str, VolumeSet]:
    """A volume dataset's patient-level splits: "train", "val" and, where the data have one,
    "test" (no patient in two of them)."""
    spec = DatasetSpec.model_validate_json(spec_json)
    if spec.kind == "anatomy":
        from deeprad.core.data.anatomy import load_anatomy

        splits = load_anatomy(spec)
    else:
        from deeprad.core.data.volumes import load_volumes

        splits = load_volumes(spec)
    if len(splits.get("train", ())) == 0:
        raise DataError(f"dataset {spec.kind} {spec.path or ''}: no training volumes")
    return splits


def concat_samples(sets: list[Samples]) -> Samples:
    """Pool several sites' samples (all images or all volumes)."""
    if sets and all(isinstance(s, VolumeSet) for s in sets):
        return VolumeSet.concat([s for s in sets if isinstance(s, VolumeSet)])
    if all(isinstance(s, ImageSet) for s in sets):
        return ImageSet.concat([s for s in sets if isinstance(s, ImageSet)])
    raise DataError("cannot pool 2D images with 3D volumes: every site of a study holds the "
                    "same kind of data")


def load_split(spec: DatasetSpec, split: str) -> Samples | None:
    """A site's own `val` or `test` split (a `.npz` file's, or a volume dataset's held-out
    patients), or None when the site's data have no such split."""
    if spec.kind in VOLUME_KINDS:
        return _volume_splits(spec.model_dump_json()).get(split)
    return _npz_split(spec, split)


def _npz_split(spec: DatasetSpec, split: str) -> ImageSet | None:
    if spec.kind != "npz" or not spec.path or split not in npz_splits(Path(spec.path)):
        return None
    opts = dict(spec.options)
    return load_npz(Path(spec.path), spec.image_size, split, opts.get("positive_labels"),
                    _normalization(opts))


@functools.lru_cache(maxsize=16)
def _cached(spec_json: str) -> tuple[ImageSet, ImageSet]:
    spec = DatasetSpec.model_validate_json(spec_json)
    data = _load(spec)
    if len(data) == 0:
        raise DataError(f"dataset {spec.kind} {spec.path or ''}: no samples")
    own_val = _npz_split(spec, "val") if spec.options.get("split", "train") == "train" else None
    if own_val is not None:  # the site's own validation split, never a slice of its training
        return data, own_val
    train, val = data.split(spec.val_fraction, spec.split_seed)
    if len(train) == 0:
        raise DataError(
            f"dataset {spec.kind} {spec.path or ''}: no training samples after the split")
    return train, val


def load_dataset(spec: DatasetSpec) -> tuple[Samples, Samples]:
    """(train, validation) for a spec; cached per process so warm workers load data once."""
    if spec.kind in VOLUME_KINDS:
        splits = _volume_splits(spec.model_dump_json())
        return splits["train"], splits["val"]
    return _cached(spec.model_dump_json())
