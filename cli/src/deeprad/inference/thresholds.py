"""Operating points: the decision threshold that finds a target share of tumours on a
labelled validation set."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from deeprad.core.errors import ConfigError, DataError

DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold and what it achieves on the set it was chosen on."""

    threshold: float
    target_sensitivity: float
    sensitivity: float
    specificity: float | None  # None when the set has no negatives
    n: int
    positives: int

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def threshold_for_sensitivity(probabilities: torch.Tensor, labels: torch.Tensor,
                              target: float) -> ThresholdChoice:
    """The highest threshold at which `probability >= threshold` still flags at least `target`
    of the positives: the most specific operating point with that sensitivity."""
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"--target-sensitivity {target}: must be in (0, 1], e.g. 0.9")
    probs, truth = probabilities.double().flatten(), labels.flatten() >= 0.5
    if len(probs) != len(truth):
        raise DataError(f"{len(probs)} probabilities but {len(truth)} labels")
    pos = torch.sort(probs[truth], descending=True).values
    if len(pos) == 0:
        raise DataError("the calibration set has no tumour (positive) images; a threshold for "
                        "a target sensitivity needs some")
    # The k-th highest positive score keeps k positives at or above it.
    k = max(1, math.ceil(target * len(pos) - 1e-9))
    threshold = float(pos[k - 1])
    flagged = probs >= threshold
    neg = int((~truth).sum())
    return ThresholdChoice(
        threshold=threshold,
        target_sensitivity=target,
        sensitivity=int((flagged & truth).sum()) / len(pos),
        specificity=int((~flagged & ~truth).sum()) / neg if neg else None,
        n=len(probs),
        positives=len(pos),
    )
