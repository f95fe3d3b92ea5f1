"""Distributed DP against central DP-SGD and no DP: final test AUROC over seeds, and what the
distributed-DP upload costs in bits per coordinate.

Data: SYNTHETIC tumour phantoms (seeded; not patient data). For each seed (phantom hospitals,
weight init, batches) it trains three small federated studies with the DP recipe (tumor-jet,
SGD, `deeprad simulate --dp-epsilon`'s training flags) and the same rounds:

* `none`: no DP — the recipe alone;
* `central`: record-level DP-SGD at each site (Opacus), noise calibrated as `deeprad simulate
  --dp-epsilon` does; ε protects one *record* (patient slice) at its site;
* `distributed`: distributed discrete Gaussian on the secure sum (deeprad.core.distributed_dp,
  as `--distributed-dp-epsilon` runs it): each site clips its whole update, adds its noise share
  before masking; ε protects one *site's* whole update per round — every record of it at once.

"Same ε" means the same number (ε at δ over the same planned rounds) given to both private arms;
the units differ (record vs site), so the distributed arm promises far more (a whole hospital
hidden, against the hub too) and pays for it in noise: with a handful of sites, site-level DP
needs noise of the order of the whole clipped update per coordinate.

The rounds run in this one process (no worker pool: a full run takes 10-15 minutes on 2 cores):
local training is the trainer's `train_site`; the hub adds the mean delta (FedAvg, server lr 1;
sample-weighted for `none` and `central`, every site weighing 1 for `distributed`, decoded from
the ring sum of the sites' `distributed_dp.encode` shares by `distributed_dp.decode_mean`, as the
aggregator does). The pairwise masks are left out: they cancel exactly in the ring
(tests/unit/test_secagg.py), so the decoded sum is the same number with or without them.

    python benchmarks/bench_distributed_dp.py [--seeds 0 1 2 3 4] [--epsilon 8] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from deeprad.core import distributed_dp
from deeprad.core.checkpoint import update_bytes
from deeprad.core.data import load_dataset
from deeprad.core.models import build_model, model_weights
from deeprad.core.privacy import PrivacyBudget
from deeprad.core.protocol import ModelSpec, TrainConfig
from deeprad.core.secagg import default_threshold
from deeprad.core.secagg.quantize import flatten, pack, unflatten
from deeprad.simulate.config import DP_RECIPE, SimulationConfig
from deeprad.simulate.privacy_plan import PrivacyPlan
from deeprad.simulate.sites import make_sites, make_test_set
from deeprad.trainer import evaluate, train_site

ARMS = ("none", "central", "distributed")


def run_study(arm: str, cfg: SimulationConfig, args: argparse.Namespace) -> tuple[float, float]:
    """One study; its final test AUROC and the median L2 norm of the sites' updates."""
    sites = make_sites(cfg)
    data = {s.name: load_dataset(s.dataset) for s in sites}
    test_set = make_test_set(cfg, sites)
    torch.manual_seed(cfg.seed)
    weights = model_weights(build_model(cfg.model))
    dim = flatten(weights)[1].size
    central = PrivacyPlan.create(
        PrivacyBudget(epsilon=args.epsilon, delta=args.delta), {n: len(d[0]) for n, d in
                                                                 data.items()},
        cfg.train.batch_size, cfg.train.local_epochs, cfg.rounds, DP_RECIPE.max_grad_norm,
    ) if arm == "central" else None
    ddp = distributed_dp.plan(epsilon=args.epsilon, delta=args.delta, rounds=cfg.rounds,
                              l2_clip=args.clip, dim=dim, sites=len(sites),
                              noise_shares=default_threshold(len(sites))) \
        if arm == "distributed" else None
    norms: list[float] = []
    for round_no in range(1, cfg.rounds + 1):
        vectors, counts = [], []
        ring_sum = np.zeros(distributed_dp.padded_length(dim), dtype=np.uint32)
        for i, site in enumerate(sites):
            train, val = data[site.name]
            train_cfg = cfg.train.model_copy(update={"seed": cfg.seed * 1000 + round_no * 10 + i})
            out = train_site(cfg.model, weights, train, val, train_cfg,
                             dp=central.configs[site.name] if central else None)
            vector, layout = flatten(out.delta)
            norms.append(float(np.linalg.norm(vector)))
            if ddp is not None:  # the rotation seed is the round's config digest in a real run
                ring_sum += distributed_dp.encode(vector, ddp, f"round-{round_no}".encode())
            vectors.append(vector.astype(np.float64))
            counts.append(out.num_samples)
        if ddp is not None:
            mean, _ = distributed_dp.decode_mean(ring_sum, ddp, f"round-{round_no}".encode(),
                                                 dim, len(sites))
        else:
            mean = np.average(vectors, axis=0, weights=counts)
        delta = unflatten(mean.astype(np.float32), layout)
        weights = {k: weights[k] + delta[k] for k in weights}
    model = build_model(cfg.model)
    model.load_state_dict(weights)
    metrics = evaluate(model, test_set, torch.device("cpu"))
    assert metrics is not None
    return (metrics.auroc if metrics.auroc is not None else 0.5), statistics.median(norms)


def upload_sizes(model: ModelSpec) -> tuple[int, dict[str, int]]:
    """Values in the model, and the bytes of each upload's payload before sealing (headers
    included): the float32 update, the plain secure-aggregation vector, the distributed-DP one."""
    weights = model_weights(build_model(model))
    dim = flatten(weights)[1].size
    return dim, {"float32 update": len(update_bytes(weights, 1)),
                 "secure aggregation": len(pack(np.zeros(dim + 1, dtype=np.uint32))),
                 "distributed DP": len(pack(np.zeros(distributed_dp.padded_length(dim),
                                                     dtype=np.uint32)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--samples-per-site", type=int, default=240)
    parser.add_argument("--local-epochs", type=int, default=6)
    parser.add_argument("--clip", type=float, default=1.0,
                        help="distributed DP: L2 bound on each site's update")
    parser.add_argument("--smoke", action="store_true",
                        help="one seed, one round, tiny sites: checks that every arm runs")
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.rounds, args.sites = [0], 1, 2
        args.samples_per_site, args.local_epochs = 24, 1
    torch.set_num_threads(2)
    train = TrainConfig.model_validate({"optimizer": DP_RECIPE.optimizer, "lr": DP_RECIPE.lr,
                                        "batch_size": DP_RECIPE.batch_size,
                                        "local_epochs": args.local_epochs})
    base = SimulationConfig(sites=args.sites, rounds=args.rounds,
                            model=ModelSpec(name=DP_RECIPE.model), train=train,
                            samples_per_site=args.samples_per_site, test_samples_per_site=50,
                            baselines=False)
    print("Data: SYNTHETIC tumour phantoms (seeded; not patient data): these numbers compare "
          "the mechanisms, not clinical performance.")
    print(f"{args.sites} sites, {args.rounds} round(s), {args.samples_per_site} phantoms per "
          f"site before skew, model {DP_RECIPE.model}; ε={args.epsilon:g}, δ={args.delta:g} for "
          "both private arms — central: per RECORD (DP-SGD); distributed: per SITE (one site's "
          f"clipped update per round, L2 clip {args.clip:g}), against the hub too")
    print(f"{'seed':>4} " + " ".join(f"{a:>11}" for a in ARMS) + f" {'|update|':>9} "
          f"{'seconds':>8}", flush=True)
    results: dict[str, list[float]] = {a: [] for a in ARMS}
    for seed in args.seeds:
        start = time.perf_counter()
        cfg = replace(base, seed=seed, train=train.model_copy(update={"seed": seed}))
        row, norm = [], 0.0
        for arm in ARMS:
            auroc, median_norm = run_study(arm, cfg, args)
            results[arm].append(auroc)
            row.append(auroc)
            norm = median_norm if arm == "none" else norm
        print(f"{seed:>4} " + " ".join(f"{v:>11.3f}" for v in row) + f" {norm:>9.3g} "
              f"{time.perf_counter() - start:>8.0f}", flush=True)
    print("\nfinal test AUROC per arm over seeds " + " ".join(map(str, args.seeds)) + ":")
    for arm in ARMS:
        print(f"  {arm:<12} min {min(results[arm]):.3f}  median "
              f"{statistics.median(results[arm]):.3f}")
    dim, sizes = upload_sizes(base.model)
    padded = distributed_dp.padded_length(dim)
    print(f"\nupload per model coordinate ({dim} values; ring Z_2^32, 32 bits per value sent):")
    for name, values in (("float32 update", dim), ("secure aggregation", dim + 1),
                         ("distributed DP", padded)):
        bits = 32 * values / dim
        print(f"  {name:<19} {bits:5.1f} bits = {bits / 32:.3f} x float32   ({values} values; "
              f"{sizes[name]} bytes with the safetensors header)")
    print(f"  (distributed DP pads to a power of two for the rotation: {padded}/{dim})")
    print("|update| = median L2 norm of a site's update without DP: the distributed arm clips "
          "it to --clip")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
