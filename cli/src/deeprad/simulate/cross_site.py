"""Evaluation as the field reports it: every model of the study (the final federated model,
the centralized one, each hospital's own) scored on every hospital's held-out validation split
and on all of them pooled (one AUROC over the pooled predictions, not a mean of per-site
scores); and the best round chosen on validation data, never on the test set."""

from __future__ import annotations

from typing import Any

import torch

from deeprad.core.data import ImageSet, load_dataset
from deeprad.simulate.config import SimulationConfig
from deeprad.simulate.scoring import score_weights
from deeprad.simulate.sites import Site

POOLED = "pooled"


def validation_sets(sites: list[Site]) -> dict[str, ImageSet]:
    """Each hospital's validation split (no model of the study trains on it), and `pooled`."""
    sets = {s.name: load_dataset(s.dataset)[1] for s in sites}
    sets[POOLED] = ImageSet.concat(list(sets.values()))
    return sets


def cross_site_matrix(cfg: SimulationConfig, sites: list[Site],
                      models: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """AUROC of each model (row) on each hospital's validation split and pooled (columns);
    None where a split has a single class."""
    sets = validation_sets(sites)
    rows: dict[str, dict[str, float | None]] = {}
    for name, weights in models.items():
        rows[name] = {}
        for column, data in sets.items():
            scored = score_weights(weights, cfg, data) if len(data) else None
            rows[name][column] = scored.auroc if scored is not None else None
    return {"metric": "auroc", "held_out": "each hospital's validation split",
            "columns": list(sets), "rows": rows}


def best_round(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The round whose global model scored best on the pooled validation splits (the earlier
    one on a tie), with its test-set metrics reported beside, never used to choose."""
    scored = [r for r in rounds if (r.get("validation_pooled") or {}).get("auroc") is not None]
    if not scored:
        return None
    best = max(scored, key=lambda r: (r["validation_pooled"]["auroc"], -r["round"]))
    return {"round": best["round"], "chosen_on": "pooled validation AUROC",
            "validation": best["validation_pooled"], "test": best["global"]}
