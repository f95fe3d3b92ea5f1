"""The comparisons a local study reports beside the federated model: one model trained on the
pooled data of every hospital (centralized) and one per hospital on its own data (local-only),
each from the study's initial model for as many rounds' worth of epochs as the study ran."""

from __future__ import annotations

import sys
from concurrent.futures import as_completed
from dataclasses import dataclass, field

import torch
from safetensors.torch import load
from tqdm import tqdm

from deeprad.core.protocol import ClinicalMetrics
from deeprad.simulate.study import NAMESPACE, STUDY, LocalStudy
from deeprad.simulate.workers import WorkerLanes, train_baseline


@dataclass
class Baselines:
    """Per baseline ("centralized", "local:<site>"): test-set metrics after each round's worth
    of epochs, and the final weights."""

    curves: dict[str, list[ClinicalMetrics]] = field(default_factory=dict)
    weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def run_baselines(study: LocalStudy, pool: WorkerLanes, rounds_run: int) -> Baselines:
    """Train the centralized and local-only baselines; none when no round ran."""
    sites = study.sites
    jobs = [("centralized", sites)] + [(f"local:{s.name}", [s]) for s in sites]
    # a local-only model trains where its hospital's data already are
    futures = [pool.submit_to(group[0].name if len(group) == 1 else name, train_baseline, name,
                              [s.dataset.model_dump_json() for s in group],
                              study.cfg.train.model_dump_json(), study.store.url, NAMESPACE,
                              STUDY, rounds_run, study.test_set)
               for name, group in jobs] if rounds_run else []
    out = Baselines()
    for fut in tqdm(as_completed(futures), total=len(futures), desc="baselines", unit="model",
                    file=sys.stderr):
        name, curve, weights = fut.result()
        out.curves[name] = curve
        out.weights[name] = load(weights)
    return out
