"""The object-store interface every component uses, and the URL that selects a backend."""

from __future__ import annotations

import abc
import contextlib
import os
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from deeprad.core.errors import ConfigError


class ObjectStore(abc.ABC):
    """Keys are '/'-separated paths; writes are atomic, so a reader never sees half an object."""

    url: str
    uri_prefix: str  # object URIs are this plus the key (s3://bucket/prefix/, file:///root/)

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, replacing any previous object."""

    @abc.abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Store the contents of a local file under `key` (streamed; large files allowed)."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Return the whole object; raises ObjectNotFound if it is missing."""

    @abc.abstractmethod
    def local_copy(self, key: str) -> contextlib.AbstractContextManager[Path]:
        """Yield a local file holding the object's bytes (the object itself when it is local)."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """True if an object is stored under `key`."""

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes; raises ObjectNotFound if it is missing."""

    @abc.abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys under `prefix`, sorted."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; missing keys are ignored."""

    def uri(self, key: str) -> str:
        """The object's URI, as statuses and manifests show it."""
        return f"{self.uri_prefix}{check_key(key)}"

    def key_of(self, uri: str) -> str:
        """The key of an object URI of this store; ConfigError for a URI elsewhere."""
        if not uri.startswith(self.uri_prefix):
            raise ConfigError(f"{uri!r} is not in this object store (its URIs start with "
                              f"{self.uri_prefix!r}); copy the object into it first")
        return check_key(uri[len(self.uri_prefix):])

    def get_text(self, key: str) -> str:
        """The object decoded as UTF-8."""
        return self.get_bytes(key).decode("utf-8")

    def put_text(self, key: str, text: str) -> None:
        """Store UTF-8 text."""
        self.put_bytes(key, text.encode("utf-8"))


def open_store(url: str) -> ObjectStore:
    """Open a store from a URL: a local path, `file:///path`, `s3://bucket[/prefix]?endpoint=HOST:PORT`,
    or `presigned:` (a site's granted objects, from $DEEPRAD_PRESIGNED_URLS).

    S3 credentials come from DEEPRAD_S3_ACCESS_KEY / DEEPRAD_S3_SECRET_KEY (or the AWS_* names);
    `secure=false` in the query selects plain HTTP, `region=` sets the region.
    """
    parsed = urlparse(url)
    if url == "presigned:":
        from deeprad.core.store.presigned import PresignedStore

        return PresignedStore.from_env()
    if parsed.scheme in ("", "file"):
        from deeprad.core.store.local import LocalStore

        return LocalStore(Path(parsed.path if parsed.scheme else url))
    if parsed.scheme == "s3":
        from deeprad.core.store.s3 import S3Store

        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        endpoint = query.get("endpoint")
        if not endpoint:
            raise ConfigError(
                f"store URL {url!r}: missing ?endpoint=HOST:PORT (e.g. s3://deeprad?endpoint=minio:9000)"
            )
        access = os.environ.get("DEEPRAD_S3_ACCESS_KEY") or os.environ.get("AWS_ACCESS_KEY_ID")
        secret = os.environ.get("DEEPRAD_S3_SECRET_KEY") or os.environ.get("AWS_SECRET_ACCESS_KEY")
        if not access or not secret:
            raise ConfigError(
                f"store URL {url!r}: set DEEPRAD_S3_ACCESS_KEY and DEEPRAD_S3_SECRET_KEY"
            )
        return S3Store(
            bucket=parsed.netloc,
            prefix=parsed.path.strip("/"),
            endpoint=endpoint,
            access_key=access,
            secret_key=secret,
            secure=query.get("secure", "true").lower() not in ("0", "false", "no"),
            region=query.get("region"),
        )
    raise ConfigError(f"store URL {url!r}: unsupported scheme {parsed.scheme!r}; use a path or s3://")


def check_key(key: str) -> str:
    """Refuse keys that could escape the store's root."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ConfigError(f"object key {key!r} is not a clean relative path")
    return key
