"""Medical image data: loaders, the synthetic generators, in-memory image and volume sets."""

from deeprad.core.data.imageset import ImageSet
from deeprad.core.data.loaders import Samples, concat_samples, load_dataset, load_split
from deeprad.core.data.volumeset import VolumeSet

__all__ = ["ImageSet", "Samples", "VolumeSet", "concat_samples", "load_dataset", "load_split"]
