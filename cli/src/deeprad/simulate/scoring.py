"""Scoring a model on one machine: the global model of a round (and the initial one) on the
held-out test set or a site's validation split, as the report's JSON wants it."""

from __future__ import annotations

from typing import Any

import torch

from deeprad.core.data import ImageSet
from deeprad.core.models import build_model
from deeprad.core.protocol import ClinicalMetrics
from deeprad.simulate.config import SimulationConfig
from deeprad.trainer import evaluate


def metrics_json(metrics: ClinicalMetrics | None) -> dict[str, Any] | None:
    """`metrics` as a report field (None for an empty data set)."""
    return metrics.model_dump() if metrics is not None else None


def score_weights(weights: dict[str, torch.Tensor], cfg: SimulationConfig, data: ImageSet
                  ) -> ClinicalMetrics | None:
    """The study's model with `weights`, scored on `data` on the CPU."""
    model = build_model(cfg.model, allow_code=True)
    model.load_state_dict(weights)
    return evaluate(model, data, torch.device("cpu"))
