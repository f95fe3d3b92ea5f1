"""What lesion segmentation of 3D volumes changes in local training: its loss and how a trained
network is scored. The training loop itself is the one in `local_training` (the same steps,
precision, FedProx term and DP-SGD wiring as classification); it calls in here for a
`VolumeSet`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from torch import nn

from deeprad.core.data import VolumeSet
from deeprad.core.errors import ConfigError
from deeprad.core.protocol import ClinicalMetrics, TrainConfig
from deeprad.core.seg_metrics import segmentation_metrics

# Scans scored per forward pass: a 3-sequence 48^3 scan is 1.3 MB of input but about 50x
# that in activations, so evaluation goes a few scans at a time.
EVAL_BATCH = 4
# Share of each sliding window that overlaps its neighbours (MONAI's default).
WINDOW_OVERLAP = 0.25


def segmentation_loss(per_volume: bool = True) -> nn.Module:
    """Dice + binary cross-entropy on lesion logits (MONAI DiceCELoss, sigmoid).

    `per_volume=True`: Dice per volume and cross-entropy averaged over equally sized volumes
    make the batch loss the mean of per-volume losses, which DP-SGD needs (a volume is its
    record). `per_volume=False` computes Dice over the whole batch (`batch=True`), which is
    what ordinary training uses: with lesions of a few hundred voxels, and scans without any,
    a volume's own Dice is a noisy, often degenerate target, and pooling the batch's voxels
    steadies it."""
    return DiceCELoss(sigmoid=True, batch=not per_volume)


def inference_roi(cfg: TrainConfig) -> tuple[int, int, int] | None:
    """The window a network trained under `cfg` scores volumes with: its training patch (a
    volume larger than that is scored by sliding windows), or None for whole volumes."""
    return (cfg.patch_size,) * 3 if cfg.patch_size else None


class PatchSampler:
    """Cubic training patches cut from a batch of whole volumes, on the batch's device: a share
    `foreground` of them centred on a lesion voxel drawn at random, the others (and every patch
    of a scan without a lesion) at a random place. This is the positive/negative rule of
    MONAI's RandCropByPosNegLabel and nnU-Net's foreground oversampling: lesions of a few
    voxels are a tiny share of a scan, and on whole scans the cross-entropy term settles on "no
    lesion anywhere" for hundreds of steps (federated averaging, for rounds). A patch near a
    border is shifted inside the volume. Draws come from a seeded generator, so a run repeats."""

    def __init__(self, size: int, foreground: float, seed: int) -> None:
        self.size, self.foreground = size, foreground
        self._gen = torch.Generator().manual_seed(seed)

    def _draw(self, high: int) -> int:
        return int(torch.randint(high, (), generator=self._gen))

    def __call__(self, images: torch.Tensor, masks: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        shape = tuple(images.shape[2:])
        if any(self.size > side for side in shape):
            raise ConfigError(f"train.patchSize {self.size} is larger than the volumes "
                              f"({'x'.join(map(str, shape))} voxels): set it to at most "
                              f"{min(shape)}, or leave it out to train on whole volumes")
        crops_x, crops_y = [], []
        for x, y in zip(images, masks, strict=True):
            lesion = torch.rand((), generator=self._gen) < self.foreground
            voxels = torch.nonzero(y[0]) if lesion else ()  # a healthy scan has none either
            if len(voxels):
                centre = voxels[self._draw(len(voxels))].tolist()
                start = [min(max(c - self.size // 2, 0), side - self.size)
                         for c, side in zip(centre, shape, strict=True)]
            else:
                start = [self._draw(side - self.size + 1) for side in shape]
            box = (slice(None), *(slice(s, s + self.size) for s in start))
            crops_x.append(x[box])
            crops_y.append(y[box])
        return torch.stack(crops_x), torch.stack(crops_y)


def _needs_windows(data: VolumeSet, roi_size: Sequence[int] | None) -> bool:
    return roi_size is not None and any(
        size > roi for size, roi in zip(data.images.shape[2:], roi_size, strict=True))


@torch.no_grad()
def evaluate_volumes(model: nn.Module, data: VolumeSet, device: torch.device,
                     roi_size: Sequence[int] | None = None,
                     batch_size: int = EVAL_BATCH) -> ClinicalMetrics | None:
    """Dice, HD95, FROC and scan-level metrics of `model` on `data` (fp32); None for an empty
    set. Volumes larger than `roi_size` (the patch the network trained on) are scored by
    sliding-window inference over patches of that size; others in one forward pass."""
    if len(data) == 0:
        return None
    model.eval()
    loss_fn = segmentation_loss()
    windows = _needs_windows(data, roi_size)
    probs, loss_sum = [], 0.0
    for i in range(0, len(data), batch_size):
        x = data.images[i : i + batch_size].to(device)
        y = data.masks[i : i + batch_size].to(device).float()
        if windows and roi_size is not None:
            logits = sliding_window_inference(x, tuple(roi_size), batch_size, model,
                                              overlap=WINDOW_OVERLAP)
        else:
            logits = model(x)
        assert isinstance(logits, torch.Tensor)
        logits = logits.float()
        loss_sum += float(loss_fn(logits, y)) * len(x)
        probs.append(torch.sigmoid(logits).cpu())
    return segmentation_metrics(torch.cat(probs), data.masks, data.spacing,
                                loss_sum / len(data))
