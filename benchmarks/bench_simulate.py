"""`deeprad simulate` versus a bare PyTorch loop doing the same training, in one run.

Both train the default study (4 phantom hospitals, 5 rounds, tumor-cnn, the same data, batch
size, epochs and per-site shuffling seeds) and score the final model on the same test set.
The bare loop runs the sites one after another in one process and averages in memory; the
simulator runs the trainer and aggregator Job code through a local store in worker processes.
Prints both wall times, their ratio (goal <= 1.15) and both final AUROCs.

    python benchmarks/bench_simulate.py [--rounds 5] [--sites 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from deeprad.core.data import load_dataset
from deeprad.core.metrics import clinical_metrics
from deeprad.core.models import build_model
from deeprad.core.protocol import ModelSpec, TrainConfig
from deeprad.simulate.config import SimulationConfig
from deeprad.simulate.runner import run_simulation
from deeprad.simulate.sites import make_sites, make_test_set


def bare_loop(cfg: SimulationConfig) -> tuple[float, float]:
    """Plain PyTorch FedAvg: (wall seconds, final test AUROC)."""
    start = time.perf_counter()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    sites = make_sites(cfg)
    data = [load_dataset(s.dataset)[0] for s in sites]
    test = make_test_set(cfg, sites)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    glob = {k: v.clone() for k, v in model.state_dict().items()}
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
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            for k, v in model.state_dict().items():
                acc[k] += v * len(train)
            total += len(train)
        glob = {k: v / total for k, v in acc.items()}
    model.load_state_dict(glob)
    model.eval()
    with torch.no_grad():
        auroc = clinical_metrics(model(test.images).flatten(), test.labels).auroc
    return time.perf_counter() - start, float(auroc or 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sites", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SimulationConfig(sites=args.sites, rounds=args.rounds, model=ModelSpec(),
                               train=TrainConfig(), output=Path(tmp), baselines=False)
        bare_s, bare_auc = bare_loop(cfg)
        report = run_simulation(cfg)
    sim_s, sim_auc = report["wall_time_s"], report["final"]["federated"]["auroc"]
    print(f"\nbare PyTorch loop : {bare_s:7.1f} s   final AUROC {bare_auc:.3f}")
    print(f"deeprad simulate  : {sim_s:7.1f} s   final AUROC {sim_auc:.3f}")
    print(f"wall-time ratio simulate / bare = {sim_s / bare_s:.2f}  (goal <= 1.15)")


if __name__ == "__main__":
    main()
