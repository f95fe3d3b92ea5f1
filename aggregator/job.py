"""The aggregator Job: verify each site's update, fold it into the round's strategy, write and
record the next global checkpoint. Bad updates are rejected and recorded; the round goes on.

`run_aggregation_task` is what `python -m deeprad.aggregator` runs in the hub and what
`deeprad simulate` runs after each round.
"""

from __future__ import annotations

import contextlib
import logging
import time

from pydantic import ValidationError

from deeprad import __version__
from deeprad.aggregator.strategies import make_strategy
from deeprad.core.checkpoint import (
    UpdateReader,
    open_checkpoint,
    open_update,
    read_strategy_state,
    validate_update,
    write_checkpoint,
)
from deeprad.core.errors import DeepRadError, ObjectNotFound, UpdateRejected
from deeprad.core.layout import StudyLayout
from deeprad.core.metrics import combine
from deeprad.core.protocol import (
    AggregateReport,
    AggregationTask,
    CheckpointManifest,
    Contribution,
    Rejection,
    SiteResult,
    StrategySpec,
    UpdateManifest,
)
from deeprad.core.store import ObjectStore

log = logging.getLogger("deeprad.aggregator")


class QuorumNotMet(DeepRadError):
    """Fewer valid updates than the round's minSites."""


def _read_update_manifest(store: ObjectStore, layout: StudyLayout, task: AggregationTask,
                          parent: CheckpointManifest, site: str) -> UpdateManifest:
    key = layout.update_manifest(task.round, site)
    try:
        m = UpdateManifest.model_validate_json(store.get_bytes(key))
    except ObjectNotFound:
        raise UpdateRejected(site, f"manifest {key} is missing") from None
    except ValidationError as exc:
        raise UpdateRejected(site, f"manifest {key} is malformed: "
                                   f"{exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}"
                             ) from None
    if m.site != site:
        raise UpdateRejected(site, f"manifest names site {m.site!r}")
    if m.study != task.study or m.round != task.round:
        raise UpdateRejected(site, f"update is for study {m.study!r} round {m.round}, "
                                   f"not {task.study!r} round {task.round}")
    if m.parent_sha256 != parent.payload_sha256:
        raise UpdateRejected(site, "update was trained from a different (stale) global model")
    if m.num_samples < 1:
        raise UpdateRejected(site, f"num_samples must be >= 1, got {m.num_samples}")
    return m


def _site_result(store: ObjectStore, layout: StudyLayout, round_no: int,
                 site: str) -> SiteResult | None:
    try:
        return SiteResult.model_validate_json(store.get_bytes(layout.result(round_no, site)))
    except (ObjectNotFound, ValidationError):
        return None


def run_aggregation_task(task: AggregationTask, store: ObjectStore) -> AggregateReport:
    """Aggregate round `task.round`'s updates into the round's global checkpoint."""
    start = time.perf_counter()
    layout = StudyLayout(task.namespace, task.study)
    with contextlib.suppress(ObjectNotFound, ValidationError):  # already done: idempotent
        return AggregateReport.model_validate_json(store.get_bytes(layout.aggregate(task.round)))
    strategy = make_strategy(task.strategy)
    spec = StrategySpec(name=strategy.name, params=strategy.params())
    present = layout.sites_with_updates(store.list(layout.updates_prefix(task.round)), task.round)
    expected = task.sites if task.sites is not None else present
    missing = [s for s in expected if s not in present]
    rejected = [Rejection(site=s, reason="site was not admitted to this round")
                for s in present if s not in expected]
    contributors: list[Contribution] = []
    with contextlib.ExitStack() as keep, open_checkpoint(store, layout, task.round - 1) as (
        global_weights, parent
    ):
        state = (read_strategy_state(store, layout, parent)
                 if parent.strategy and parent.strategy.name == strategy.name else None)
        strategy.begin(global_weights, state)
        reference = global_weights.signature()
        reader = UpdateReader() if strategy.streaming else None

        def take(site: str) -> Contribution:
            """Verify one site's update and fold it in."""
            manifest = _read_update_manifest(store, layout, task, parent, site)
            with contextlib.ExitStack() as one:
                update = one.enter_context(open_update(store, layout, manifest, reader))
                validate_update(site, update, reference)
                strategy.add(update, manifest.num_samples)
                if not strategy.streaming:  # it reads the update again in finish(): keep it open
                    keep.enter_context(one.pop_all())
            return Contribution(site=site, update_sha256=manifest.payload_sha256,
                                num_samples=manifest.num_samples)

        for site in [s for s in expected if s in present]:
            try:
                contributors.append(take(site))
            except UpdateRejected as exc:
                log.warning("round %s: %s", task.round, exc)
                rejected.append(Rejection(site=site, reason=exc.reason))
        if len(contributors) < task.min_sites:
            reasons = "; ".join(f"{r.site}: {r.reason}" for r in rejected) or "none rejected"
            raise QuorumNotMet(
                f"study {task.study} round {task.round}: {len(contributors)} valid update(s), "
                f"minSites is {task.min_sites} (missing: {missing or 'none'}; {reasons})"
            )
        new_weights, new_state = strategy.finish()
        checkpoint = write_checkpoint(
            store, layout,
            {"study": task.study, "round": task.round,
             "producer": f"deeprad-aggregator/{__version__}", "model": parent.model,
             "parent_sha256": parent.payload_sha256, "strategy": spec,
             "contributors": contributors},
            new_weights, new_state,
        )
    results = [_site_result(store, layout, task.round, c.site) for c in contributors]
    report = AggregateReport(
        study=task.study,
        round=task.round,
        strategy=spec,
        contributors=contributors,
        rejected=rejected,
        missing=missing,
        federated_metrics=combine([r.global_metrics for r in results
                                   if r is not None and r.global_metrics is not None]),
        checkpoint_sha256=checkpoint.payload_sha256,
        duration_s=time.perf_counter() - start,
    )
    store.put_text(layout.aggregate(task.round), report.model_dump_json(indent=2))
    return report
