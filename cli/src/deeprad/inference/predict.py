"""`deeprad predict`: tumour probabilities and labels for a folder of DICOM / NIfTI / PNG
images, preprocessed exactly as in training (`deeprad.core.data.loaders.read_image`), with a
default, explicit or calibrated decision threshold."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from deeprad.core.data.loaders import IMAGE_SUFFIXES, load_folder, read_image
from deeprad.core.errors import ConfigError, DataError
from deeprad.core.protocol import DatasetSpec
from deeprad.inference.hub_key import HubTrust
from deeprad.inference.runtimes import Runner, open_runner
from deeprad.inference.saliency import default_layer, gradcam, save_overlay
from deeprad.inference.thresholds import (
    DEFAULT_THRESHOLD,
    ThresholdChoice,
    threshold_for_sensitivity,
)

DEFAULT_IMAGE_SIZE = DatasetSpec().image_size  # what `deeprad simulate` trains on by default
OutputFormat = Literal["csv", "json"]


@dataclass(frozen=True)
class Prediction:
    """One image's result: the model's tumour probability and the label at the threshold."""

    path: str
    probability: float
    label: int  # 1: tumour (probability >= threshold)


@dataclass
class PredictionReport:
    """Everything `deeprad predict` writes."""

    model: str
    model_kind: str
    image_size: int
    threshold: float
    threshold_source: Literal["default", "explicit", "calibrated"]
    calibration: ThresholdChoice | None = None
    predictions: list[Prediction] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["calibration"] = self.calibration.as_dict() if self.calibration else None
        return out


def _is_image(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_SUFFIXES)


def find_images(inputs: Sequence[Path]) -> list[Path]:
    """Image files among `inputs`: files as given, folders searched recursively (sorted)."""
    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and _is_image(f))
        elif p.is_file():
            if not _is_image(p):
                raise ConfigError(f"{p}: not an image Deep-Rad reads; suffixes: "
                                  f"{', '.join(IMAGE_SUFFIXES)}")
            files.append(p)
        else:
            raise ConfigError(f"input {p} does not exist")
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under "
                        f"{', '.join(str(p) for p in inputs)}")
    return files


def resolve_image_size(runner: Runner, requested: int | None) -> int:
    """The preprocessing size: as asked, else what the exported file records, else the
    training default. An export is fixed to its size, so a different one is refused."""
    recorded = runner.image_size
    if requested is not None and recorded is not None and requested != recorded:
        raise ConfigError(f"--image-size {requested}: {runner.source} was exported for "
                          f"{recorded}-pixel images; drop --image-size or re-export with "
                          f"--image-size {requested}")
    return requested or recorded or DEFAULT_IMAGE_SIZE


def probabilities(runner: Runner, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Tumour probabilities of preprocessed images [N, 1, S, S], in batches."""
    return torch.cat([torch.sigmoid(runner.logits(images[i : i + batch_size]))
                      for i in range(0, len(images), batch_size)])


def predict_files(runner: Runner, files: Sequence[Path], image_size: int, threshold: float,
                  batch_size: int = 32) -> list[Prediction]:
    """Read, preprocess and score `files`, `batch_size` images in memory at a time."""
    out: list[Prediction] = []
    for i in range(0, len(files), batch_size):
        chunk = files[i : i + batch_size]
        probs = probabilities(runner, torch.stack([read_image(f, image_size) for f in chunk]),
                              batch_size)
        out += [Prediction(str(f), float(p), int(float(p) >= threshold))
                for f, p in zip(chunk, probs.tolist(), strict=True)]
    return out


def calibrate(runner: Runner, folder: Path, image_size: int, target: float,
              positive_class: str | None = None) -> ThresholdChoice:
    """The threshold reaching `target` sensitivity on a labelled folder (`<class>/<images>`,
    two classes, the tumour class found as in training)."""
    data = load_folder(folder, image_size, positive_class)
    return threshold_for_sensitivity(probabilities(runner, data.images), data.labels, target)


def predict_paths(model: Path, inputs: Sequence[Path], *, image_size: int | None = None,
                  threshold: float | None = None, calibrate_folder: Path | None = None,
                  target_sensitivity: float = 0.9, positive_class: str | None = None,
                  device: str = "auto", batch_size: int = 32,
                  runner: Runner | None = None, trust: HubTrust | None = None
                  ) -> PredictionReport:
    """Score every image under `inputs` with `model` (a checkpoint, digest and hub signature
    verified against `trust` as in `open_runner`, or an exported file); the threshold is
    `threshold`, or calibrated on `calibrate_folder`, or 0.5."""
    if threshold is not None and calibrate_folder is not None:
        raise ConfigError("give either --threshold or --calibrate, not both")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--threshold {threshold}: a probability in [0, 1]")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be >= 1")
    runner = runner or open_runner(model, device, trust)
    size = resolve_image_size(runner, image_size)
    files = find_images(inputs) if inputs else []
    choice = None
    if calibrate_folder is not None:
        choice = calibrate(runner, calibrate_folder, size, target_sensitivity, positive_class)
        t, source = choice.threshold, "calibrated"
    elif threshold is not None:
        t, source = threshold, "explicit"
    else:
        t, source = DEFAULT_THRESHOLD, "default"
    return PredictionReport(
        model=str(model), model_kind=runner.kind, image_size=size, threshold=t,
        threshold_source=source,  # type: ignore[arg-type]
        calibration=choice, predictions=predict_files(runner, files, size, t, batch_size))


def render(report: PredictionReport, fmt: OutputFormat) -> str:
    """The report as CSV (path, probability, label) or as JSON (with threshold details)."""
    if fmt == "json":
        return json.dumps(report.as_dict(), indent=2) + "\n"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "probability", "label"])
    for p in report.predictions:
        writer.writerow([p.path, repr(p.probability), p.label])
    return buf.getvalue()


def output_format(path: Path | None, requested: str | None) -> OutputFormat:
    """--format if given, else the output file's suffix (.json / .csv), else CSV."""
    fmt = requested or (path.suffix.lower().lstrip(".") if path is not None else "csv")
    if fmt not in ("csv", "json"):
        raise ConfigError(f"output format {fmt!r} (from {path}): use .csv or .json, or --format")
    return fmt  # type: ignore[return-value]


def require_torch_model(runner: Runner) -> tuple[nn.Module, str]:
    """(PyTorch model, registry name) for saliency; refuses exported files, which have no
    gradients to follow."""
    if runner.torch_model is None or runner.checkpoint is None:
        raise ConfigError(
            f"--saliency needs the PyTorch model, and {runner.source} is an exported "
            f"{runner.kind} file without gradients; pass the checkpoint it came from "
            "(e.g. runs/demo/final.safetensors with final.json beside it)")
    return runner.torch_model, runner.checkpoint.manifest.model.name


def saliency_png(runner: Runner, image: Path, out: Path, image_size: int,
                 layer: str | None = None) -> Path:
    """Grad-CAM of `image` as a PNG (the slice, and the heat-map over it) at `out`."""
    model, name = require_torch_model(runner)
    heat = gradcam(model, read_image(image, image_size), layer or default_layer(model, name))
    return save_overlay(read_image(image, image_size), heat, out)
