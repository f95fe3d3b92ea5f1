"""The end of a local study: the last global model copied out (`final.safetensors` and its
manifest `final.json`), every model scored on the hospitals held out of training, then the
report — printed, plotted and written as JSON."""

from __future__ import annotations

import shutil
import time
from typing import Any

from deeprad.core import distributed_dp
from deeprad.core.checkpoint import read_checkpoint
from deeprad.core.protocol import ClinicalMetrics
from deeprad.core.secagg.quantize import VectorLayout
from deeprad.simulate.baselines import Baselines
from deeprad.simulate.cross_site import best_round, cross_site_matrix, last_round_row
from deeprad.simulate.report import build_report, mean_metrics
from deeprad.simulate.scoring import POOLED, metrics_json, primary_metric, score_sets, score_weights
from deeprad.simulate.sites import describe_test_set, held_out_data
from deeprad.simulate.study import LocalStudy


def finish(study: LocalStudy, rounds: list[dict[str, Any]], baselines: Baselines,
           stopped: str | None, started: float,
           leave_one_out: dict[str, Any] | None = None,
           initial_metrics: ClinicalMetrics | None = None) -> dict[str, Any]:
    """Write the final model and the report of `rounds` (one line per round run); `stopped`
    says why the study ended early, `started` is the study's perf_counter start,
    `leave_one_out` the leave-one-site-out results (None: not run), `initial_metrics` the
    round-0 model on the test set when already scored."""
    cfg, store, layout = study.cfg, study.store, study.layout
    last = len(rounds)
    final_weights, manifest = read_checkpoint(store, layout, last, hub=study.hub.public())
    shutil.copyfile(store.root / layout.global_weights(last), cfg.output / "final.safetensors")
    (cfg.output / "final.json").write_text(manifest.model_dump_json(indent=2))
    ddp = study.secagg.distributed_dp if study.secagg else None
    extra = {"privacy": _privacy_summary(study), "stopped": stopped, "final_round": last,
             "distributed_dp": None if ddp is None else {
                 **ddp.model_dump(), "unit": "site (one site's clipped update per round)",
                 "epsilon_spent": distributed_dp.epsilon_after(
                     ddp, VectorLayout.of(study.initial_weights).size, last)},
             "initial_metrics": metrics_json(
                 initial_metrics or score_weights(study.initial_weights, cfg, study.test_set)),
             "best_round": best_round(rounds, primary_metric(cfg)),
             "cross_site": cross_site_matrix(cfg, study.sites, {
                 "federated": final_weights, **dict(sorted(baselines.weights.items()))},
                 known={"federated": last_round_row(rounds, primary_metric(cfg))})
             if rounds else None,
             "held_out": held_out_scores(study, {"federated": final_weights,
                                                 **dict(sorted(baselines.weights.items()))}),
             "held_out_hospitals": {s.name: s.dataset.model_dump() for s in study.held_out},
             "leave_one_out": leave_one_out,
             "test_set": describe_test_set(cfg, study.sites)}
    return build_report(cfg, study.sites, rounds, baselines.curves,
                        time.perf_counter() - started, extra)


def held_out_scores(study: LocalStudy, models: dict[str, Any]) -> dict[str, Any] | None:
    """Every model of the study on everything the held-out hospitals hold (pooled over them):
    shaped like the report's `final`. None when no hospital was held out."""
    if not study.held_out:
        return None
    sets = {s.name: held_out_data(s) for s in study.held_out}
    pooled = {name: score_sets(weights, study.cfg, sets)[POOLED]
              for name, weights in models.items()}
    local = {name.split(":", 1)[1]: metrics_json(m) for name, m in pooled.items()
             if name.startswith("local:")}
    out: dict[str, Any] = {"sites": list(sets), "data": "every split of the hospitals held "
                           "out of training", "federated": metrics_json(pooled["federated"])}
    if "centralized" in pooled:
        out["centralized"] = metrics_json(pooled["centralized"])
        out["local_only"] = {"mean": mean_metrics([m for m in local.values() if m]),
                             "sites": local}
    return out


def _privacy_summary(study: LocalStudy) -> dict[str, Any] | None:
    cfg, plan = study.cfg, study.plan
    if plan is None:
        return None
    return {"epsilon_budget": cfg.dp_epsilon, "delta": cfg.dp_delta,
            "accountant": cfg.dp_accountant, "max_grad_norm": cfg.max_grad_norm,
            "noise_multiplier": {s: c.noise_multiplier for s, c in plan.configs.items()},
            "sample_rate": {s: r.sample_rate for s, r in plan.per_round.items()},
            "steps_per_round": {s: r.steps for s, r in plan.per_round.items()}}
