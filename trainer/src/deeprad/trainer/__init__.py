"""The trainer: local training at a hospital and the Job that wraps it."""

from deeprad.trainer.local_training import (
    SiteTraining,
    evaluate,
    image_logits,
    train_epochs,
    train_site,
)
from deeprad.trainer.segmentation import inference_roi

__all__ = ["SiteTraining", "evaluate", "image_logits", "inference_roi", "train_epochs",
           "train_site"]
