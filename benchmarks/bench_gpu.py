"""Every GPU measurement in one run (under 10 minutes on one GPU), printed as ratios.

1. Training throughput (images/s): the Deep-Rad trainer (`train_epochs`: autocast, resident
   dataset, fused optimizer) versus a bare PyTorch loop with the same model, batch, precision
   and memory format on the same GPU; then the trainer with torch.compile.
2. Inference throughput (images/s): eager fp32, eager with autocast, torch.compile,
   ONNX in onnxruntime (CUDA provider with I/O binding when onnxruntime-gpu is installed, else
   CPU) and TensorRT (torch-tensorrt, fp16) where installed; each as a ratio to eager fp32.

    python benchmarks/bench_gpu.py [--model resnet18|densenet121] [--image-size 224]
                                   [--precision bf16] [--channels-last] [--no-compile]
                                   [--no-tensorrt] [--json results.json]
    python benchmarks/bench_gpu.py --cpu-smoke   # tiny sizes on the CPU, seconds (unit-tested)

A missing backend prints a `skipped: <why>` row instead of failing. In --cpu-smoke mode
torch.compile uses the "eager" backend, which exercises the Dynamo path without minutes of
C++ compilation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deeprad.core.data import ImageSet
from deeprad.core.models import build_model
from deeprad.core.protocol import ModelSpec, TrainConfig
from deeprad.inference.export import export_onnx_model
from deeprad.trainer import train_epochs
from deeprad.trainer.local_training import limit_threads, resolve_precision

DTYPE_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class Row:
    section: str
    name: str
    images_per_s: float | None
    note: str = ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(fn: Callable[[], object], images: int, device: torch.device, warmup: int,
               iters: int, budget_s: float) -> float:
    """Images per second of `fn` (which processes `images` images), after `warmup` calls;
    stops early once `budget_s` is spent so a slow backend cannot eat the run."""
    for _ in range(warmup):
        fn()
    sync(device)
    start, done = time.perf_counter(), 0
    while done < iters:
        fn()
        done += 1
        if time.perf_counter() - start > budget_s:
            break
    sync(device)
    return images * done / (time.perf_counter() - start)


# ---- training -----------------------------------------------------------------------------


def bare_train(model: nn.Module, data: ImageSet, cfg: TrainConfig, device: torch.device,
               dtype: torch.dtype | None) -> None:
    """A hand-written loop: data copied to the GPU once, shuffled indices, autocast forward,
    BCE in fp32, fused Adam (with a gradient scaler for fp16)."""
    images, labels = data.images.to(device), data.labels.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=device.type == "cuda" or None)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed))
    order = order.to(device)
    model.train()
    for i in range(0, len(data), cfg.batch_size):
        idx = order[i : i + cfg.batch_size]
        x = images[idx]
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x)
        loss = nn.functional.binary_cross_entropy_with_logits(out.flatten().float(), labels[idx])
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    sync(device)


def bench_training(args: argparse.Namespace, device: torch.device) -> list[Row]:
    spec = ModelSpec(name=args.model)
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in build_model(spec).state_dict().items()}
    n = args.batch_size * args.train_steps
    gen = torch.Generator().manual_seed(0)
    data = ImageSet(torch.rand(n, 1, args.image_size, args.image_size, generator=gen),
                    (torch.arange(n) % 2).float())
    warm = ImageSet(data.images[: 2 * args.batch_size], data.labels[: 2 * args.batch_size])
    cfg = TrainConfig(batch_size=args.batch_size, local_epochs=1, precision=args.precision,
                      channels_last=args.channels_last, device=str(device))
    dtype = resolve_precision(args.precision, device)

    def fresh() -> nn.Module:
        model = build_model(spec)
        model.load_state_dict(init)
        model.to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def timed(fn: Callable[[], object]) -> float:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return n / (time.perf_counter() - start)

    rows = []
    model = fresh()
    bare_train(model, warm, cfg, device, dtype)
    bare = timed(lambda: bare_train(model, data, cfg, device, dtype))
    model = fresh()
    train_epochs(model, warm, cfg, device)
    trainer = timed(lambda: train_epochs(model, data, cfg, device))
    label = f"{args.model} {args.image_size}px batch {args.batch_size} {DTYPE_NAMES[dtype]}" + (
        " channels_last" if cfg.channels_last else "")
    rows.append(Row("train", f"bare PyTorch loop ({label})", bare))
    rows.append(Row("train", "deeprad trainer", trainer, f"trainer/bare = {trainer / bare:.3f}"))
    if args.compile:
        compiled_cfg = cfg.model_copy(update={"compile": True})
        model = fresh()
        with compile_backend(args.compile_backend):
            t0 = time.perf_counter()
            train_epochs(model, warm, compiled_cfg, device)  # compiles
            warmup_s = time.perf_counter() - t0
            rate = timed(lambda: train_epochs(model, data, compiled_cfg, device))
        rows.append(Row("train", f"deeprad trainer, compile=True ({args.compile_backend})", rate,
                        f"trainer-compiled/bare = {rate / bare:.3f}; first call "
                        f"{warmup_s:.0f} s"))
    else:
        rows.append(Row("train", "deeprad trainer, compile=True", None, "skipped: --no-compile"))
    return rows


@contextlib.contextmanager
def compile_backend(backend: str) -> Any:
    """Make torch.compile (as the trainer calls it) use `backend`."""
    if backend == "inductor":
        yield
        return
    original = torch.compile

    def patched(model: Any, *a: Any, **kw: Any) -> Any:
        kw.setdefault("backend", backend)
        return original(model, *a, **kw)

    torch.compile = patched  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.compile = original


# ---- inference ----------------------------------------------------------------------------


def bench_inference(args: argparse.Namespace, device: torch.device) -> list[Row]:
    torch.manual_seed(0)
    model = build_model(ModelSpec(name=args.model)).to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    b, s = args.infer_batch, args.image_size
    x = torch.rand(b, 1, s, s, device=device)
    dtype = resolve_precision(args.precision, device)
    run = {"warmup": args.warmup, "iters": args.iters, "budget_s": args.budget_s}
    rows: list[Row] = []

    def eager(d: torch.dtype | None) -> Callable[[], object]:
        def step() -> object:
            with torch.no_grad(), torch.autocast(device.type, dtype=d or torch.float32,
                                                 enabled=d is not None):
                return model(x)
        return step

    base = throughput(eager(None), b, device, **run)
    rows.append(Row("infer", f"eager fp32 ({args.model} {s}px batch {b})", base))
    if dtype is not None:
        rate = throughput(eager(dtype), b, device, **run)
        rows.append(Row("infer", f"eager {DTYPE_NAMES[dtype]}", rate, f"x{rate / base:.2f}"))
    if args.compile:
        compiled: Any = torch.compile(model, backend=args.compile_backend)
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                             enabled=dtype is not None):
            compiled(x)
        warm_s = time.perf_counter() - t0

        def step() -> object:
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                 enabled=dtype is not None):
                return compiled(x)

        rate = throughput(step, b, device, **run)
        rows.append(Row("infer", f"torch.compile ({args.compile_backend}) "
                                 f"{DTYPE_NAMES[dtype]}", rate,
                        f"x{rate / base:.2f}; first call {warm_s:.0f} s"))
    else:
        rows.append(Row("infer", "torch.compile", None, "skipped: --no-compile"))
    rows.append(bench_onnx(model, x, device, base, run))
    rows.append(bench_tensorrt(args, model, x, device, base, run))
    return rows


def bench_onnx(model: nn.Module, x: torch.Tensor, device: torch.device, base: float,
               run: dict[str, Any]) -> Row:
    try:
        import onnxruntime as ort
    except ImportError:
        return Row("infer", "onnxruntime", None, "skipped: onnxruntime not installed "
                                                 "(pip install 'deeprad[export]')")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx_model(model.float().cpu(), x[:2].float().cpu().contiguous(), path)
        model.to(device)
        cuda_ep = device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_ep else [
            "CPUExecutionProvider"]
        sess = ort.InferenceSession(str(path), providers=providers)
    name = sess.get_inputs()[0].name
    if cuda_ep:
        xc = x.float().contiguous()
        binding = sess.io_binding()
        binding.bind_input(name=name, device_type="cuda", device_id=device.index or 0,
                           element_type=np.float32, shape=tuple(xc.shape),
                           buffer_ptr=xc.data_ptr())
        binding.bind_output(sess.get_outputs()[0].name, device_type="cuda",
                            device_id=device.index or 0)

        def step() -> object:
            sess.run_with_iobinding(binding)
            return None
        label = "onnxruntime CUDA EP fp32 (I/O binding)"
    else:
        feed = {name: x.float().cpu().numpy()}

        def step() -> object:
            return sess.run(None, feed)
        label = "onnxruntime CPU EP fp32" + (
            " (onnxruntime-gpu not installed: host CPU, not the GPU)"
            if device.type == "cuda" else "")
    rate = throughput(step, len(x), torch.device("cpu") if not cuda_ep else device, **run)
    return Row("infer", label, rate, f"x{rate / base:.2f}")


def bench_tensorrt(args: argparse.Namespace, model: nn.Module, x: torch.Tensor,
                   device: torch.device, base: float, run: dict[str, Any]) -> Row:
    if not args.tensorrt:
        return Row("infer", "TensorRT", None, "skipped: --no-tensorrt")
    if device.type != "cuda":
        return Row("infer", "TensorRT", None, "skipped: needs a CUDA GPU")
    try:
        import torch_tensorrt
    except ImportError:
        return Row("infer", "TensorRT", None, "skipped: torch-tensorrt not installed "
                                              "(pip install 'deeprad[gpu]')")
    t0 = time.perf_counter()
    trt = torch_tensorrt.compile(model.float(), ir="dynamo", inputs=[x.float()],
                                 enabled_precisions={torch.float16, torch.float32})
    build_s = time.perf_counter() - t0

    def step() -> object:
        with torch.no_grad():
            return trt(x)

    rate = throughput(step, len(x), device, **run)
    return Row("infer", "TensorRT fp16 (torch-tensorrt)", rate,
               f"x{rate / base:.2f}; engine build {build_s:.0f} s")


# ---- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny sizes on the CPU (seconds): keeps this script from rotting")
    parser.add_argument("--model", default="resnet18", help="resnet18 or densenet121 (registry)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64, help="training batch")
    parser.add_argument("--train-steps", type=int, default=40, help="timed training steps")
    parser.add_argument("--infer-batch", type=int, default=128)
    parser.add_argument("--iters", type=int, default=50, help="timed inference calls")
    parser.add_argument("--warmup", type=int, default=10, help="untimed inference calls")
    parser.add_argument("--budget-s", type=float, default=20.0,
                        help="cap on each inference measurement's timed seconds")
    parser.add_argument("--precision", default="bf16", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--no-tensorrt", dest="tensorrt", action="store_false")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    args.compile_backend = "inductor"
    if args.cpu_smoke:
        args.model, args.image_size, args.batch_size, args.train_steps = "tumor-cnn", 32, 8, 3
        args.infer_batch, args.iters, args.warmup, args.budget_s = 8, 3, 1, 5.0
        args.compile_backend = "eager"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("bench_gpu: no CUDA GPU is visible; run it on a GPU node, or pass --cpu-smoke "
              "for the quick CPU check", file=sys.stderr)
        return 2
    threads = limit_threads()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU, {threads} threads (smoke: tiny sizes, ratios mean nothing)")
    print(f"device: {where}; torch {torch.__version__}")
    start = time.perf_counter()
    rows = bench_training(args, device) + bench_inference(args, device)
    print(f"\n{'':<2}{'measurement':<68} {'images/s':>10}  ratio / notes")
    for r in rows:
        rate = f"{r.images_per_s:10.1f}" if r.images_per_s is not None else f"{'-':>10}"
        print(f"{r.section:<6}{r.name:<64} {rate}  {r.note}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
