"""One round of a local study: check the privacy budget, train every hospital in the worker
pool (the trainer Job's code path), aggregate at the hub (the aggregator Job's code path), then
score the new global model for the report — each hospital's validation split in its own worker,
the test set on a scoring thread — while the next round already trains.

A failed hospital drops out and the round goes on; a round the budget refuses, or an
aggregation that fails, stops the study (`Stop`).
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import Executor, Future, as_completed
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from deeprad.aggregator.job import run_aggregation_task
from deeprad.core.checkpoint import read_checkpoint
from deeprad.core.errors import DeepRadError
from deeprad.core.privacy import PrivacyBudgetExceeded
from deeprad.core.protocol import (
    AggregateReport,
    AggregationTask,
    RoundEpsilon,
    SiteResult,
    TrainingTask,
)
from deeprad.core.secagg.relay import StoreRelay
from deeprad.simulate.scoring import POOLED, metrics_json, pool_scores, score_weights
from deeprad.simulate.sites import Site
from deeprad.simulate.study import LocalStudy
from deeprad.simulate.workers import SiteScore, WorkerLanes, score_validation, train_site_round


@dataclass(frozen=True)
class Stop:
    """The study stops before or during this round; `reason` goes into the report."""

    reason: str


@dataclass(frozen=True)
class _Trained:
    results: dict[str, SiteResult]
    failed: dict[str, str]  # site -> the error that dropped it


def run_round(study: LocalStudy, round_no: int, pool: WorkerLanes, hub_thread: Executor,
              scored: bool = True, scorer: Executor | None = None
              ) -> Future[dict[str, Any]] | Stop:
    """Run round `round_no` up to its new global model; returns Stop, or its line of the report
    to come (with `scored`, the new model's metrics, scored on `scorer` while the caller goes on;
    without a scorer, before returning; else only the round number)."""
    started = time.perf_counter()
    epsilon = _check_budget(study, round_no)
    if isinstance(epsilon, Stop):
        return epsilon
    task = AggregationTask(
        namespace=study.layout.namespace, study=study.layout.study, round=round_no,
        strategy=study.cfg.strategy,
        sites=[s.name for s in study.sites], registry_json=study.keys.registry.to_json(),
        identity_dir=str(study.keys.hub_dir), privacy=epsilon, secagg=study.secagg)
    # With secure aggregation the hub relays the exchange while the sites run.
    hub_future = hub_thread.submit(run_aggregation_task, task, study.store) \
        if study.secagg else None
    trained = _train_sites(study, round_no, pool)
    if study.plan is not None:
        for name, res in trained.results.items():
            study.plan.record(name, res.privacy)
    try:
        report = hub_future.result() if hub_future else run_aggregation_task(task, study.store)
    except DeepRadError as exc:
        stop = Stop(f"round {round_no} failed: {exc}")
        print(f"study stopped: {stop.reason}", file=sys.stderr)
        return stop
    if not scored:
        return _done({"round": round_no, "seconds": time.perf_counter() - started})
    # Queued in each hospital's lane ahead of the next round's training.
    validation = {s.name: pool.submit_to(s.name, score_validation, study.store.url,
                                         study.layout.namespace, study.layout.study, round_no,
                                         study.cfg.model.model_dump_json(),
                                         s.dataset.model_dump_json(),
                                         study.cfg.train.model_dump_json())
                  for s in study.sites}
    if scorer is None:
        return _done(_round_row(study, round_no, report, trained, validation, started))
    return scorer.submit(_round_row, study, round_no, report, trained, validation, started)


def _done(row: dict[str, Any]) -> Future[dict[str, Any]]:
    future: Future[dict[str, Any]] = Future()
    future.set_result(row)
    return future


def _check_budget(study: LocalStudy, round_no: int) -> RoundEpsilon | Stop | None:
    """The round's planned ε, or Stop when it would pass the budget (None without one)."""
    if study.plan is None:
        return None
    try:
        return study.plan.round_epsilon(study.plan.check_round())
    except PrivacyBudgetExceeded as exc:
        stop = Stop(f"privacy budget: before round {round_no}: {exc}")
        print(f"study stopped {stop.reason}", file=sys.stderr)
        return stop


def _site_task(study: LocalStudy, site: Site, index: int, round_no: int) -> TrainingTask:
    cfg = study.cfg
    seed = cfg.train.seed + 100_003 * round_no + 1009 * index
    return TrainingTask(namespace=study.layout.namespace, study=study.layout.study,
                        round=round_no, site=site.name,
                        model=cfg.model, dataset=site.dataset,
                        train=cfg.train.model_copy(update={"seed": seed}),
                        registry_json=study.keys.registry.to_json(),
                        identity_dir=str(study.keys.site_dirs[site.name]),
                        privacy=study.plan.configs[site.name] if study.plan else None,
                        secagg=study.secagg)


def _train_sites(study: LocalStudy, round_no: int, pool: WorkerLanes) -> _Trained:
    """Every hospital's local training, in parallel in the worker pool."""
    futures: dict[Future[str], Site] = {
        pool.submit_to(s.name, train_site_round,
                       _site_task(study, s, i, round_no).model_dump_json(), study.store.url): s
        for i, s in enumerate(study.sites)
    }
    results: dict[str, SiteResult] = {}
    failed: dict[str, str] = {}
    for fut in tqdm(as_completed(futures), total=len(futures), desc=f"round {round_no} sites",
                    unit="site", leave=False, file=sys.stderr):
        site = futures[fut]
        try:
            results[site.name] = SiteResult.model_validate_json(fut.result())
        except Exception as exc:  # a failed site drops out; the round goes on
            failed[site.name] = f"{type(exc).__name__}: {exc}"
            print(f"round {round_no}: {site.name} failed: {failed[site.name]}", file=sys.stderr)
            if study.secagg is not None:  # as the operator does: the hub stops waiting for it
                StoreRelay(study.store, study.layout, round_no, study.secagg.timeout_s,
                           study.secagg.poll_s).mark_gone(site.name, failed[site.name])
    return _Trained(results=results, failed=failed)


def _round_row(study: LocalStudy, round_no: int, report: AggregateReport, trained: _Trained,
               scores: dict[str, Future[SiteScore]], started: float) -> dict[str, Any]:
    """One line of the report: the new global model's metrics and what each site did."""
    weights, _ = read_checkpoint(study.store, study.layout, round_no)
    results = trained.results
    test = score_weights(weights, study.cfg, study.test_set)
    validation = pool_scores(study.cfg, {name: f.result() for name, f in scores.items()})
    return {
        "round": round_no,
        "global": metrics_json(test),
        "federated_evaluation": metrics_json(report.federated_metrics),
        "validation_pooled": metrics_json(validation[POOLED]),
        "sites": {
            s.name: {
                "validation": metrics_json(validation[s.name]),
                **({"num_samples": results[s.name].num_samples,
                    "train_loss": results[s.name].train_loss,
                    "train_seconds": results[s.name].duration_s}
                   if s.name in results else {"failed": trained.failed.get(s.name)}),
            }
            for s in study.sites
        },
        "rejected": [x.model_dump() for x in report.rejected],
        "epsilon_round": report.privacy.epsilon_round if report.privacy else None,
        "epsilon_spent": report.privacy.epsilon_spent if report.privacy else None,
        "secure_aggregation": report.secagg.model_dump() if report.secagg else None,
        "seconds": time.perf_counter() - started,
    }
