"""Errors of the inference tools; all are DeepRadErrors, so the CLI exits 2 with the message."""

from deeprad.core.errors import ConfigError, DeepRadError


class MissingBackend(ConfigError):
    """An optional runtime (onnxruntime, torch-tensorrt, a GPU) is not available here."""


class ExportMismatch(DeepRadError):
    """An exported model's outputs differ from the PyTorch model's beyond tolerance."""
