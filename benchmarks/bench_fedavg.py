"""Streaming FedAvg versus a plain torch weighted sum, in one run, printed as ratios.

For N = 5, 20, 50 updates of an 11.7M-parameter model (ResNet-18 size):
  * time of the FedAvg strategy folding the updates in versus a plain torch weighted sum of the
    same in-memory tensors (the memory-bandwidth baseline);
  * time of the whole aggregator job (read from the store, sha256, validation, checkpoint
    write), also as a multiple of the plain sum;
  * peak resident memory of the job above the process's baseline after imports, as a multiple
    of one model's size, versus holding all N updates at once as list-based aggregators do.
Each measurement runs in a fresh subprocess; peaks are sampled every millisecond.
`--large` adds one run of a
1-billion-parameter model over 5 updates (needs ~30 GB of disk and ~15 GB of RAM).

    python benchmarks/bench_fedavg.py [--sizes 5,20,50] [--large] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

from deeprad.core.checkpoint import (
    TensorFile,
    sha256_file,
    update_bytes,
    write_checkpoint,
)
from deeprad.core.envelope import EnvelopeContext, seal_file
from deeprad.core.identity import Identity, KeyRegistry
from deeprad.core.layout import StudyLayout
from deeprad.core.protocol import AggregationTask, ModelSpec, UpdateManifest
from deeprad.core.signing import Statement, new_nonce, sign_statement
from deeprad.core.store.local import LocalStore
from deeprad.simulate.keys import make_study_keys

LAYOUT = StudyLayout("bench", "fedavg")


def model_shapes(large: bool) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of MONAI's 2D ResNet-18 with 1000 classes (11.7M values, 125 tensors), or
    for `large`, 1e9 values in 4096 x 4096 layers."""
    if large:
        shapes = {f"layer{i}.weight": (4096, 4096) for i in range(59)}
        shapes["tail.weight"] = (1_000_000_000 - 59 * 4096 * 4096,)
        return shapes
    from monai.networks.nets import resnet18

    model = resnet18(spatial_dims=2, n_input_channels=3, num_classes=1000)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if v.is_floating_point()}


def _side(workdir: Path, name: str) -> Path:
    """A folder beside the store: key folders, and plaintext copies for the fold/plain modes
    (the store itself only ever holds sealed updates)."""
    return workdir.with_name(f"{workdir.name}-{name}")


def prepare(workdir: Path, n_updates: int, large: bool) -> None:
    """A signed round-0 checkpoint and `n_updates` sealed, signed site updates in a local store
    (not timed)."""
    store = LocalStore(workdir)
    sites = [f"site-{i}" for i in range(n_updates)]
    keys = make_study_keys(_side(workdir, "keys"), sites)
    hub = Identity.load(keys.hub_dir)
    plain = _side(workdir, "plain")
    plain.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shapes = model_shapes(large)
    glob = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    parent = write_checkpoint(store, LAYOUT, {"study": "fedavg", "round": 0, "producer": "bench",
                                              "model": ModelSpec(), "parent_sha256": None}, glob,
                              hub=hub)
    del glob
    for i, site in enumerate(sites):
        delta = {k: torch.randn(s, generator=gen) * 0.01 for k, s in shapes.items()}
        (plain / f"{site}.safetensors").write_bytes(update_bytes(delta, 100 + i))
        del delta
        sealed = plain / f"{site}.bin"
        seal_file(hub.public(), EnvelopeContext("bench", "fedavg", 1, site),
                  plain / f"{site}.safetensors", sealed)
        statement = Statement(kind="update", namespace="bench", study="fedavg", round=1,
                              site=site, nonce=new_nonce(), parent_sha256=parent.payload_sha256,
                              payload_sha256=sha256_file(sealed))
        store.put_file(LAYOUT.update_payload(1, site), sealed)
        sealed.unlink()
        store.put_text(LAYOUT.update_manifest(1, site), UpdateManifest(
            namespace="bench", study="fedavg", round=1, site=site, nonce=statement.nonce,
            parent_sha256=parent.payload_sha256, payload_sha256=statement.payload_sha256,
            signature=sign_statement(Identity.load(keys.site_dirs[site]), statement),
            num_samples=100 + i, producer="bench").model_dump_json())


def _rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss_during(fn: Callable[[], None]) -> int:
    """Highest RSS seen while `fn` runs, sampled every millisecond."""
    peak, done = [_rss()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(peak[0], _rss())


def child(mode: str, workdir: Path) -> dict[str, float]:
    """One measurement in this (fresh) process."""
    from deeprad.aggregator.job import run_aggregation_task
    from deeprad.aggregator.strategies import FedAvg

    store = LocalStore(workdir)
    sites = LAYOUT.sites_with_updates(store.list(LAYOUT.updates_prefix(1)), 1)
    manifests = [UpdateManifest.model_validate_json(store.get_bytes(LAYOUT.update_manifest(1, s)))
                 for s in sites]
    paths = [_side(workdir, "plain") / f"{s}.safetensors" for s in sites]
    glob = TensorFile(store.root / LAYOUT.global_weights(0))
    model_bytes = sum(p.stat().st_size for p in paths) / len(paths)
    for p in paths:  # warm the page cache so every mode reads from memory, not disk
        p.read_bytes()
    weights = [float(m.num_samples) for m in manifests]
    if mode == "job":
        base = _rss()
        t0 = time.perf_counter()
        keys = _side(workdir, "keys")
        registry = KeyRegistry.of(Identity.load(keys / n).public() for n in ["hub", *sites])
        task = AggregationTask(namespace="bench", study="fedavg", round=1,
                               registry_json=registry.to_json(), identity_dir=str(keys / "hub"))
        for p in (store.root / LAYOUT.update_payload(1, s) for s in sites):
            p.read_bytes()  # the sealed copies too
        peak = peak_rss_during(lambda: run_aggregation_task(task, store) and None)
        return {"seconds": time.perf_counter() - t0, "peak_over_base": (peak - base) / model_bytes}
    # "fold" and "plain" time the arithmetic alone, on updates already in memory (copied out
    # of the file mapping), as list-based aggregators hold them.
    base = _rss()
    updates = [{k: v.clone() for k, v in TensorFile(p).load_all().items()} for p in paths]
    held = (_rss() - base) / model_bytes
    t0 = time.perf_counter()
    if mode == "fold":
        strat = FedAvg()
        strat.begin(glob)
        for u, w in zip(updates, weights, strict=True):
            strat.add(u, int(w))
        strat.finish()
    else:
        total = sum(weights)
        for k in updates[0]:
            acc = updates[0][k] * (weights[0] / total)
            for u, w in zip(updates[1:], weights[1:], strict=True):
                acc.add_(u[k], alpha=w / total)
            acc.add_(glob[k])
    return {"seconds": time.perf_counter() - t0, "held_over_base": held}


def measure(mode: str, workdir: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--workdir", str(workdir)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="5,20,50")
    parser.add_argument("--large", action="store_true", help="also 1e9 parameters x 5 updates")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.workdir)))
        return
    torch.set_num_threads(1)
    runs = [(int(n), False) for n in args.sizes.split(",") if n]
    if args.large:
        runs.append((5, True))
    print(f"{'model':>13} {'N':>3} {'fold s':>8} {'plain s':>8} {'ratio':>6} {'job s':>7} "
          f"{'job/plain':>9} {'job peak':>9} {'all held':>9}   (memory: multiples of one model)")
    for n, large in runs:
        work = Path(tempfile.mkdtemp(prefix="deeprad-bench-", dir=args.workdir))
        try:
            prepare(work, n, large)
            fold = None if large else measure("fold", work)
            plain = None if large else measure("plain", work)
            job = measure("job", work)
        finally:
            for folder in (work, _side(work, "keys"), _side(work, "plain")):
                shutil.rmtree(folder, ignore_errors=True)
        if plain and fold:
            cols = (f"{fold['seconds']:8.3f} {plain['seconds']:8.3f} "
                    f"{fold['seconds'] / plain['seconds']:6.2f} {job['seconds']:7.2f} "
                    f"{job['seconds'] / plain['seconds']:9.1f} {job['peak_over_base']:8.2f}x "
                    f"{plain['held_over_base']:8.1f}x")
        else:
            cols = (f"{'n/a':>8} {'n/a':>8} {'n/a':>6} {job['seconds']:7.1f} {'n/a':>9} "
                    f"{job['peak_over_base']:8.2f}x {'n/a':>9}")
        print(f"{'1B params' if large else 'ResNet-18':>13} {n:>3} {cols}", flush=True)
    print("goals: fold/plain <= 1.5; job peak <= 2.5x at every N (holding all N costs N x)")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
