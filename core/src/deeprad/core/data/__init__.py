"""Medical image data: loaders, the synthetic phantom generator, in-memory image sets."""

from deeprad.core.data.imageset import ImageSet
from deeprad.core.data.loaders import load_dataset

__all__ = ["ImageSet", "load_dataset"]
