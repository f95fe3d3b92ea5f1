"""In-memory labelled image sets: the unit every loader returns and the trainer consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deeprad.core.errors import DataError


@dataclass(frozen=True)
class ImageSet:
    """`images` is float32 [N, 1, H, W] scaled to [0, 1]; `labels` is float32 [N] of 0/1."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.labels.ndim != 1:
            raise DataError(
                f"images must be [N, C, H, W] and labels [N]; got {tuple(self.images.shape)} "
                f"and {tuple(self.labels.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def positives(self) -> int:
        return int(self.labels.sum().item())

    def split(self, val_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
        """Stratified train/validation split, reproducible from `seed`."""
        gen = torch.Generator().manual_seed(seed)
        train_idx: list[torch.Tensor] = []
        val_idx: list[torch.Tensor] = []
        for cls in (0.0, 1.0):
            idx = torch.nonzero(self.labels == cls).flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)]
            n_val = round(len(idx) * val_fraction)
            val_idx.append(idx[:n_val])
            train_idx.append(idx[n_val:])
        tr, va = torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values
        return self.subset(tr), self.subset(va)

    def subset(self, idx: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[idx], self.labels[idx])

    @staticmethod
    def concat(sets: list[ImageSet]) -> ImageSet:
        return ImageSet(
            torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets])
        )
