"""The comparisons a local study reports beside the federated model: one model trained on the
pooled data of every hospital (centralized) and one per hospital on its own data (local-only),
each from the study's initial model for as many rounds' worth of epochs as the study ran."""

from __future__ import annotations

import sys
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field

import torch
from safetensors.torch import load
from tqdm import tqdm

from deeprad.core.protocol import ClinicalMetrics
from deeprad.simulate.study import NAMESPACE, STUDY, LocalStudy
from deeprad.simulate.workers import WorkerLanes, expected_size, train_baseline


@dataclass
class Baselines:
    """Per baseline ("centralized", "local:<site>"): test-set metrics after each round's worth
    of epochs, and the final weights."""

    curves: dict[str, list[ClinicalMetrics]] = field(default_factory=dict)
    weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def run_baselines(study: LocalStudy, pool: WorkerLanes, rounds_run: int) -> Baselines:
    """Train the centralized and local-only baselines; none when no round ran.

    The centralized model trains on every hospital's data, as much as all local-only models
    together, so queuing each model up front (a local-only one where its hospital's data
    are) left one lane with most of the work while the other idled. Instead the largest model
    waiting goes to whichever lane is free, so the lanes finish together."""
    out = Baselines()
    if not rounds_run:
        return out
    sites = study.sites
    waiting = sorted([("centralized", sites)] + [(f"local:{s.name}", [s]) for s in sites],
                     key=lambda job: -sum(expected_size(s.dataset) for s in job[1]))
    free = list(range(pool.lanes))
    running: dict[Future[tuple[str, list[ClinicalMetrics], bytes]], int] = {}
    with tqdm(total=len(waiting), desc="baselines", unit="model", file=sys.stderr) as bar:
        while waiting or running:
            while waiting and free:
                (name, group), lane = waiting.pop(0), free.pop(0)
                running[pool.submit_on(lane, train_baseline, name,
                                       [s.dataset.model_dump_json() for s in group],
                                       study.cfg.train.model_dump_json(), study.store.url,
                                       NAMESPACE, STUDY, rounds_run, study.test_set)] = lane
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                free.append(running.pop(fut))
                name, curve, weights = fut.result()
                out.curves[name] = curve
                out.weights[name] = load(weights)
                bar.update()
    return out
