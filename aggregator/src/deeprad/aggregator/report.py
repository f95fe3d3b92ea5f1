"""The round's report (`aggregate.json`): who contributed, who was rejected or missing, the
sites' metrics combined, the new checkpoint's digest. Its presence marks the round done."""

from __future__ import annotations

import contextlib
import time

from pydantic import ValidationError

from deeprad.core.errors import ObjectNotFound
from deeprad.core.layout import StudyLayout
from deeprad.core.metrics import combine
from deeprad.core.protocol import (
    AggregateReport,
    AggregationTask,
    Contribution,
    Rejection,
    SecAggOutcome,
    SiteResult,
    StrategySpec,
)
from deeprad.core.store import ObjectStore


def finished_report(store: ObjectStore, layout: StudyLayout,
                    round_no: int) -> AggregateReport | None:
    """The report of round `round_no` if it was aggregated already (a rerun returns it)."""
    with contextlib.suppress(ObjectNotFound, ValidationError):
        return AggregateReport.model_validate_json(store.get_bytes(layout.aggregate(round_no)))
    return None


def write_report(store: ObjectStore, layout: StudyLayout, task: AggregationTask, *,
                 strategy: StrategySpec, contributors: list[Contribution],
                 rejected: list[Rejection], missing: list[str], checkpoint_sha256: str,
                 secagg: SecAggOutcome | None, started: float) -> AggregateReport:
    """Write and return the round's report; `started` is the time.perf_counter() at which the
    aggregation began."""
    results = [_site_result(store, layout, task.round, c.site) for c in contributors]
    report = AggregateReport(
        study=task.study,
        round=task.round,
        strategy=strategy,
        contributors=contributors,
        rejected=rejected,
        missing=missing,
        federated_metrics=combine([r.global_metrics for r in results
                                   if r is not None and r.global_metrics is not None]),
        checkpoint_sha256=checkpoint_sha256,
        duration_s=time.perf_counter() - started,
        privacy=task.privacy,
        secagg=secagg,
    )
    store.put_text(layout.aggregate(task.round), report.model_dump_json(indent=2))
    return report


def write_evaluation_report(store: ObjectStore, layout: StudyLayout, task: AggregationTask,
                            results: dict[str, SiteResult], missing: list[str],
                            checkpoint_sha256: str, started: float) -> AggregateReport:
    """Write and return an evaluation round's report: the sites' scores of the checkpoint the
    round evaluated, pooled (validation as `federated_metrics`, held-out as `test_metrics`);
    nothing was aggregated, so it has no contributors."""
    report = AggregateReport(
        study=task.study, round=task.round, strategy=task.strategy, contributors=[],
        rejected=[], missing=missing,
        federated_metrics=combine([r.global_metrics for r in results.values()
                                   if r.global_metrics is not None]),
        test_metrics=combine([r.test_metrics for r in results.values()
                              if r.test_metrics is not None]),
        evaluated_sites=sorted(results), checkpoint_sha256=checkpoint_sha256,
        duration_s=time.perf_counter() - started)
    store.put_text(layout.aggregate(task.round), report.model_dump_json(indent=2))
    return report


def site_results(store: ObjectStore, layout: StudyLayout, round_no: int,
                 sites: list[str]) -> dict[str, SiteResult]:
    """The results the sites wrote for round `round_no`, by site (unreadable ones left out)."""
    found = {site: _site_result(store, layout, round_no, site) for site in sites}
    return {site: result for site, result in found.items() if result is not None}


def _site_result(store: ObjectStore, layout: StudyLayout, round_no: int,
                 site: str) -> SiteResult | None:
    try:
        return SiteResult.model_validate_json(store.get_bytes(layout.result(round_no, site)))
    except (ObjectNotFound, ValidationError):
        return None
