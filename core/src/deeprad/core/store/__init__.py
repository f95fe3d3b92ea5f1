"""One object-store interface with two backends: a local directory and S3 (minio SDK)."""

from deeprad.core.store.base import ObjectStore, open_store

__all__ = ["ObjectStore", "open_store"]
