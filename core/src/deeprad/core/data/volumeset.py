"""In-memory 3D volumes with lesion masks: what the volume loaders return and the segmentation
trainer consumes. Splits keep every volume of a patient on one side."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from deeprad.core.errors import DataError

# The most voxels a loader decodes for one volume (512^3: 0.5 GiB as float32), checked against
# the file's header BEFORE decoding, so a small file declaring a huge shape (a gzip bomb) is
# refused instead of exhausting memory.
MAX_VOXELS = 512**3


@dataclass(frozen=True)
class VolumeSet:
    """`images` float32 [N, C, D, H, W] (C sequences, e.g. T1, T2, FLAIR); `masks` uint8
    [N, 1, D, H, W] with 1 on lesion voxels; `patients[i]` the patient volume i belongs to;
    `spacing` the voxel size in mm (D, H, W), for distances such as HD95."""

    images: torch.Tensor
    masks: torch.Tensor
    patients: tuple[str, ...]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channels: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.images.ndim != 5 or self.masks.ndim != 5 or self.masks.shape[1] != 1:
            raise DataError(
                f"volumes must be [N, C, D, H, W] and masks [N, 1, D, H, W]; got "
                f"{tuple(self.images.shape)} and {tuple(self.masks.shape)}")
        if self.images.shape[0] != self.masks.shape[0] or \
                self.images.shape[2:] != self.masks.shape[2:]:
            raise DataError(f"{tuple(self.images.shape)} volumes but {tuple(self.masks.shape)} "
                            "masks: one mask of the same size per volume")
        if len(self.patients) != len(self.images):
            raise DataError(f"{len(self.images)} volumes but {len(self.patients)} patient ids")
        if self.channels and len(self.channels) != self.images.shape[1]:
            raise DataError(f"{self.images.shape[1]} channels but names {list(self.channels)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def labels(self) -> torch.Tensor:
        """float32 [N]: 1 where the volume holds any lesion voxel (scan-level truth)."""
        if len(self) == 0:
            return torch.zeros(0)
        return (self.masks.flatten(1).amax(1) > 0).float()

    @property
    def positives(self) -> int:
        return int(self.labels.sum().item())

    def subset(self, idx: torch.Tensor) -> VolumeSet:
        keep = [int(i) for i in idx]
        return VolumeSet(self.images[idx], self.masks[idx],
                         tuple(self.patients[i] for i in keep), self.spacing, self.channels)

    def split_by_patient(self, val_fraction: float, seed: int) -> tuple[VolumeSet, VolumeSet]:
        """(train, validation) with no patient on both sides, reproducible from `seed`;
        stratified by whether a patient has any lesion."""
        labels = self.labels
        by_patient: dict[str, list[int]] = {}
        for i, patient in enumerate(self.patients):
            by_patient.setdefault(patient, []).append(i)
        gen = torch.Generator().manual_seed(seed)
        train_idx: list[int] = []
        val_idx: list[int] = []
        for positive in (False, True):
            group = sorted(p for p, rows in by_patient.items()
                           if bool(labels[rows].amax() > 0) == positive)
            order = torch.randperm(len(group), generator=gen).tolist()
            n_val = round(len(group) * val_fraction)
            for rank, k in enumerate(order):
                (val_idx if rank < n_val else train_idx).extend(by_patient[group[k]])
        return (self.subset(torch.tensor(sorted(train_idx), dtype=torch.long)),
                self.subset(torch.tensor(sorted(val_idx), dtype=torch.long)))

    @staticmethod
    def concat(sets: list[VolumeSet]) -> VolumeSet:
        """The sets pooled. Their channels must be the same sequences in the same order (else
        channel k would mix e.g. T1 and FLAIR). The pooled `spacing` is the first set's: the
        network sees the cube whatever its voxel size, and hospitals legitimately scan at
        different resolutions, so millimetre distances (HD95) of a pool of sites with
        different spacings are only approximate; score each site on its own for exact ones."""
        if not sets:
            raise DataError("no volume sets to concatenate")
        shapes = {tuple(s.images.shape[1:]) for s in sets}
        if len(shapes) > 1:
            raise DataError(f"volume sets of different shapes {sorted(shapes)} cannot be pooled")
        names = {s.channels for s in sets}
        if len(names) > 1:
            raise DataError(f"volume sets with different sequences {sorted(names)} cannot be "
                            "pooled; give every site the same sequences in the same order "
                            "(options.sequences)")
        return VolumeSet(torch.cat([s.images for s in sets]), torch.cat([s.masks for s in sets]),
                         tuple(p for s in sets for p in s.patients), sets[0].spacing,
                         sets[0].channels)
