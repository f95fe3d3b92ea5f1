"""Deep-Rad: federated learning for medical imaging across hospitals."""

__version__ = "0.1.0"
