"""`deeprad simulate` versus the fastest honest bare PyTorch loop doing the same training.

Two jobs, each side by side in one run: the default study (`SimulationConfig` defaults:
tumor-cnn, 4 phantom hospitals, 5 rounds, batch 16, Adam; no baselines) and a plain CNN
(conv-relu-maxpool x3 then a linear head, brought as the user's own `package.module:factory`;
4 hospitals x 800 slices, 5 rounds, batch 32, Adam). The bare loop generates the same data,
runs the sites one after another in one process with the simulator's per-site seeds, averages
in memory and scores the final model on the same test set; it is timed at every torch thread
count from 1 to the core count, and the ratio uses the fastest. Prints every time, the ratios
(goal <= 1.10) and both final AUROCs, which match when the training is the same.

    python benchmarks/bench_simulate.py [--rounds 5] [--sites 4] [--job default|plain|both]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deeprad.core.data import ImageSet, load_dataset
from deeprad.core.data.loaders import _cached as _dataset_cache
from deeprad.core.metrics import clinical_metrics
from deeprad.core.models import build_model
from deeprad.core.protocol import ModelSpec, TrainConfig
from deeprad.simulate.config import SimulationConfig
from deeprad.simulate.runner import run_simulation
from deeprad.simulate.sites import make_sites, make_test_set

GOAL = 1.10


def plain_cnn() -> nn.Module:
    """Three conv-relu-maxpool blocks and a linear head on 64x64 slices (no normalisation)."""
    layers: list[nn.Module] = []
    prev = 1
    for width in (16, 32, 64):
        layers += [nn.Conv2d(prev, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        prev = width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(prev * 8 * 8, 1))


@dataclass(frozen=True)
class BareRun:
    threads: int
    data_s: float  # generating the sites' data and the test set (one thread, its fastest)
    total_s: float  # data, training and the final test-set score
    auroc: float


def bare_loop(cfg: SimulationConfig, threads: int) -> BareRun:
    """Plain PyTorch FedAvg, sites in sequence in this process at `threads` torch threads."""
    _dataset_cache.cache_clear()  # generate the data afresh, as the simulator must
    start = time.perf_counter()
    torch.set_num_threads(1)
    sites = make_sites(cfg)
    data = [load_dataset(s.dataset)[0] for s in sites]
    test = make_test_set(cfg, sites)
    data_s = time.perf_counter() - start
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, allow_code=True)
    glob = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tc = cfg.train
    for r in range(1, cfg.rounds + 1):
        acc = {k: torch.zeros_like(v) for k, v in glob.items()}
        total = 0
        for i, train in enumerate(data):
            seed = tc.seed + 100_003 * r + 1009 * i  # the simulator's per-site seed
            torch.manual_seed(seed)
            model.load_state_dict(glob)
            opt = torch.optim.Adam(model.parameters(), lr=tc.lr)
            gen = torch.Generator().manual_seed(seed)
            model.train()
            for _ in range(tc.local_epochs):
                order = torch.randperm(len(train), generator=gen)
                for b in range(0, len(train), tc.batch_size):
                    idx = order[b : b + tc.batch_size]
                    loss = nn.functional.binary_cross_entropy_with_logits(
                        model(train.images[idx]).flatten(), train.labels[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            for k, v in model.state_dict().items():  # FedAvg as the hub does it: on deltas
                acc[k].add_(v - glob[k], alpha=len(train))
            total += len(train)
        glob = {k: glob[k] + acc[k] / total for k in glob}
    model.load_state_dict(glob)
    model.eval()
    assert isinstance(test, ImageSet)
    with torch.no_grad():
        logits = torch.cat([model(test.images[i : i + 64]).flatten()
                            for i in range(0, len(test), 64)])
    auroc = clinical_metrics(logits, test.labels).auroc
    return BareRun(threads, data_s, time.perf_counter() - start, float(auroc or 0.0))


def compare(title: str, cfg: SimulationConfig) -> float:
    """Time the bare loop at each thread count and the simulator; print; return the ratio."""
    cores = len(os.sched_getaffinity(0))
    bare = [bare_loop(cfg, t) for t in range(1, cores + 1)]
    start = time.perf_counter()
    report = run_simulation(cfg)  # worker start-up and shut-down included
    sim_s, sim_auc = time.perf_counter() - start, report["final"]["federated"]["auroc"]
    best = min(bare, key=lambda b: b.total_s)
    print(f"\n== {title}")
    for b in bare:
        mark = "  <- fastest" if b is best else ""
        print(f"bare loop, {b.threads} thread(s): {b.total_s:7.1f} s (data {b.data_s:4.1f} s)"
              f"   final AUROC {b.auroc:.4f}{mark}")
    print(f"deeprad simulate        : {sim_s:7.1f} s                final AUROC {sim_auc:.4f}")
    ratio = sim_s / best.total_s
    print(f"ratio simulate / fastest bare = {ratio:.2f}  (goal <= {GOAL:.2f}; "
          f"AUROC difference {abs(sim_auc - best.auroc):.4f})")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--job", choices=("default", "plain", "both"), default="both")
    args = parser.parse_args()
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.job in ("default", "both"):
            cfg = SimulationConfig(sites=args.sites, rounds=args.rounds, model=ModelSpec(),
                                   train=TrainConfig(), output=Path(tmp) / "default",
                                   baselines=False)
            ratios["default study (tumor-cnn)"] = compare(
                "default study: tumor-cnn, 4 phantom hospitals, batch 16, Adam", cfg)
        if args.job in ("plain", "both"):
            # This file's directory is on sys.path here and in the spawned workers.
            cfg = SimulationConfig(sites=args.sites, rounds=args.rounds,
                                   model=ModelSpec(name="bench_simulate:plain_cnn"),
                                   train=TrainConfig(batch_size=32), samples_per_site=800,
                                   output=Path(tmp) / "plain", baselines=False)
            ratios["plain CNN"] = compare(
                "plain 3-layer max-pool CNN: 4 hospitals x 800 slices, batch 32, Adam", cfg)
    print()
    for name, ratio in ratios.items():
        print(f"{name:28s} ratio {ratio:.2f}  {'ok' if ratio <= GOAL else 'MISSED'}")


if __name__ == "__main__":
    main()
