"""The trainer's 3D segmentation epoch versus a bare MONAI loop doing the same training.

Both start from the same weights and train the same network (unet3d by default) on the same
in-memory multi-sequence volumes with the same batches (same shuffling seed), the same MONAI
DiceCELoss and the same Adam, with the same torch threads; runs alternate so that machine noise
hits both alike. Prints the median step time of each, their ratio (goal <= 1.10), whether both
ended with identical weights (they should: same work, same order), and the share of the
trainer's step spent getting a batch onto the device (goal: never the bottleneck).

The volumes are SYNTHETIC (noise with bright cubes as lesions): a timing workload only.

    python benchmarks/bench_seg_trainer.py [--model unet3d] [--edge 48] [--channels 3]
        [--volumes 16] [--batch-size 2] [--epochs 1] [--repeats 5] [--device cpu] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from monai.losses import DiceCELoss
from torch import nn

from deeprad.core.data import VolumeSet
from deeprad.core.models import build_model
from deeprad.core.protocol import ModelSpec, TrainConfig
from deeprad.trainer import train_epochs
from deeprad.trainer.local_training import BatchFeeder, limit_threads

GOAL = 1.10
LOADING_GOAL = 0.10  # batch loading above this share of a step would start to show


def synthetic_volumes(n: int, channels: int, edge: int, seed: int = 0) -> VolumeSet:
    """SYNTHETIC: noise volumes, three in four holding a bright cube as the lesion."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, 1, edge, edge, edge, dtype=torch.uint8)
    size = max(2, edge // 8)
    for i in range(n):
        if i % 4 != 3:
            d, h, w = torch.randint(0, edge - size, (3,), generator=g).tolist()
            masks[i, 0, d : d + size, h : h + size, w : w + size] = 1
    images = torch.rand(n, channels, edge, edge, edge, generator=g) + masks
    return VolumeSet(images, masks, tuple(f"synthetic-{i}" for i in range(n)),
                     spacing=(3.5, 3.5, 3.5))


def bare_loop(model: nn.Module, data: VolumeSet, cfg: TrainConfig, epochs: int,
              device: torch.device) -> None:
    """What an engineer would write by hand with MONAI: volumes on the device once, shuffle,
    index, forward, DiceCELoss (Dice over the batch, as the trainer trains), backward, step."""
    images, masks = data.images.to(device), data.masks.to(device).float()
    loss_fn = DiceCELoss(sigmoid=True, batch=True)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr,
                           fused=True if device.type == "cuda" else None)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=gen).to(device)
        for i in range(0, len(data), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = loss_fn(model(images[idx]), masks[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loading_time(data: VolumeSet, cfg: TrainConfig, device: torch.device, epochs: int) -> float:
    """Seconds the trainer's BatchFeeder takes to put one run's batches on the device."""
    feeder = BatchFeeder(data, device, cfg.batch_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    _sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        order = feeder.epoch_order(torch.randperm(len(data), generator=gen))
        for i in range(0, len(data), cfg.batch_size):
            feeder.batch(order[i : i + cfg.batch_size])
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="unet3d")
    parser.add_argument("--edge", type=int, default=48, help="volume edge in voxels")
    parser.add_argument("--channels", type=int, default=3, help="sequences per volume")
    parser.add_argument("--volumes", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    args = parser.parse_args()
    if args.quick:
        args.edge, args.volumes, args.repeats = 16, 2, 2
    device = torch.device(args.device)
    threads = limit_threads()
    data = synthetic_volumes(args.volumes, args.channels, args.edge)
    spec = ModelSpec(name=args.model, task="segmentation",
                     kwargs={"in_channels": args.channels})
    # fp32 on both sides: the trainer's "auto" precision would autocast on a GPU
    cfg = TrainConfig(batch_size=args.batch_size, local_epochs=args.epochs, lr=1e-3,
                      device=args.device, precision="fp32")
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in build_model(spec).state_dict().items()}
    steps = args.epochs * -(-args.volumes // args.batch_size)

    def run(kind: str) -> tuple[float, dict[str, torch.Tensor]]:
        model = build_model(spec)
        model.load_state_dict(init)
        model.to(device)
        _sync(device)
        start = time.perf_counter()
        if kind == "trainer":
            train_epochs(model, data, cfg, device)
        else:
            bare_loop(model, data, cfg, args.epochs, device)
        _sync(device)
        return (time.perf_counter() - start) / steps, {
            k: v.cpu() for k, v in model.state_dict().items()}

    run("trainer")  # warm-up: allocator, kernels, lazy imports
    run("bare")
    times: dict[str, list[float]] = {"trainer": [], "bare": []}
    final: dict[str, dict[str, torch.Tensor]] = {}
    loading: list[float] = []
    for r in range(args.repeats):
        for kind in (("trainer", "bare") if r % 2 == 0 else ("bare", "trainer")):
            t, final[kind] = run(kind)
            times[kind].append(t)
        loading.append(loading_time(data, cfg, device, args.epochs) / steps)
    trainer_s, bare_s = (statistics.median(times[k]) for k in ("trainer", "bare"))
    load_s = statistics.median(loading)
    same = all(torch.equal(final["trainer"][k], final["bare"][k]) for k in final["bare"])
    ratio = trainer_s / bare_s
    share = load_s / trainer_s
    print(f"SYNTHETIC volumes (noise + cube lesions): model {args.model}, {args.volumes} "
          f"volumes {args.channels}x{args.edge}^3, batch {args.batch_size}, {steps} steps per "
          f"run, {args.repeats} runs each, {threads} torch threads ({device.type}), fp32")
    print(f"bare MONAI loop   : {bare_s * 1e3:8.2f} ms/step  "
          f"({args.batch_size / bare_s:7.1f} volumes/s)")
    print(f"deeprad trainer   : {trainer_s * 1e3:8.2f} ms/step  "
          f"({args.batch_size / trainer_s:7.1f} volumes/s)")
    print(f"step-time ratio trainer / bare = {ratio:.3f}  (overhead {100 * (ratio - 1):+.1f}%, "
          f"goal <= {GOAL:.2f})")
    print(f"batch loading     : {load_s * 1e3:8.3f} ms/step = {100 * share:.2f}% of the "
          f"trainer's step ({'not the bottleneck' if share < LOADING_GOAL else 'TOO SLOW'}, "
          f"goal < {100 * LOADING_GOAL:.0f}%)")
    print(f"identical final weights: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
