"""One interface over the ways a model can run: a verified checkpoint in PyTorch, an ONNX file
in onnxruntime, a TorchScript (or TensorRT-compiled TorchScript) file. Inputs are preprocessed
image batches [N, 1, S, S]; outputs are one tumour logit per image."""

from __future__ import annotations

import contextlib
import json
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deeprad.core.errors import ConfigError
from deeprad.inference.checkpoint_file import (
    CHECKPOINT_SUFFIXES,
    CheckpointFile,
    load_checkpoint_model,
)
from deeprad.inference.errors import MissingBackend
from deeprad.inference.hub_key import HubTrust

ONNX_SUFFIXES = (".onnx",)
TORCHSCRIPT_SUFFIXES = (".ts", ".pt", ".torchscript")
# Where exports keep what a reader needs: ONNX metadata_props keys, or one JSON object in a
# TorchScript file's extra files under this name.
META_FILE = "deeprad.json"


def pick_device(preference: str = "auto") -> torch.device:
    """`auto`: CUDA when a GPU is visible, else CPU."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MissingBackend(f"--device {preference}: no CUDA GPU is visible to this process; "
                             "use --device auto or cpu")
    return device


def onnx_install_hint() -> str:
    return "install it with: pip install 'deeprad[export]' (onnx, onnxruntime)"


class Runner(ABC):
    """A model that turns preprocessed images into logits."""

    kind: str
    source: Path
    metadata: dict[str, str]
    torch_model: nn.Module | None = None  # only a checkpoint has one (gradients, saliency)
    checkpoint: CheckpointFile | None = None

    @property
    def image_size(self) -> int | None:
        """The image size the model was exported for, if the file says."""
        size = self.metadata.get("deeprad.image_size")
        return int(size) if size else None

    @abstractmethod
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 1, S, S] float32 images (CPU) -> [N] float32 logits (CPU)."""


class TorchRunner(Runner):
    """A PyTorch module, e.g. from a verified checkpoint."""

    kind = "checkpoint"

    def __init__(self, model: nn.Module, source: Path, device: torch.device,
                 checkpoint: CheckpointFile | None = None) -> None:
        self.torch_model = model.eval()
        self.source, self.device, self.checkpoint = source, device, checkpoint
        self.metadata = {}
        self._on_device = model.to(device)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        out = self._on_device(images.to(self.device))
        return _one_logit(out, self.source).float().cpu()


class OnnxRunner(Runner):
    """An ONNX file in onnxruntime: the CUDA provider when present and asked for, else CPU."""

    kind = "onnx"

    def __init__(self, path: Path, device: torch.device) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingBackend(f"{path}: running ONNX models needs onnxruntime; "
                                 f"{onnx_install_hint()}") from None
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:
            raise ConfigError(f"{path}: onnxruntime cannot load it: {exc}") from exc
        self.source = path
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self._input = self.session.get_inputs()[0].name

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        feed = {self._input: np.ascontiguousarray(images.numpy(), dtype=np.float32)}
        out = torch.from_numpy(np.asarray(self.session.run(None, feed)[0]))
        return _one_logit(out, self.source).float()


class TorchScriptRunner(Runner):
    """A TorchScript file (a local file the user chose; TorchScript's own loader, no pickle of
    arbitrary objects). TensorRT-compiled files need torch-tensorrt and a GPU."""

    kind = "torchscript"

    def __init__(self, path: Path, device: torch.device) -> None:
        with contextlib.suppress(ImportError):
            import torch_tensorrt  # noqa: F401  (registers the TensorRT engine ops, if present)
        extra = {META_FILE: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
                self.module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        except (RuntimeError, ValueError) as exc:
            if "tensorrt" in str(exc).lower():
                raise MissingBackend(
                    f"{path} holds TensorRT engines: running it needs an NVIDIA GPU and "
                    "torch-tensorrt (pip install 'deeprad[gpu]'); or export to onnx instead"
                ) from exc
            raise ConfigError(f"{path}: not a TorchScript file torch.jit.load can read: "
                              f"{str(exc).splitlines()[0]}") from exc
        self.module.eval()
        self.source, self.device = path, device
        raw: Any = json.loads(extra[META_FILE] or "{}")
        self.metadata = {str(k): str(v) for k, v in raw.items()}
        if self.metadata.get("deeprad.format") == "tensorrt":
            self.kind = "tensorrt"

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        out = self.module(images.to(self.device))
        return _one_logit(out, self.source).float().cpu()


def _one_logit(out: torch.Tensor, source: Path) -> torch.Tensor:
    if out.ndim > 2 or (out.ndim == 2 and out.shape[1] != 1):
        raise ConfigError(f"{source}: the model gives outputs of shape {list(out.shape)}; "
                          "predict expects one tumour logit per image ([N, 1])")
    return out.reshape(-1)


def open_runner(path: Path, device: str = "auto", trust: HubTrust | None = None) -> Runner:
    """A runner for a checkpoint (`.json` / `.safetensors`, digest and hub signature verified
    against `trust`, as in `load_checkpoint_file`), an `.onnx` file or a TorchScript file
    (`.ts`, `.pt`, `.torchscript`)."""
    if not path.is_file():
        raise ConfigError(f"model {path} does not exist")
    dev = pick_device(device)
    name = path.name.lower()
    if path.suffix in CHECKPOINT_SUFFIXES:
        model, ckpt = load_checkpoint_model(path, trust)
        return TorchRunner(model, path, dev, ckpt)
    if name.endswith(ONNX_SUFFIXES):
        return OnnxRunner(path, dev)
    if name.endswith(TORCHSCRIPT_SUFFIXES):
        return TorchScriptRunner(path, dev)
    raise ConfigError(
        f"model {path}: unknown kind; give a checkpoint (.json manifest or .safetensors), an "
        f"ONNX file (.onnx) or a TorchScript file ({', '.join(TORCHSCRIPT_SUFFIXES)})")
