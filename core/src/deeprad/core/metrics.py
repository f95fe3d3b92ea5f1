"""Clinical metrics for binary tumour detection, and their pooling across sites.

Every metric travels with the statistics that pool it exactly: counts of positives and
negatives (sensitivity, specificity, accuracy), a score histogram (AUROC), case counts (Dice,
HD95) and FROC counts (lesion sensitivity). `combine` adds those up, so the pooled numbers are
those of the pooled predictions, while no single prediction leaves a hospital. The volume side
(Dice, HD95, lesion counts from probability maps) is in `deeprad.core.seg_metrics`.
"""

from __future__ import annotations

import math
from typing import TypedDict

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc

from deeprad.core.protocol import ClinicalMetrics, LesionCounts, ScoreHistogram

# Scores are binned on the logit scale, clipped to +-LOGIT_RANGE: a trained network's scan
# scores crowd near probability 1 (logit 7 is 0.9991, logit 9 is 0.9999), where equal bins in
# probability would put positives and negatives into the same top bin and count them as ties.
# 2000 bins of 0.016 logits; the count also tells this layout from the older one of 1000 equal
# probability bins, which `combine` will not add to it.
HISTOGRAM_BINS = 2000
LOGIT_RANGE = 16.0
# False positives per scan at which lesion sensitivity is reported (the keys of
# ClinicalMetrics.lesion_sensitivity).
FP_PER_SCAN: tuple[str, ...] = ("0.125", "0.25", "0.5", "1", "2", "4", "8")


def score_histogram(logits: torch.Tensor, labels: torch.Tensor,
                    bins: int = HISTOGRAM_BINS) -> ScoreHistogram:
    """Positives and negatives per logit bin: bin i holds logits in
    [-R + i*2R/bins, -R + (i+1)*2R/bins), R = LOGIT_RANGE, logits beyond +-R in the end bins.
    Probabilities go in as `torch.logit(p)` (p = 1 gives +inf, counted in the top bin)."""
    clipped = logits.double().flatten().clamp(-LOGIT_RANGE, LOGIT_RANGE)
    idx = ((clipped + LOGIT_RANGE) * (bins / (2 * LOGIT_RANGE))).long().clamp(0, bins - 1)
    truth = labels.flatten() >= 0.5
    return ScoreHistogram(positives=torch.bincount(idx[truth], minlength=bins).tolist(),
                          negatives=torch.bincount(idx[~truth], minlength=bins).tolist())


def histogram_auroc(hist: ScoreHistogram) -> float | None:
    """AUROC from binned scores: pairs in different bins ranked by bin, pairs sharing a bin
    counted as ties (half), so it is off from the exact AUROC by at most half the share of
    positive-negative pairs that share a bin. None without both classes."""
    pos = np.asarray(hist.positives, dtype=np.float64)
    neg = np.asarray(hist.negatives, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return None
    negatives_below = np.cumsum(neg) - neg
    return float((pos * (negatives_below + 0.5 * neg)).sum() / (n_pos * n_neg))


def froc_sensitivity(counts: LesionCounts) -> dict[str, float] | None:
    """Lesion sensitivity at each of FP_PER_SCAN false positives per scan, reading the FROC
    curve as a step function: the best sensitivity among the thresholds whose false positives
    per scan are <= k, 0 when none is (no interpolation, so it is an exact function of the
    counts). None without lesions or scans."""
    if counts.lesions == 0 or counts.scans == 0:
        return None
    out = {}
    for key in FP_PER_SCAN:
        allowed = float(key) * counts.scans
        found = [hits for hits, fp in zip(counts.hits, counts.false_positives, strict=True)
                 if fp <= allowed]
        out[key] = max(found, default=0) / counts.lesions
    return out


class Detection(TypedDict):
    auroc: float | None
    sensitivity: float | None
    specificity: float | None
    accuracy: float


def detection_metrics(scores: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5
                      ) -> Detection:
    """AUROC, sensitivity, specificity and accuracy of probabilities `scores` against binary
    `labels`, a case called positive when its score reaches `threshold`."""
    scores, labels = scores.float().flatten(), labels.float().flatten()
    n, pos = len(labels), int(labels.sum().item())
    pred = scores >= threshold
    truth = labels >= 0.5
    tp = int((pred & truth).sum())
    tn = int((~pred & ~truth).sum())
    neg = n - pos
    return Detection(
        auroc=float(binary_auroc(scores, labels.long())) if 0 < pos < n else None,
        sensitivity=tp / pos if pos else None,
        specificity=tn / neg if neg else None,
        accuracy=(tp + tn) / n if n else 0.0)


def clinical_metrics(logits: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5
                     ) -> ClinicalMetrics:
    """AUROC, sensitivity (tumours found), specificity (healthy cleared), accuracy and BCE
    loss, with the score histogram that pools AUROC across sites."""
    logits, labels = logits.float().flatten(), labels.float().flatten()
    n = len(labels)
    loss = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)) if n else 0.0
    probs = torch.sigmoid(logits)
    return ClinicalMetrics(n=n, positives=int(labels.sum().item()), loss=loss,
                           **detection_metrics(probs, labels, threshold),
                           histogram=score_histogram(logits, labels))


def _weighted(values: list[tuple[float | None, int]]) -> float | None:
    pairs = [(v, w) for v, w in values if v is not None and math.isfinite(v) and w > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def _pooled_auroc(metrics: list[ClinicalMetrics]) -> tuple[float | None, ScoreHistogram | None]:
    """AUROC of the pooled scores from the summed histograms when every site sent one of the
    same binning; otherwise (older trainers) the sample-weighted mean of the sites' AUROCs,
    which is not the pooled AUROC, and no histogram."""
    hists = [m.histogram for m in metrics]
    if any(h is None for h in hists) or len({len(h.positives) for h in hists if h}) != 1:
        return _weighted([(m.auroc, m.n) for m in metrics]), None
    present = [h for h in hists if h is not None]
    total = ScoreHistogram(
        positives=[sum(col) for col in zip(*(h.positives for h in present), strict=True)],
        negatives=[sum(col) for col in zip(*(h.negatives for h in present), strict=True)])
    return histogram_auroc(total), total


def _pooled_lesions(metrics: list[ClinicalMetrics]
                    ) -> tuple[dict[str, float] | None, LesionCounts | None]:
    """Lesion sensitivity from the summed FROC counts of the sites that have them (the same
    thresholds everywhere); with differing thresholds, the lesion-weighted mean of the sites'
    sensitivities and no counts."""
    counts = [m.lesions for m in metrics if m.lesions is not None]
    if not counts:
        return None, None
    if len({tuple(c.thresholds) for c in counts}) != 1:
        weighted = {key: _weighted([(m.lesion_sensitivity.get(key), m.lesions.lesions)
                                    for m in metrics
                                    if m.lesion_sensitivity and m.lesions])
                    for key in FP_PER_SCAN}
        return {k: v for k, v in weighted.items() if v is not None} or None, None
    total = LesionCounts(
        thresholds=counts[0].thresholds,
        hits=[sum(col) for col in zip(*(c.hits for c in counts), strict=True)],
        false_positives=[sum(col) for col in zip(*(c.false_positives for c in counts),
                                                 strict=True)],
        lesions=sum(c.lesions for c in counts), scans=sum(c.scans for c in counts))
    return froc_sensitivity(total), total


def combine(metrics: list[ClinicalMetrics]) -> ClinicalMetrics | None:
    """Federated evaluation: the metrics of the sites' pooled predictions. Exact where the
    sites sent sufficient statistics: AUROC from summed histograms (up to the bin width),
    sensitivity and Dice by positives (scans with a lesion), specificity by negatives,
    accuracy by cases, HD95 by the scans it was measured on, lesion sensitivity from summed
    FROC counts. Loss is the sample-weighted mean."""
    if not metrics:
        return None
    auroc, histogram = _pooled_auroc(metrics)
    lesion_sensitivity, lesions = _pooled_lesions(metrics)
    return ClinicalMetrics(
        n=sum(m.n for m in metrics),
        positives=sum(m.positives for m in metrics),
        loss=_weighted([(m.loss, m.n) for m in metrics]) or 0.0,
        auroc=auroc,
        sensitivity=_weighted([(m.sensitivity, m.positives) for m in metrics]),
        specificity=_weighted([(m.specificity, m.n - m.positives) for m in metrics]),
        accuracy=_weighted([(m.accuracy, m.n) for m in metrics]) or 0.0,
        histogram=histogram,
        dice=_weighted([(m.dice, m.positives) for m in metrics]),
        hd95=_weighted([(m.hd95, m.hd95_cases) for m in metrics]),
        hd95_cases=sum(m.hd95_cases for m in metrics),
        lesion_sensitivity=lesion_sensitivity,
        lesions=lesions,
    )
