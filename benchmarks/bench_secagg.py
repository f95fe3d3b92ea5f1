"""Secure aggregation's cost, in one run, as ratios.

For an 11.7M-parameter update (MONAI ResNet-18 with 1000 classes, as bench_fedavg) and n = 10
and 50 sites (threshold t = floor(2n/3) + 1):
  * CPU time of one site's whole protocol (keys, shares, quantize + mask, consistency, unmask)
    and of the hub's (relay, summing the masked inputs, recovering and removing the masks), as
    a fraction of one local epoch: the tumor-cnn demo's epoch (one phantom hospital, 64x64) and
    the same epoch of the 11.2M-parameter resnet18 from the model registry, measured here;
  * the hub with no dropout and with the most the round survives (n - t dropped after sharing
    keys: each costs one PRG stream per survivor);
  * bytes a site uploads as a multiple of the float32 update as safetensors: the encrypted
    packed masked vector alone (masked/f32), and with all its key material (total/f32: the
    advertised keys, n - 1 encrypted shares, a signature and the unmasking shares).
At n = 10 every site runs for real and the result is checked against the plain sum; at n = 50
one site runs for real and the other masked inputs are random vectors of the right size (the
hub's work does not depend on their values).

    python benchmarks/bench_secagg.py [--sites 10,50] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import torch

from deeprad.core.checkpoint import to_bytes
from deeprad.core.envelope import EnvelopeContext, seal
from deeprad.core.identity import Identity, KeyRegistry
from deeprad.core.secagg import (
    HubSession,
    SecAggConfig,
    SiteSession,
    default_threshold,
    protocol,
)
from deeprad.core.secagg.quantize import (
    Quantizer,
    flatten,
    pack,
)

R = TypeVar("R")


def cpu(fn: Callable[[], R]) -> tuple[R, float]:
    """fn's result and the process CPU seconds it took."""
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def epoch_seconds(model_name: str) -> tuple[float, int, int]:
    """CPU seconds of one local epoch of `model_name` on the demo's first phantom hospital."""
    from deeprad.core.data import load_dataset
    from deeprad.core.data.phantoms import site_profiles
    from deeprad.core.models import build_model
    from deeprad.core.protocol import DatasetSpec, ModelSpec, TrainConfig
    from deeprad.trainer.local_training import train_epochs

    profile = site_profiles(4, 0)[0]
    spec = DatasetSpec(kind="phantom", image_size=64, split_seed=0,
                       options={"profile": profile.as_dict(), "samples": 240, "seed": 0})
    train, _ = load_dataset(spec)
    model = build_model(ModelSpec(name=model_name))
    params = sum(p.numel() for p in model.parameters())
    warm = TrainConfig(local_epochs=1, batch_size=16)
    train_epochs(model, train.subset(torch.arange(32)), warm, torch.device("cpu"))  # warm-up
    _, secs = cpu(lambda: train_epochs(model, train, TrainConfig(local_epochs=1),
                                       torch.device("cpu")))
    return secs, params, len(train)


def resnet_update() -> dict[str, torch.Tensor]:
    from monai.networks.nets import resnet18

    model = resnet18(spatial_dims=2, n_input_channels=3, num_classes=1000)
    g = torch.Generator().manual_seed(0)
    return {k: 1e-3 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()
            if v.is_floating_point()}


@contextlib.contextmanager
def _masks_skipped() -> Iterator[None]:
    """Stand-in sites skip the PRG streams: the hub's cost does not depend on their values."""
    real = protocol.apply_mask
    protocol.apply_mask = lambda *args, **kwargs: None
    try:
        yield
    finally:
        protocol.apply_mask = real


def run(n: int, dropped: int, vector: np.ndarray, real_sites: int, check: bool
        ) -> dict[str, float]:
    """One round; returns per-site and hub CPU seconds and per-site upload bytes."""
    names = [f"site-{i:02d}" for i in range(n)]
    ids = {s: Identity.generate(s) for s in names}
    hub_id = Identity.generate("hub", "hub")
    registry = KeyRegistry.of([*(i.public() for i in ids.values()), hub_id.public()])
    cfg = SecAggConfig.create("bench", "secagg", 1, names, vector.size)
    q = Quantizer(clip=0.1, max_sites=n)
    sites = {s: SiteSession(cfg, ids[s], registry) for s in names}
    hub = HubSession(cfg, hub_id, registry)
    measured = names[0]
    site_cpu = 0.0
    upload = 0
    masked_upload = 0
    rng = np.random.default_rng(1)

    def timed_site(s: str, fn: Callable[[], R]) -> R:
        nonlocal site_cpu
        out, secs = cpu(fn)
        if s == measured:
            site_cpu += secs
        return out

    adv = [timed_site(s, sites[s].advertise_keys) for s in names]
    upload += len(adv[0].model_dump_json())
    relayed, hub_cpu = cpu(lambda: hub.collect_advertisements(adv))
    shares = [timed_site(s, lambda s=s: sites[s].share_keys(relayed)) for s in names]
    upload += len(shares[0].model_dump_json())
    routed, secs = cpu(lambda: hub.route_shares(shares))
    hub_cpu += secs
    gone = set(names[n - dropped:])
    encoded = {}
    for i, s in enumerate(names):
        if s in gone:
            continue
        if i < real_sites:
            x = timed_site(s, lambda: q.encode(vector, rng))
            encoded[s] = x
            y = timed_site(s, lambda s=s, x=x: sites[s].masked_input(routed[s], x))
            if s == measured:
                env = timed_site(s, lambda y=y, s=s: seal(hub_id.public(), EnvelopeContext(
                    "bench", "secagg", 1, s), pack(y)))
                upload += len(env)
                masked_upload = len(env)
        else:  # a simulated site: every step for real except the mask streams
            with _masks_skipped():
                sites[s].masked_input(routed[s], np.zeros(vector.size, dtype=np.uint32))
            y = rng.integers(0, 2**32, vector.size, dtype=np.uint32)
        _, secs = cpu(lambda s=s, y=y: hub.add_masked_input(s, y))
        hub_cpu += secs
    survivors, secs = cpu(hub.survivor_set)
    hub_cpu += secs
    sigs = [timed_site(s, lambda s=s: sites[s].consistency_signature(survivors))
            for s in survivors.survivors]
    upload += len(sigs[0].model_dump_json())
    relayed_sigs, secs = cpu(lambda: hub.collect_consistency(sigs))
    hub_cpu += secs
    msgs = [timed_site(s, lambda s=s: sites[s].unmask(relayed_sigs))
            for s in survivors.survivors]
    upload += len(msgs[0].model_dump_json())
    result, secs = cpu(lambda: hub.reconstruct(msgs))
    hub_cpu += secs
    if check:
        plain = np.zeros(vector.size, dtype=np.uint32)
        for s in result.survivors:
            plain += encoded[s]
        assert np.array_equal(result.sum, plain), "secure aggregate differs from the plain sum"
        err = np.abs(q.decode_sum(result.sum, len(result.survivors))
                     - len(result.survivors) * np.clip(vector, -0.1, 0.1)).max()
        assert err <= q.error_bound(len(result.survivors)) + 1e-6
    return {"site_cpu": site_cpu, "hub_cpu": hub_cpu, "upload": float(upload),
            "masked_upload": float(masked_upload)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="10,50")
    parser.add_argument("--quick", action="store_true", help="skip the resnet18 epoch")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tumor_epoch, tumor_params, n_train = epoch_seconds("tumor-cnn")
    resnet_epoch = float("nan") if args.quick else epoch_seconds("resnet18")[0]
    update = resnet_update()
    vector, _ = flatten(update)
    float32_bytes = len(to_bytes(update))
    print(f"one local epoch, {n_train} phantom slices 64x64, CPU seconds "
          f"({torch.get_num_threads()} torch threads):")
    print(f"  tumor-cnn ({tumor_params / 1e3:.1f}k params): {tumor_epoch:8.2f} s")
    print(f"  resnet18 (11.2M params):     {resnet_epoch:8.2f} s")
    print(f"update: {vector.size / 1e6:.2f}M float32 values, {float32_bytes / 2**20:.1f} MiB as "
          "safetensors\n")
    print(f"{'n':>3} {'t':>3} {'drop':>4} {'site CPU s':>10} {'/tumor ep':>9} {'/resnet ep':>10} "
          f"{'hub CPU s':>9} {'/tumor ep':>9} {'/resnet ep':>10} {'masked/f32':>10} "
          f"{'total/f32':>9}")
    for n in (int(x) for x in args.sites.split(",")):
        t = default_threshold(n)
        for dropped in (0, n - t):
            real = n if n <= 10 else 1
            r = run(n, dropped, vector, real_sites=real, check=real == n)
            print(f"{n:>3} {t:>3} {dropped:>4} {r['site_cpu']:>10.2f} "
                  f"{r['site_cpu'] / tumor_epoch:>9.2f} {r['site_cpu'] / resnet_epoch:>10.3f} "
                  f"{r['hub_cpu']:>9.2f} {r['hub_cpu'] / tumor_epoch:>9.2f} "
                  f"{r['hub_cpu'] / resnet_epoch:>10.3f} "
                  f"{r['masked_upload'] / float32_bytes:>10.5f} "
                  f"{r['upload'] / float32_bytes:>9.5f}",
                  flush=True)


if __name__ == "__main__":
    main()
