"""Cluster start time and memory, as ratios to the goals (a benchmark, not a timed test).

- start time of one cluster from cached binaries (etcd → nodes Ready); goal: under 30 s
- RSS of three clusters together (etcd, apiserver, controller-manager, scheduler, node agent);
  goal: under 4 GiB

Run: python benchmarks/bench_cluster.py [--settle SECONDS]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

from deeprad.devenv.binaries import missing_tools
from deeprad.devenv.cluster import Cluster, start_clusters
from deeprad.devenv.processes import new_owner_token, sweep_token

START_GOAL_S = 30.0
RSS_GOAL_BYTES = 4 * 1024**3


def group_memory(pgid: int) -> tuple[int, int]:
    """(RSS, PSS) of every process in a process group.

    RSS counts the shared multicall binary's pages once per process; PSS splits shared pages
    between the processes mapping them, so summed PSS is what the machine really spends.
    """
    rss = pss = 0
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                info = proc.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
        except (psutil.Error, ProcessLookupError):
            pass
    return rss, pss


def memory_by_component(clusters: list[Cluster]) -> dict[str, tuple[int, int]]:
    """Summed (RSS, PSS) per component name over all clusters."""
    totals: dict[str, tuple[int, int]] = {}
    for cluster in clusters:
        for name, pgid in cluster.pids().items():
            rss, pss = group_memory(pgid)
            old = totals.get(name, (0, 0))
            totals[name] = (old[0] + rss, old[1] + pss)
    return totals


def main() -> int:
    """Print the numbers and their ratio to the goals."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--settle", type=float, default=20.0,
                        help="seconds to let controllers settle before measuring RSS")
    args = parser.parse_args()
    missing = missing_tools(("etcd", "kube-apiserver", "kube-controller-manager",
                             "kube-scheduler", "kubectl"))
    if missing:
        print(f"tools missing ({', '.join(missing)}); run `make tools`", file=sys.stderr)
        return 1
    token = new_owner_token()
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        base = Path(tmp)
        try:
            one = Cluster("solo", base, owner_token=token)
            begin = time.monotonic()
            one.start()
            single = time.monotonic() - begin
            one.stop()

            three = [Cluster(n, base, owner_token=token) for n in ("hub", "site-1", "site-2")]
            begin = time.monotonic()
            start_clusters(three)
            parallel = time.monotonic() - begin
            time.sleep(args.settle)
            per_component = memory_by_component(three)
            total = sum(rss for rss, _ in per_component.values())
            total_pss = sum(pss for _, pss in per_component.values())
        finally:
            sweep_token(token)
    gib = 1024**3
    print(f"one cluster start:          {single:6.1f} s   goal {START_GOAL_S:.0f} s   "
          f"ratio {single / START_GOAL_S:.2f}")
    print(f"three clusters (parallel):  {parallel:6.1f} s")
    print(f"three clusters RSS:         {total / gib:6.2f} GiB goal {RSS_GOAL_BYTES / gib:.0f} GiB "
          f"ratio {total / RSS_GOAL_BYTES:.2f}")
    print(f"three clusters PSS:         {total_pss / gib:6.2f} GiB (shared pages counted once)")
    for name, (rss, pss) in sorted(per_component.items(), key=lambda kv: -kv[1][0]):
        print(f"  {name:<24} RSS {rss / 1024**2:6.0f} MiB  PSS {pss / 1024**2:6.0f} MiB"
              " (3 clusters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
