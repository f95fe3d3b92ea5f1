"""Evaluation as the field reports it: every model of the study (the final federated model,
the centralized one, each hospital's own) scored on every hospital's held-out validation split
and on all of them pooled (one score over the pooled predictions, not a mean of per-site
scores); and the best round chosen on validation data, never on the test set. The task's
primary metric (AUROC or Dice) fills the matrix and picks the round."""

from __future__ import annotations

from typing import Any

import torch

from deeprad.core.data import Samples, load_dataset
from deeprad.simulate.config import SimulationConfig
from deeprad.simulate.scoring import POOLED, primary_metric, score_sets
from deeprad.simulate.sites import Site

__all__ = ["POOLED", "best_round", "cross_site_matrix", "last_round_row", "validation_sets"]


def validation_sets(sites: list[Site]) -> dict[str, Samples]:
    """Each hospital's validation split (no model of the study trains on it)."""
    return {s.name: load_dataset(s.dataset)[1] for s in sites}


def cross_site_matrix(cfg: SimulationConfig, sites: list[Site],
                      models: dict[str, dict[str, torch.Tensor]],
                      known: dict[str, dict[str, float | None]] | None = None
                      ) -> dict[str, Any]:
    """The primary metric of each model (row) on each hospital's validation split and pooled
    (columns); None where a split cannot be scored (empty, or a single class for AUROC).
    `known` rows were scored already (the last round's global model is the final one) and
    are not scored again."""
    known = known or {}
    to_score = {name: weights for name, weights in models.items() if name not in known}
    sets = validation_sets(sites) if to_score else {}
    metric = primary_metric(cfg)
    rows: dict[str, dict[str, float | None]] = {}
    for name, weights in models.items():
        if name in known:
            rows[name] = known[name]
            continue
        scores = score_sets(weights, cfg, sets)
        rows[name] = {column: getattr(m, metric) if m is not None else None
                      for column, m in scores.items()}
    return {"metric": metric, "held_out": "each hospital's validation split",
            "columns": [*(s.name for s in sites), POOLED], "rows": rows}


def last_round_row(rounds: list[dict[str, Any]], metric: str) -> dict[str, float | None]:
    """The last round's global model on each hospital's validation split and pooled, as a
    row of the cross-site matrix."""
    last = rounds[-1]
    row = {name: (site["validation"] or {}).get(metric) for name, site in last["sites"].items()}
    row[POOLED] = (last["validation_pooled"] or {}).get(metric)
    return row


def best_round(rounds: list[dict[str, Any]], metric: str = "auroc") -> dict[str, Any] | None:
    """The round whose global model scored best on the pooled validation splits by `metric`
    (the earlier one on a tie), with its test-set metrics reported beside, never used to
    choose."""
    scored = [r for r in rounds if (r.get("validation_pooled") or {}).get(metric) is not None]
    if not scored:
        return None
    best = max(scored, key=lambda r: (r["validation_pooled"][metric], -r["round"]))
    label = "AUROC" if metric == "auroc" else metric.capitalize()
    return {"round": best["round"], "chosen_on": f"pooled validation {label}",
            "metric": metric, "validation": best["validation_pooled"], "test": best["global"]}
