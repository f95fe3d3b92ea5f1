"""Scoring a model on one machine: the global model of a round (and the initial one) on the
held-out test set, a site's validation split or a held-out hospital, as the report's JSON
wants it; several sets at once with their pooled score."""

from __future__ import annotations

from typing import Any

import torch

from deeprad.core.data import Samples
from deeprad.core.metrics import clinical_metrics, combine
from deeprad.core.models import build_model
from deeprad.core.protocol import PRIMARY_METRIC, ClinicalMetrics
from deeprad.simulate.config import SimulationConfig
from deeprad.simulate.workers import SiteScore, site_score
from deeprad.trainer import evaluate, inference_roi

POOLED = "pooled"


def primary_metric(cfg: SimulationConfig) -> str:
    """The metric that ranks rounds and heads the report: AUROC or Dice."""
    return PRIMARY_METRIC[cfg.task]


def metrics_json(metrics: ClinicalMetrics | None) -> dict[str, Any] | None:
    """`metrics` as a report field (None for an empty data set)."""
    return metrics.model_dump() if metrics is not None else None


def score_weights(weights: dict[str, torch.Tensor], cfg: SimulationConfig, data: Samples
                  ) -> ClinicalMetrics | None:
    """The study's model with `weights`, scored on `data` on the CPU."""
    model = build_model(cfg.model, allow_code=True)
    model.load_state_dict(weights)
    return evaluate(model, data, torch.device("cpu"), roi_size=inference_roi(cfg.train))


def score_sets(weights: dict[str, torch.Tensor], cfg: SimulationConfig,
               sets: dict[str, Samples]) -> dict[str, ClinicalMetrics | None]:
    """The model on each set, and on all of them pooled (`POOLED`): one score over the pooled
    predictions, never a mean of per-set scores. Segmentation pools the sets' exact sufficient
    statistics (`combine`: per-scan Dice, HD95 cases, FROC counts, score histograms) instead of
    scoring every volume twice."""
    model = build_model(cfg.model, allow_code=True)
    model.load_state_dict(weights)
    return pool_scores(cfg, {name: site_score(model, data, cfg.train)
                             for name, data in sets.items()})


def pool_scores(cfg: SimulationConfig, scores: dict[str, SiteScore]
                ) -> dict[str, ClinicalMetrics | None]:
    """Each set's metrics and the pooled ones (`POOLED`): images from the sets' logits pooled,
    exactly as one score over the pooled predictions; volumes by `combine`."""
    out = {name: s.metrics for name, s in scores.items()}
    if cfg.task == "segmentation":
        out[POOLED] = combine([m for m in out.values() if m is not None])
        return out
    logits = [s.logits for s in scores.values() if s.logits is not None]
    labels = [s.labels for s in scores.values() if s.labels is not None]
    out[POOLED] = clinical_metrics(torch.cat(logits), torch.cat(labels)) if logits else None
    return out
