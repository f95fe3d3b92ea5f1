"""Run a whole federated study on one machine: simulated hospitals in warm worker processes,
the real trainer and aggregator code paths, a local-directory store, and two baselines."""

from __future__ import annotations

import os
import shutil
import sys
import time
from concurrent.futures import Future, as_completed
from typing import Any

import torch
from tqdm import tqdm

from deeprad import __version__
from deeprad.aggregator.job import run_aggregation_task
from deeprad.core.checkpoint import read_checkpoint, write_checkpoint
from deeprad.core.data import ImageSet, load_dataset
from deeprad.core.layout import StudyLayout
from deeprad.core.models import build_model, model_weights
from deeprad.core.protocol import AggregationTask, ClinicalMetrics, SiteResult, TrainingTask
from deeprad.core.store.local import LocalStore
from deeprad.simulate.config import SimulationConfig
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


def _site_task(cfg: SimulationConfig, site: Site, index: int, round_no: int) -> TrainingTask:
    seed = cfg.train.seed + 100_003 * round_no + 1009 * index
    return TrainingTask(namespace=NAMESPACE, study=STUDY, round=round_no, site=site.name,
                        model=cfg.model, dataset=site.dataset,
                        train=cfg.train.model_copy(update={"seed": seed}))


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
    torch.manual_seed(cfg.seed)
    init = model_weights(build_model(cfg.model))
    write_checkpoint(store, layout, {"study": STUDY, "round": 0, "model": cfg.model,
                                     "producer": f"deeprad-simulate/{__version__}",
                                     "parent_sha256": None}, init)
    rounds: list[dict[str, Any]] = []
    curves: dict[str, list[ClinicalMetrics]] = {}
    with start_pool(cfg.worker_count, cfg.threads_per_worker, test_set) as pool:
        for r in tqdm(range(1, cfg.rounds + 1), desc="rounds", unit="round", file=sys.stderr):
            t0 = time.perf_counter()
            futures: dict[Future[str], Site] = {
                pool.submit(train_site_round, _site_task(cfg, s, i, r).model_dump_json(),
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
            agg = run_aggregation_task(
                AggregationTask(namespace=NAMESPACE, study=STUDY, round=r, strategy=cfg.strategy,
                                sites=[s.name for s in sites]), store)
            weights, _ = read_checkpoint(store, layout, r)
            rounds.append({
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
                "seconds": time.perf_counter() - t0,
            })
        if cfg.baselines:
            jobs = [("centralized", sites)] + [(f"local:{s.name}", [s]) for s in sites]
            futs = [pool.submit(train_baseline, name, [s.dataset.model_dump_json() for s in group],
                                cfg.train.model_dump_json(), store.url, NAMESPACE, STUDY,
                                cfg.rounds) for name, group in jobs]
            for fut in tqdm(as_completed(futs), total=len(futs), desc="baselines",
                            unit="model", file=sys.stderr):
                name, curve = fut.result()
                curves[name] = curve
    _, manifest = read_checkpoint(store, layout, cfg.rounds)
    shutil.copyfile(store.root / layout.global_weights(cfg.rounds),
                    cfg.output / "final.safetensors")
    (cfg.output / "final.json").write_text(manifest.model_dump_json(indent=2))
    return build_report(cfg, sites, rounds, curves, time.perf_counter() - started)
