"""What differential privacy costs in AUROC, side by side in one run, over several seeds.

For each seed (a seed changes the phantom hospitals, the weight init, the batches and the
noise) it runs three 5-round studies through `deeprad simulate` and prints their final test
AUROCs:

* `plain`: the default demo (tumor-cnn, Adam), no DP;
* `dp`: the same study with a budget of ε = 8, δ = 1e-5, which trains with the DP recipe
  (tumor-jet, SGD, Poisson batches of 64, clip 1.5);
* `recipe`: the DP recipe without DP (no clipping, no noise), to separate the cost of the
  privacy from that of the model.

The issue's goal is dp / plain >= 0.95. About 2.5 minutes per seed on 2 cores.

    python benchmarks/bench_dp_utility.py [--seeds 0 1 2 3 4] [--epsilon 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deeprad.simulate.config import DP_RECIPE


def final_auroc(out: Path, seed: int, *args: str) -> float:
    """Run one study; its final federated test AUROC."""
    deeprad = str(Path(sys.executable).parent / "deeprad")  # the command beside this Python
    cmd = [deeprad, "simulate", "--no-baselines", "--seed", str(seed), "--output", str(out),
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    return float(report["final"]["federated"]["auroc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    args = parser.parse_args()
    # the DP recipe's flags, spelled out (max_grad_norm only acts under DP)
    recipe = [arg for name, value in vars(DP_RECIPE).items() if name != "max_grad_norm"
              for arg in (f"--{name.replace('_', '-')}", str(value))]
    dp_args = ["--dp-epsilon", str(args.epsilon), "--dp-delta", str(args.delta)]
    print(f"{'seed':>4} {'plain':>7} {'dp':>7} {'recipe':>7} {'dp/plain':>9} {'dp/recipe':>10}"
          f" {'seconds':>8}", flush=True)
    ratios = []
    with tempfile.TemporaryDirectory(prefix="deeprad-bench-dp-") as tmp:
        for seed in args.seeds:
            start = time.perf_counter()
            plain = final_auroc(Path(tmp) / f"plain{seed}", seed)
            dp = final_auroc(Path(tmp) / f"dp{seed}", seed, *dp_args)
            same = final_auroc(Path(tmp) / f"recipe{seed}", seed, *recipe)
            ratios.append(dp / plain)
            print(f"{seed:>4} {plain:>7.3f} {dp:>7.3f} {same:>7.3f} {dp / plain:>9.3f} "
                  f"{dp / same:>10.3f} {time.perf_counter() - start:>8.0f}", flush=True)
    met = sum(r >= 0.95 for r in ratios)
    print(f"dp/plain: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}; "
          f">= 0.95 in {met} of {len(ratios)} seeds (ε={args.epsilon:g}, δ={args.delta:g})")


if __name__ == "__main__":
    main()
