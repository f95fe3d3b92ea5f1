"""Segmentation and lesion-detection metrics of 3D lesion probability maps, in the forms that
pool exactly across hospitals: per-scan Dice and HD95 (averages with their case counts), FROC
counts at fixed thresholds, and a histogram of the per-scan scores.

Conventions (what a reader of the numbers needs to know):
- A voxel is predicted lesion when its probability is >= 0.5.
- Dice (MONAI `compute_dice`) is the mean over the scans that hold a lesion (the autoPET
  convention for data with healthy scans); None when no scan holds one. Healthy scans are
  scored by the scan-level specificity instead: the share of them with no voxel predicted
  lesion. (Counting a clean healthy scan as Dice 1, BraTS's convention, let a network that
  never fires score about the share of healthy scans.)
- HD95 (MONAI `compute_hausdorff_distance`, 95th percentile, in mm from the voxel spacing) is
  undefined when either side is empty, so it averages over the scans where both the reference
  and the prediction hold a lesion; `hd95_cases` counts them.
- Lesions are the 26-connected components of the reference mask; candidates at threshold t are
  the 26-connected components of {probability >= t} (a candidate's score is its largest
  probability, so it exists exactly at the thresholds up to that score). A candidate detects a
  lesion when their intersection over union is at least MIN_IOU = 0.1 (the PI-CAI challenge's
  rule); a lesion is hit at t when some candidate detects it, and a candidate that detects no
  lesion is a false positive. Mere overlap is not enough: at a low threshold the whole brain
  becomes one candidate that touches every lesion.
- Sensitivity at k false positives per scan reads the FROC curve as a step function
  (`deeprad.core.metrics.froc_sensitivity`: no interpolation), so pooled values are exact.
- Scan level: a scan's score is its largest lesion probability and it is called positive when
  that reaches 0.5 (the same rule as Dice's), against "the scan holds a lesion". Its histogram
  bins the score's logit (`deeprad.core.metrics.score_histogram`), since trained networks put
  scan scores within 1e-3 of 1.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from scipy import ndimage  # type: ignore[import-untyped]  # no stubs shipped

from deeprad.core.metrics import detection_metrics, froc_sensitivity, score_histogram
from deeprad.core.protocol import ClinicalMetrics, LesionCounts

THRESHOLD = 0.5
# FROC operating points: probabilities at logits -8, -7.5, ..., 12 (0.0003 ... 0.999994), so
# they are as dense near 1, where a trained network's confident false positives sit, as in the
# middle; equal steps in probability would stop at 0.99 and leave such false positives on every
# operating point. Fixed constants (rounded, so every platform gets the same floats): sites
# that share them add their LesionCounts.
FROC_THRESHOLDS: tuple[float, ...] = tuple(
    round(1 / (1 + math.exp(-k / 2)), 9) for k in range(-16, 25))
MIN_IOU = 0.1  # overlap at which a candidate detects a lesion
_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity


def _match(candidates: np.ndarray, n_candidates: int, reference: np.ndarray,
           lesion_size: np.ndarray) -> tuple[int, int]:
    """(lesions hit, false-positive candidates) of one scan's labelled candidates against its
    labelled lesions (`reference` cut to the same box as `candidates`, `lesion_size` counted on
    the whole scan), by intersection over union >= MIN_IOU."""
    n_lesions = len(lesion_size)
    if n_candidates == 0:
        return 0, 0
    if n_lesions == 0:
        return 0, n_candidates
    both = (candidates > 0) & (reference > 0)
    pairs = np.bincount(candidates[both] * (n_lesions + 1) + reference[both],
                        minlength=(n_candidates + 1) * (n_lesions + 1))
    intersection = pairs.reshape(n_candidates + 1, n_lesions + 1)[1:, 1:]
    candidate_size = np.bincount(candidates.ravel(), minlength=n_candidates + 1)[1:]
    union = candidate_size[:, None] + lesion_size[None, :] - intersection
    detects = intersection >= MIN_IOU * union
    return int(detects.any(axis=0).sum()), int((~detects.any(axis=1)).sum())


def _box(above: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of the True voxels (some must be): at high thresholds a trained
    network's candidates fill a small part of the scan, and labelling only that box keeps the
    FROC's many thresholds cheap."""
    box = []
    for axis in range(above.ndim):
        hit = np.flatnonzero(above.any(axis=tuple(a for a in range(above.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def lesion_counts(probs: torch.Tensor, masks: torch.Tensor,
                  thresholds: tuple[float, ...] = FROC_THRESHOLDS) -> LesionCounts:
    """FROC sufficient statistics of probability maps [N, 1, D, H, W] against reference masks
    (candidates and the hit rule: see the module docstring)."""
    hits = [0] * len(thresholds)
    false_positives = [0] * len(thresholds)
    lesions = 0
    for prob, mask in zip(probs[:, 0].numpy(), masks[:, 0].numpy() > 0, strict=True):
        reference, n_lesions = ndimage.label(mask, structure=_CONNECTIVITY)
        lesions += n_lesions
        lesion_size = np.bincount(reference.ravel(), minlength=n_lesions + 1)[1:]
        for k, t in enumerate(thresholds):
            above = prob >= t
            if not above.any():  # no candidate at t (e.g. thresholds past the scan's maximum)
                continue
            box = _box(above)
            candidates, n_candidates = ndimage.label(above[box], structure=_CONNECTIVITY)
            found, false = _match(candidates, n_candidates, reference[box], lesion_size)
            hits[k] += found
            false_positives[k] += false
    return LesionCounts(thresholds=list(thresholds), hits=hits, false_positives=false_positives,
                        lesions=lesions, scans=len(probs))


def segmentation_metrics(probs: torch.Tensor, masks: torch.Tensor,
                         spacing: tuple[float, float, float], loss: float) -> ClinicalMetrics:
    """Dice, HD95 (mm), FROC and scan-level detection metrics of lesion probabilities
    `probs` [N, 1, D, H, W] against `masks` [N, 1, D, H, W]; `loss` is the caller's mean
    training-objective loss on the same scans."""
    probs, truth = probs.detach().float().cpu(), (masks.detach().cpu() > 0).float()
    pred = (probs >= THRESHOLD).float()
    n = len(probs)
    labels, scores = truth.flatten(1).amax(1), probs.flatten(1).amax(1)
    ill = labels > 0
    dice = (float(compute_dice(pred[ill], truth[ill], include_background=True).mean())
            if bool(ill.any()) else None)
    both = (pred.flatten(1).amax(1) > 0) & (labels > 0)
    hd95 = None
    if bool(both.any()):
        with warnings.catch_warnings():
            # MONAI 1.6's compute_hausdorff_distance itself passes get_mask_edges the deprecated
            # always_return_as_numpy (no argument of ours avoids it): silence that one warning
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy",
                                    category=FutureWarning)
            distances = compute_hausdorff_distance(pred[both], truth[both],
                                                   include_background=True, percentile=95,
                                                   spacing=list(spacing))
        hd95 = float(distances.mean())
    counts = lesion_counts(probs, truth)
    return ClinicalMetrics(
        n=n, positives=int(labels.sum().item()), loss=loss,
        **detection_metrics(scores, labels, THRESHOLD),
        histogram=score_histogram(torch.logit(scores.double()), labels),
        dice=dice, hd95=hd95, hd95_cases=int(both.sum()),
        lesion_sensitivity=froc_sensitivity(counts), lesions=counts)
