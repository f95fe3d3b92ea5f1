"""Clinical metrics for binary tumour detection, and their sample-weighted combination."""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.classification import binary_auroc

from deeprad.core.protocol import ClinicalMetrics


def clinical_metrics(logits: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5
                     ) -> ClinicalMetrics:
    """AUROC, sensitivity (tumours found), specificity (healthy cleared), accuracy and BCE loss."""
    logits, labels = logits.float().flatten(), labels.float().flatten()
    n, pos = len(labels), int(labels.sum().item())
    loss = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)) if n else 0.0
    pred = torch.sigmoid(logits) >= threshold
    truth = labels >= 0.5
    tp = int((pred & truth).sum())
    tn = int((~pred & ~truth).sum())
    neg = n - pos
    both = 0 < pos < n
    return ClinicalMetrics(
        n=n,
        positives=pos,
        loss=loss,
        auroc=float(binary_auroc(torch.sigmoid(logits), labels.long())) if both else None,
        sensitivity=tp / pos if pos else None,
        specificity=tn / neg if neg else None,
        accuracy=(tp + tn) / n if n else 0.0,
    )


def _weighted(values: list[tuple[float | None, int]]) -> float | None:
    pairs = [(v, w) for v, w in values if v is not None and math.isfinite(v) and w > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def combine(metrics: list[ClinicalMetrics]) -> ClinicalMetrics | None:
    """Federated evaluation: sample-weighted means of the sites' metrics (AUROC by sample
    count, sensitivity by positives, specificity by negatives)."""
    if not metrics:
        return None
    n = sum(m.n for m in metrics)
    return ClinicalMetrics(
        n=n,
        positives=sum(m.positives for m in metrics),
        loss=_weighted([(m.loss, m.n) for m in metrics]) or 0.0,
        auroc=_weighted([(m.auroc, m.n) for m in metrics]),
        sensitivity=_weighted([(m.sensitivity, m.positives) for m in metrics]),
        specificity=_weighted([(m.specificity, m.n - m.positives) for m in metrics]),
        accuracy=_weighted([(m.accuracy, m.n) for m in metrics]) or 0.0,
    )
