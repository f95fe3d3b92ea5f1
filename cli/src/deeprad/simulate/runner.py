"""Run a whole federated study on one machine: simulated hospitals in warm worker processes,
the real trainer and aggregator code paths, a local-directory store, and two baselines.

Security is on as in a real deployment: the hub and every hospital get their own identity
(key folders under `<output>/keys`, 0600), checkpoints are signed by the hub, updates are
sealed to the hub and signed by their site. With a privacy budget, each round is checked
against it before it starts and the study stops rather than exceed it. With secure
aggregation the aggregator runs beside the trainers and relays the exchange through the store.

The phases live beside this file, each readable alone: `study` (set up), `round` (one round),
`baselines` (the comparisons), `leave_one_out` (the study again without each hospital, on
request) and `finish` (final model, held-out hospitals and report).
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from tqdm import tqdm

from deeprad.simulate.baselines import Baselines, run_baselines
from deeprad.simulate.config import SimulationConfig
from deeprad.simulate.finish import finish
from deeprad.simulate.leave_one_out import run_leave_one_out
from deeprad.simulate.round import Stop, run_round
from deeprad.simulate.scoring import score_weights
from deeprad.simulate.sites import make_sites
from deeprad.simulate.study import set_up
from deeprad.simulate.workers import start_pool


def run_simulation(cfg: SimulationConfig) -> dict[str, Any]:
    """Run the study described by `cfg`; returns the report (also written to the output folder)."""
    started = time.perf_counter()
    pending: list[Future[dict[str, Any]]] = []
    baselines = Baselines()
    stopped: str | None = None
    loso: dict[str, Any] | None = None
    # Each hospital's worker loads its data while the hub sets the study up.
    sites = [(s.name, s.dataset) for s in make_sites(cfg)]
    with start_pool(cfg.worker_count, cfg.threads_per_worker, sites) as pool, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub") as hub_thread, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer") as scorer:
        # The workers hold the cores: the hub's set-up, aggregation and scoring, which run
        # beside them, take one thread (more would wait on each other's time slices).
        torch.set_num_threads(1)
        try:
            study = set_up(cfg)
            # scored while the workers start and load their data
            initial = scorer.submit(score_weights, study.initial_weights, study.cfg,
                                    study.test_set)
            for round_no in tqdm(range(1, cfg.rounds + 1), desc="rounds", unit="round",
                                 file=sys.stderr):
                outcome = run_round(study, round_no, pool, hub_thread, scorer=scorer)
                if isinstance(outcome, Stop):
                    stopped = outcome.reason
                    break
                pending.append(outcome)
                _raise_failed_scoring([initial, *pending])  # not after every round has trained
            rounds = [row.result() for row in pending]
            if cfg.baselines:
                baselines = run_baselines(study, pool, len(rounds))
            if cfg.leave_one_out and rounds:
                loso = run_leave_one_out(study, pool, hub_thread, len(rounds))
        finally:
            torch.set_num_threads(len(os.sched_getaffinity(0)))
    return finish(study, rounds, baselines, stopped, started, loso, initial.result())


def _raise_failed_scoring(scores: list[Future[Any]]) -> None:
    """Raise the error of any scoring that already failed (a round's report line is scored
    while the next round trains)."""
    for score in scores:
        if score.done() and score.exception() is not None:
            score.result()
