"""Using a trained model: verified checkpoint files, export (ONNX, TorchScript, TensorRT),
`deeprad predict` with calibrated thresholds, and Grad-CAM saliency maps."""

from deeprad.inference.checkpoint_file import load_checkpoint_file, load_checkpoint_model
from deeprad.inference.export import export_checkpoint
from deeprad.inference.predict import predict_paths
from deeprad.inference.runtimes import open_runner
from deeprad.inference.thresholds import threshold_for_sensitivity

__all__ = ["export_checkpoint", "load_checkpoint_file", "load_checkpoint_model", "open_runner",
           "predict_paths", "threshold_for_sensitivity"]
