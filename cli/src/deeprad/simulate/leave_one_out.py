"""Leave-one-site-out: the federated study run again once without each training hospital, from
the same initial model and for as many rounds, each scored on the left-out hospital's test split
(which no model of that run has seen) beside the full study's model on the same split. It
answers "how does the federation do at a hospital that never joined", per hospital."""

from __future__ import annotations

import sys
from concurrent.futures import Executor
from typing import Any

from tqdm import tqdm

from deeprad.core.checkpoint import read_checkpoint
from deeprad.core.data import Samples, load_dataset, load_split
from deeprad.simulate.report import mean_metrics
from deeprad.simulate.round import Stop, run_round
from deeprad.simulate.scoring import metrics_json, score_weights
from deeprad.simulate.sites import Site
from deeprad.simulate.study import LocalStudy, without_site
from deeprad.simulate.workers import WorkerLanes


def site_test_split(site: Site) -> Samples:
    """A hospital's own test split, or its validation split where it has none."""
    test = load_split(site.dataset, "test")
    return test if test is not None and len(test) else load_dataset(site.dataset)[1]


def run_leave_one_out(study: LocalStudy, pool: WorkerLanes, hub_thread: Executor,
                      rounds: int) -> dict[str, Any]:
    """For each training hospital: `rounds` federated rounds without it, then the final model
    on its test split. `with_site` holds the full study's final model on the same split."""
    final, _ = read_checkpoint(study.store, study.layout, rounds)
    sites: dict[str, Any] = {}
    for left in tqdm(study.sites, desc="leave-one-site-out", unit="site", file=sys.stderr):
        sub = without_site(study, left.name)
        done, stopped = 0, None
        for round_no in range(1, rounds + 1):
            outcome = run_round(sub, round_no, pool, hub_thread, scored=False)
            if isinstance(outcome, Stop):
                stopped = outcome.reason
                break
            done = round_no
        weights, _ = read_checkpoint(sub.store, sub.layout, done)
        data = site_test_split(left)
        sites[left.name] = {
            "without_site": metrics_json(score_weights(weights, study.cfg, data)),
            "with_site": metrics_json(score_weights(final, study.cfg, data)),
            "rounds": done, "stopped": stopped}
    scored = [s["without_site"] for s in sites.values() if s["without_site"] is not None]
    return {"held_out": "each left-out hospital's test split", "sites": sites,
            "mean": mean_metrics(scored)}
