"""`deeprad export`: a verified checkpoint to ONNX, TorchScript or TensorRT, each file checked
against the PyTorch model's outputs before it is put in place.

Exports take one [N, 1, S, S] float32 image batch (N dynamic, S fixed: the training image
size) and give one tumour logit per image. They carry the model spec, image size and
checkpoint digest (ONNX metadata_props; a `deeprad.json` extra file in TorchScript), so
`deeprad predict` preprocesses images the way the model was trained.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from deeprad.core.errors import ConfigError
from deeprad.inference.checkpoint_file import CheckpointFile, checkpoint_paths
from deeprad.inference.errors import ExportMismatch, MissingBackend
from deeprad.inference.hub_key import HubTrust, PinnedHub
from deeprad.inference.runtimes import (
    META_FILE,
    OnnxRunner,
    Runner,
    TorchScriptRunner,
    onnx_install_hint,
)

ExportFormat = Literal["onnx", "torchscript", "tensorrt"]
FORMATS: tuple[ExportFormat, ...] = ("onnx", "torchscript", "tensorrt")
SUFFIXES: dict[str, str] = {"onnx": ".onnx", "torchscript": ".ts", "tensorrt": ".trt.ts"}
# (rtol, atol) on logits: fp32 graphs must agree closely; TensorRT builds fp16 engines.
TOLERANCE: dict[str, tuple[float, float]] = {"onnx": (1e-3, 1e-4), "torchscript": (1e-3, 1e-4),
                                             "tensorrt": (5e-2, 5e-2)}
EXPORT_BATCH, CHECK_BATCH, TRT_MAX_BATCH = 2, 3, 64


@dataclass(frozen=True)
class ExportResult:
    """Where the export went and how closely it reproduces the PyTorch model."""

    path: Path
    format: str
    image_size: int
    max_abs_diff: float  # logits, on a seeded batch of CHECK_BATCH images
    checked_with: str
    metadata: dict[str, str]
    signed_by: PinnedHub | None = None  # the hub whose signature was checked; None: skipped


def export_metadata(ckpt: CheckpointFile, image_size: int, fmt: str) -> dict[str, str]:
    """What an exported file records about its origin and its expected input."""
    m = ckpt.manifest
    return {"deeprad.format": fmt, "deeprad.model": m.model.model_dump_json(),
            "deeprad.image_size": str(image_size), "deeprad.output": "logit",
            "deeprad.checkpoint_sha256": m.payload_sha256, "deeprad.study": m.study,
            "deeprad.round": str(m.round)}


def default_output(checkpoint: Path, fmt: str) -> Path:
    """`runs/demo/final.safetensors` -> `runs/demo/final.onnx` (`.ts`, `.trt.ts`)."""
    weights, _ = checkpoint_paths(checkpoint)
    return weights.with_name(weights.stem + SUFFIXES[fmt])


@contextlib.contextmanager
def _staged(output: Path) -> Iterator[Path]:
    """A temporary path beside `output`, renamed onto it only if the block succeeds: a failed
    or mismatching export never leaves a file where a user would pick it up."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".part-{output.name}")
    try:
        yield tmp
        os.replace(tmp, output)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The tracers warn about Python branches on shapes and about their own deprecation; the
    output check after each export is what decides whether it is right."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def export_onnx_model(model: nn.Module, example: torch.Tensor, path: Path,
                      meta: dict[str, str] | None = None, opset: int = 17) -> None:
    """Write `model` as ONNX (input `image` [N, C, H, W] with dynamic N, output `logit`) with
    `meta` in its metadata_props; checked by onnx's checker, not yet against PyTorch."""
    try:
        import onnx
    except ImportError:
        raise MissingBackend(f"ONNX export needs the onnx package; {onnx_install_hint()}") from None
    with _quiet():
        # The TorchScript-based exporter: the torch.export-based one needs onnxscript, which
        # Deep-Rad does not depend on; the onnxruntime check below guards either way.
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=["logit"],
                          dynamic_axes={"image": {0: "batch"}, "logit": {0: "batch"}})
    proto = onnx.load(str(path))
    for key, value in (meta or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path,
                        meta: dict[str, str]) -> None:
    with _quiet():
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path), _extra_files={META_FILE: json.dumps(meta)})


def _export_tensorrt(model: nn.Module, example: torch.Tensor, path: Path,
                     meta: dict[str, str]) -> None:
    if not torch.cuda.is_available():
        raise MissingBackend("TensorRT export needs an NVIDIA GPU, and none is visible to this "
                             "process; run it on a GPU node, or export --format onnx here")
    try:
        import torch_tensorrt
    except ImportError:
        raise MissingBackend("TensorRT export needs torch-tensorrt: pip install 'deeprad[gpu]' "
                             "(on a machine with CUDA); or export --format onnx") from None
    gpu_model, gpu_example = model.cuda().eval(), example.cuda()
    size = tuple(example.shape[1:])
    spec = torch_tensorrt.Input(min_shape=(1, *size), opt_shape=(EXPORT_BATCH, *size),
                                max_shape=(TRT_MAX_BATCH, *size), dtype=torch.float32)
    with _quiet():
        compiled = torch_tensorrt.compile(gpu_model, ir="dynamo", inputs=[spec],
                                          enabled_precisions={torch.float16, torch.float32})
        torch_tensorrt.save(compiled, str(path), output_format="torchscript",
                            inputs=[gpu_example])
        # Re-save with the metadata predict reads (torch_tensorrt.save takes no extra files).
        reloaded = torch.jit.load(str(path), map_location="cuda")
        torch.jit.save(reloaded, str(path), _extra_files={META_FILE: json.dumps(meta)})
    model.cpu()


def _check(runner: Runner, model: nn.Module, image_size: int, fmt: str) -> float:
    """Max |logit difference| between `runner` and `model` on seeded images; raises beyond the
    format's tolerance."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(CHECK_BATCH, 1, image_size, image_size, generator=gen)
    with torch.no_grad():
        expected = model.cpu()(images).reshape(-1).float()
    got = runner.logits(images)
    diff = float((got - expected).abs().max())
    rtol, atol = TOLERANCE[fmt]
    if not torch.allclose(got, expected, rtol=rtol, atol=atol):
        raise ExportMismatch(
            f"{fmt} export of {runner.source.name} differs from the PyTorch model by up to "
            f"{diff:.3g} in logits (tolerance atol {atol}, rtol {rtol}); it was not written. "
            "The model likely has shape-dependent Python code the tracer cannot capture")
    return diff


def export_checkpoint(checkpoint: Path, fmt: str, output: Path | None = None,
                      image_size: int = 64, opset: int = 17, trust: HubTrust | None = None
                      ) -> ExportResult:
    """Verify `checkpoint`'s digest and hub signature (`trust`, default: the run's hub key
    beside it), export it as `fmt`, check the export's outputs against PyTorch, and only then
    move it to `output` (default: beside the checkpoint)."""
    from deeprad.inference.checkpoint_file import load_checkpoint_model

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if not 8 <= image_size <= 1024:
        raise ConfigError(f"--image-size {image_size}: must be 8..1024, the training image size")
    # refuses a tampered payload or a manifest the pinned hub did not sign first
    model, ckpt = load_checkpoint_model(checkpoint, trust)
    target = output or default_output(checkpoint, fmt)
    meta = export_metadata(ckpt, image_size, fmt)
    example = torch.rand(EXPORT_BATCH, 1, image_size, image_size,
                         generator=torch.Generator().manual_seed(1))
    with _staged(target) as tmp:
        runner: Runner
        if fmt == "onnx":
            export_onnx_model(model, example, tmp, meta, opset)
            onnx_runner = OnnxRunner(tmp, torch.device("cpu"))
            runner, checked = onnx_runner, f"onnxruntime {onnx_runner.session.get_providers()[0]}"
        elif fmt == "torchscript":
            _export_torchscript(model, example, tmp, meta)
            runner = TorchScriptRunner(tmp, torch.device("cpu"))
            checked = "torch.jit.load (CPU)"
        else:
            _export_tensorrt(model, example, tmp, meta)
            runner = TorchScriptRunner(tmp, torch.device("cuda"))
            checked = "torch-tensorrt (CUDA)"
        diff = _check(runner, model, image_size, fmt)
    return ExportResult(target, fmt, image_size, diff, checked, meta, ckpt.signed_by)
