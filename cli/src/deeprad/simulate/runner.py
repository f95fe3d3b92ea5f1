"""Run a whole federated study on one machine: simulated hospitals in warm worker processes,
the real trainer and aggregator code paths, a local-directory store, and two baselines.

Security is on as in a real deployment: the hub and every hospital get their own identity
(key folders under `<output>/keys`, 0600), checkpoints are signed by the hub, updates are
sealed to the hub and signed by their site. With a privacy budget, each round is checked
against it before it starts and the study stops rather than exceed it. With secure
aggregation the aggregator runs beside the trainers and relays the exchange through the store.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import Any

import torch
from tqdm import tqdm

from deeprad.aggregator.job import run_aggregation_task
from deeprad.core import __version__
from deeprad.core.checkpoint import read_checkpoint, write_checkpoint
from deeprad.core.data import ImageSet, load_dataset
from deeprad.core.errors import DeepRadError
from deeprad.core.identity import Identity
from deeprad.core.layout import StudyLayout
from deeprad.core.models import build_model, model_weights
from deeprad.core.privacy import PrivacyBudget, PrivacyBudgetExceeded
from deeprad.core.protocol import (
    AggregateReport,
    AggregationTask,
    ClinicalMetrics,
    RoundEpsilon,
    SecAggSpec,
    SiteResult,
    TrainingTask,
)
from deeprad.core.store.local import LocalStore
from deeprad.simulate.config import SimulationConfig
from deeprad.simulate.keys import StudyKeys, make_study_keys
from deeprad.simulate.privacy_plan import PrivacyPlan
from deeprad.simulate.report import build_report
from deeprad.simulate.sites import Site, make_sites, make_test_set
from deeprad.simulate.workers import start_pool, train_baseline, train_site_round
from deeprad.trainer import evaluate

NAMESPACE = "local"
STUDY = "simulated-study"


def _metrics(m: ClinicalMetrics | None) -> dict[str, Any] | None:
    return m.model_dump() if m is not None else None


def _eval(weights: dict[str, torch.Tensor], cfg: SimulationConfig, data: ImageSet
          ) -> ClinicalMetrics | None:
    model = build_model(cfg.model)
    model.load_state_dict(weights)
    return evaluate(model, data, torch.device("cpu"))


def _site_task(cfg: SimulationConfig, site: Site, index: int, round_no: int, keys: StudyKeys,
               plan: PrivacyPlan | None, secagg: SecAggSpec | None) -> TrainingTask:
    seed = cfg.train.seed + 100_003 * round_no + 1009 * index
    return TrainingTask(namespace=NAMESPACE, study=STUDY, round=round_no, site=site.name,
                        model=cfg.model, dataset=site.dataset,
                        train=cfg.train.model_copy(update={"seed": seed}),
                        registry_json=keys.registry.to_json(),
                        identity_dir=str(keys.site_dirs[site.name]),
                        privacy=plan.configs[site.name] if plan else None, secagg=secagg)


def _privacy_plan(cfg: SimulationConfig, train_sizes: dict[str, int]) -> PrivacyPlan | None:
    if cfg.dp_epsilon is None:
        return None
    budget = PrivacyBudget(epsilon=cfg.dp_epsilon, delta=cfg.dp_delta,
                           accountant=cfg.dp_accountant)  # type: ignore[arg-type]
    return PrivacyPlan.create(budget, train_sizes, cfg.train.batch_size, cfg.train.local_epochs,
                              cfg.rounds, cfg.max_grad_norm, cfg.dp_noise_multiplier)


def _privacy_summary(cfg: SimulationConfig, plan: PrivacyPlan | None) -> dict[str, Any] | None:
    if plan is None:
        return None
    return {"epsilon_budget": cfg.dp_epsilon, "delta": cfg.dp_delta,
            "accountant": cfg.dp_accountant, "max_grad_norm": cfg.max_grad_norm,
            "noise_multiplier": {s: c.noise_multiplier for s, c in plan.configs.items()},
            "sample_rate": {s: r.sample_rate for s, r in plan.per_round.items()},
            "steps_per_round": {s: r.steps for s, r in plan.per_round.items()}}


def run_simulation(cfg: SimulationConfig) -> dict[str, Any]:
    """Run the study described by `cfg`; returns the report (also written to the output folder)."""
    started = time.perf_counter()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    cfg.output.mkdir(parents=True, exist_ok=True)
    store = LocalStore(cfg.output / "store")
    layout = StudyLayout(NAMESPACE, STUDY)
    shutil.rmtree(store.root / layout.root, ignore_errors=True)  # a fresh study every run
    sites = make_sites(cfg)
    if cfg.dataset == "phantom":
        print("Data: SYNTHETIC tumour phantoms (seeded; not patient data) for "
              f"{len(sites)} simulated hospitals with different scanners and prevalence.",
              file=sys.stderr)
    test_set = make_test_set(cfg, sites)
    keys = make_study_keys(cfg.output / "keys", [s.name for s in sites])
    hub = Identity.load(keys.hub_dir)
    torch.manual_seed(cfg.seed)
    init = model_weights(build_model(cfg.model))
    write_checkpoint(store, layout, {"study": STUDY, "round": 0, "model": cfg.model,
                                     "producer": f"deeprad-simulate/{__version__}",
                                     "parent_sha256": None}, init, hub=hub)
    need_sizes = cfg.dp_epsilon is not None or cfg.secure_aggregation
    train_sizes = {s.name: len(load_dataset(s.dataset)[0]) for s in sites} if need_sizes else {}
    plan = _privacy_plan(cfg, train_sizes)
    secagg = SecAggSpec(roster=sorted(s.name for s in sites), clip=cfg.secagg_clip,
                        weight_normalizer=float(sum(train_sizes.values())),
                        timeout_s=cfg.secagg_timeout_s) if cfg.secure_aggregation else None
    rounds: list[dict[str, Any]] = []
    curves: dict[str, list[ClinicalMetrics]] = {}
    stopped: str | None = None
    with start_pool(cfg.worker_count, cfg.threads_per_worker, test_set) as pool, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub") as hub_thread:
        for r in tqdm(range(1, cfg.rounds + 1), desc="rounds", unit="round", file=sys.stderr):
            t0 = time.perf_counter()
            epsilon: RoundEpsilon | None = None
            if plan is not None:
                try:
                    epsilon = plan.round_epsilon(plan.check_round())
                except PrivacyBudgetExceeded as exc:
                    stopped = f"privacy budget: before round {r}: {exc}"
                    print(f"study stopped {stopped}", file=sys.stderr)
                    break
            agg_task = AggregationTask(
                namespace=NAMESPACE, study=STUDY, round=r, strategy=cfg.strategy,
                sites=[s.name for s in sites], registry_json=keys.registry.to_json(),
                identity_dir=str(keys.hub_dir), privacy=epsilon, secagg=secagg)
            # With secure aggregation the hub relays the exchange while the sites run.
            hub_future = hub_thread.submit(run_aggregation_task, agg_task, store) \
                if secagg else None
            futures: dict[Future[str], Site] = {
                pool.submit(train_site_round,
                            _site_task(cfg, s, i, r, keys, plan, secagg).model_dump_json(),
                            store.url): s
                for i, s in enumerate(sites)
            }
            results: dict[str, SiteResult] = {}
            failed: dict[str, str] = {}
            for fut in tqdm(as_completed(futures), total=len(futures), desc=f"round {r} sites",
                            unit="site", leave=False, file=sys.stderr):
                site = futures[fut]
                try:
                    results[site.name] = SiteResult.model_validate_json(fut.result())
                except Exception as exc:  # a failed site drops out; the round goes on
                    failed[site.name] = f"{type(exc).__name__}: {exc}"
                    print(f"round {r}: {site.name} failed: {failed[site.name]}", file=sys.stderr)
            if plan is not None:
                for name, res in results.items():
                    plan.record(name, res.privacy)
            try:
                agg = hub_future.result() if hub_future else run_aggregation_task(agg_task, store)
            except DeepRadError as exc:
                stopped = f"round {r} failed: {exc}"
                print(f"study stopped: {stopped}", file=sys.stderr)
                break
            rounds.append(_round_row(cfg, r, store, layout, sites, test_set, agg, results,
                                     failed, t0))
        if cfg.baselines:
            jobs = [("centralized", sites)] + [(f"local:{s.name}", [s]) for s in sites]
            futs = [pool.submit(train_baseline, name, [s.dataset.model_dump_json() for s in group],
                                cfg.train.model_dump_json(), store.url, NAMESPACE, STUDY,
                                len(rounds)) for name, group in jobs] if rounds else []
            for bfut in tqdm(as_completed(futs), total=len(futs), desc="baselines",
                             unit="model", file=sys.stderr):
                name, curve = bfut.result()
                curves[name] = curve
    last = len(rounds)
    _, manifest = read_checkpoint(store, layout, last, hub=hub.public())
    shutil.copyfile(store.root / layout.global_weights(last), cfg.output / "final.safetensors")
    (cfg.output / "final.json").write_text(manifest.model_dump_json(indent=2))
    extra = {"privacy": _privacy_summary(cfg, plan), "stopped": stopped,
             "final_round": last, "initial_metrics": _metrics(_eval(init, cfg, test_set))}
    return build_report(cfg, sites, rounds, curves, time.perf_counter() - started, extra)


def _round_row(cfg: SimulationConfig, r: int, store: LocalStore, layout: StudyLayout,
               sites: list[Site], test_set: ImageSet, agg: AggregateReport,
               results: dict[str, SiteResult], failed: dict[str, str], t0: float
               ) -> dict[str, Any]:
    """One line of the report: the new global model's metrics and what each site did."""
    weights, _ = read_checkpoint(store, layout, r)
    return {
        "round": r,
        "global": _metrics(_eval(weights, cfg, test_set)),
        "federated_evaluation": _metrics(agg.federated_metrics),
        "sites": {
            s.name: {
                "validation": _metrics(_eval(weights, cfg, load_dataset(s.dataset)[1])),
                **({"num_samples": results[s.name].num_samples,
                    "train_loss": results[s.name].train_loss,
                    "train_seconds": results[s.name].duration_s}
                   if s.name in results else {"failed": failed.get(s.name)}),
            }
            for s in sites
        },
        "rejected": [x.model_dump() for x in agg.rejected],
        "epsilon_round": agg.privacy.epsilon_round if agg.privacy else None,
        "epsilon_spent": agg.privacy.epsilon_spent if agg.privacy else None,
        "secure_aggregation": agg.secagg.model_dump() if agg.secagg else None,
        "seconds": time.perf_counter() - t0,
    }



