"""The trainer's step time versus a bare PyTorch loop doing the same training, on the CPU.

Both start from the same weights and train the same model on the same in-memory phantom
slices with the same batches (same shuffling seed), optimizer and loss; runs alternate so that
machine noise hits both alike. Prints the median step time of each, their ratio (goal <= 1.10)
and whether both ended with identical weights (they should: same work, same order).

    python benchmarks/bench_trainer.py [--model tumor-cnn] [--image-size 64] [--samples 256]
                                       [--batch-size 16] [--epochs 2] [--repeats 7] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from deeprad.core.data import ImageSet
from deeprad.core.data.phantoms import ScannerProfile, generate_phantoms
from deeprad.core.models import build_model
from deeprad.core.protocol import ModelSpec, TrainConfig
from deeprad.trainer import train_epochs
from deeprad.trainer.local_training import limit_threads

GOAL = 1.10


def bare_loop(model: nn.Module, data: ImageSet, cfg: TrainConfig, epochs: int) -> None:
    """What an engineer would write by hand: shuffle, index, forward, BCE, backward, step."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = nn.functional.binary_cross_entropy_with_logits(
                model(data.images[idx]).flatten(), data.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tumor-cnn")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.samples, args.epochs, args.repeats = 16, 32, 1, 2
    threads = limit_threads()
    data = generate_phantoms(args.samples, ScannerProfile(), args.image_size, seed=0)
    spec = ModelSpec(name=args.model)
    cfg = TrainConfig(batch_size=args.batch_size, local_epochs=args.epochs, device="cpu")
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in build_model(spec).state_dict().items()}
    steps = args.epochs * -(-args.samples // args.batch_size)

    def run(kind: str) -> tuple[float, dict[str, torch.Tensor]]:
        model = build_model(spec)
        model.load_state_dict(init)
        start = time.perf_counter()
        if kind == "trainer":
            train_epochs(model, data, cfg, torch.device("cpu"))
        else:
            bare_loop(model, data, cfg, args.epochs)
        return (time.perf_counter() - start) / steps, model.state_dict()

    run("trainer")  # warm-up: allocator, kernels, lazy imports
    run("bare")
    times: dict[str, list[float]] = {"trainer": [], "bare": []}
    final: dict[str, dict[str, torch.Tensor]] = {}
    for r in range(args.repeats):
        for kind in (("trainer", "bare") if r % 2 == 0 else ("bare", "trainer")):
            t, final[kind] = run(kind)
            times[kind].append(t)
    trainer_s, bare_s = (statistics.median(times[k]) for k in ("trainer", "bare"))
    same = all(torch.equal(final["trainer"][k], final["bare"][k]) for k in final["bare"])
    ratio = trainer_s / bare_s
    print(f"model {args.model}, {args.samples} images {args.image_size}x{args.image_size}, "
          f"batch {args.batch_size}, {steps} steps per run, {args.repeats} runs each, "
          f"{threads} torch threads (CPU)")
    print(f"bare PyTorch loop : {bare_s * 1e3:8.2f} ms/step  "
          f"({args.batch_size / bare_s:7.0f} images/s)")
    print(f"deeprad trainer   : {trainer_s * 1e3:8.2f} ms/step  "
          f"({args.batch_size / trainer_s:7.0f} images/s)")
    print(f"step-time ratio trainer / bare = {ratio:.3f}  (overhead {100 * (ratio - 1):+.1f}%, "
          f"goal <= {GOAL:.2f})")
    print(f"identical final weights: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
