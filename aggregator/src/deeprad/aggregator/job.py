"""The aggregator Job: verify, decrypt and check each site's update, fold it into the round's
strategy (or unmask the secure-aggregation sum), then write, sign and record the next global
checkpoint. Bad updates are rejected and recorded; the round goes on.

`run_aggregation_task` is what `python -m deeprad.aggregator` runs in the hub and what
`deeprad simulate` runs after each round. This module orchestrates; each step has its own:
verification.py (trust in one update), replay_ledger.py (nonces across rounds), plain.py and
secure.py (the two ways updates reach the strategy), audit.py (the hub's signed audit record),
report.py (aggregate.json).
"""

from __future__ import annotations

import contextlib
import logging
import time

from deeprad.aggregator.audit import write_hub_record
from deeprad.aggregator.plain import aggregate_plain
from deeprad.aggregator.replay_ledger import ReplayLedger
from deeprad.aggregator.report import (
    finished_report,
    site_results,
    write_evaluation_report,
    write_report,
)
from deeprad.aggregator.secure import secure_mean
from deeprad.aggregator.strategies import make_strategy
from deeprad.aggregator.verification import UpdateVerifier
from deeprad.core import __version__
from deeprad.core.checkpoint import (
    open_checkpoint,
    read_strategy_state,
    validate_update,
    write_checkpoint,
)
from deeprad.core.errors import ConfigError, DeepRadError
from deeprad.core.identity import KeyRegistry, load_job_identity
from deeprad.core.layout import StudyLayout
from deeprad.core.manifests import read_manifest
from deeprad.core.privacy_ledger import index_site_records
from deeprad.core.protocol import (
    AggregateReport,
    AggregationTask,
    Contribution,
    Rejection,
    SecAggOutcome,
    StrategySpec,
)
from deeprad.core.store import ObjectStore

log = logging.getLogger("deeprad.aggregator")


class QuorumNotMet(DeepRadError):
    """Fewer valid updates than the round's minSites."""


def _evaluation_report(task: AggregationTask, store: ObjectStore, layout: StudyLayout,
                       start: float) -> AggregateReport:
    """An evaluation round: pool the sites' scores of the round's input checkpoint. No update
    is read and no checkpoint written, so no key is needed."""
    sites = sorted(task.sites or [])
    results = site_results(store, layout, task.round, sites)
    missing = [s for s in sites if s not in results]
    if len(results) < task.min_sites:
        raise QuorumNotMet(f"study {task.study} round {task.round} (evaluation): "
                           f"{len(results)} site result(s), minSites is {task.min_sites} "
                           f"(missing: {', '.join(missing) or 'none'})")
    evaluated = read_manifest(store, layout, task.round - 1)
    return write_evaluation_report(store, layout, task, results, missing,
                                   evaluated.payload_sha256, start)


def run_aggregation_task(task: AggregationTask, store: ObjectStore) -> AggregateReport:
    """Aggregate round `task.round`'s updates into the round's global checkpoint."""
    start = time.perf_counter()
    layout = StudyLayout(task.namespace, task.study, task.study_uid)
    done = finished_report(store, layout, task.round)
    if done is not None:  # already aggregated: idempotent
        return done
    if task.mode == "evaluate":
        return _evaluation_report(task, store, layout, start)
    hub = load_job_identity(task.identity_dir, "hub")
    registry = KeyRegistry.from_json(task.registry_json)
    if registry.require_hub().signing_key != hub.public().signing_key:
        raise ConfigError(f"the hub key folder holds {hub.name}'s keys, which are not the "
                          "registry's hub keys; mount the hub's identity")
    # the privacy ledger indexes every site record of the study's name: earlier rounds' first
    index_site_records(store, task.namespace, task.study, hub, registry)
    try:
        strategy = make_strategy(task.strategy)
        spec = StrategySpec(name=strategy.name, params=strategy.params())
        if task.secagg is not None:
            present = sorted(task.sites or task.secagg.roster)
        else:
            present = layout.sites_with_updates(store.list(layout.updates_prefix(task.round)),
                                                task.round)
        expected = task.sites if task.sites is not None else present
        admitted = [s for s in expected if s in present]
        missing = [s for s in expected if s not in present]
        rejected = [Rejection(site=s, reason="site was not admitted to this round")
                    for s in present if s not in expected]
        contributors: list[Contribution]
        ledger = ReplayLedger.load(store, layout)
        replay = ledger.guard(task.round)
        outcome: SecAggOutcome | None = None
        with contextlib.ExitStack() as keep, open_checkpoint(
            store, layout, task.round - 1, hub=registry.require_hub()
        ) as (global_weights, parent):
            state = (read_strategy_state(store, layout, parent)
                     if parent.strategy and parent.strategy.name == strategy.name else None)
            strategy.begin(global_weights, state)
            reference = global_weights.signature()
            verifier = UpdateVerifier(store, layout, task, parent, hub, registry, replay)
            if task.secagg is not None:
                mean, contributors, outcome, refused = secure_mean(
                    verifier, task.secagg, admitted, global_weights.load_all())
                validate_update("secure aggregate", mean, reference)
                strategy.add(mean, 1)
            else:
                contributors, refused = aggregate_plain(verifier, admitted, strategy, reference,
                                                        keep)
            rejected.extend(refused)
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
                 "contributors": contributors, "secagg": outcome,
                 "epsilon_round": task.privacy.epsilon_round if task.privacy else None,
                 "epsilon_spent": task.privacy.epsilon_spent if task.privacy else None},
                new_weights, new_state, hub=hub,
            )
        ledger.record(task.round, replay)
        write_hub_record(store, layout, task, hub, registry, parent, checkpoint, contributors,
                         [*expected, *present])
        return write_report(store, layout, task, strategy=spec, contributors=contributors,
                            rejected=rejected, missing=missing,
                            checkpoint_sha256=checkpoint.payload_sha256, secagg=outcome,
                            started=start)
    finally:
        # and again at the end: under secure aggregation the sites write their records while
        # this Job runs, so this round's are there only now (a failed round's as well). A
        # store error here must not replace the round's outcome: the next Job indexes them.
        try:
            index_site_records(store, task.namespace, task.study, hub, registry)
        except Exception as exc:  # whatever it is, the outcome stands
            log.warning("privacy ledger %s/%s: indexing after the round failed (%s); the next "
                        "aggregator or prepare Job indexes these records", task.namespace,
                        task.study, exc)
