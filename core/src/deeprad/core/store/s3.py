"""The S3 backend, through the minio SDK (MinIO in production, or any S3 API)."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Literal, TypeVar

from minio import Minio
from minio.error import S3Error

from deeprad.core.errors import ObjectNotFound, StoreError
from deeprad.core.store.base import ObjectStore, check_key
from deeprad.core.store.retry import RetryPolicy
from deeprad.core.store.sigv4 import MAX_EXPIRES, WRITE_ONCE, presign_url

# fput_object switches to multipart above this size; S3 refuses single PUTs above 5 GiB.
PART_SIZE = 64 * 1024 * 1024
DEFAULT_REGION = "us-east-1"  # presigning needs the region; MinIO's default
T = TypeVar("T")


class S3Store(ObjectStore):
    """Objects live under `s3://bucket/prefix/`; an S3 PUT is atomic: readers see whole objects.
    Every request is retried on transient faults under `retry` (`deeprad.core.store.retry`)."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        endpoint: str,
        access_key: str,
        secret_key: str,
        secure: bool = True,
        region: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.region = region or DEFAULT_REGION
        self._keys = (access_key, secret_key)
        self.secure = secure
        self.endpoint = endpoint
        self.uri_prefix = f"s3://{bucket}/{prefix}/" if prefix else f"s3://{bucket}/"
        self.client = Minio(
            endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region
        )
        scheme = "https" if secure else "http"
        self.url = f"s3://{bucket}/{prefix}?endpoint={endpoint}&secure={str(secure).lower()}"
        self.endpoint_url = f"{scheme}://{endpoint}"
        self.retry = retry or RetryPolicy.from_env()

    def _call(self, fn: Callable[[], T]) -> T:
        """One request (or a streamed read), retried on transient faults."""
        return self.retry.call(self.endpoint_url, fn)

    def _name(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def presigned_endpoint(self, public_endpoint: str | None = None) -> str:
        """Where this store's presigned URLs lead (scheme://HOST:PORT), as a site allows it."""
        return f"{'https' if self.secure else 'http'}://{public_endpoint or self.endpoint}"

    def presign(self, key: str, method: Literal["GET", "PUT"], expires: timedelta,
                public_endpoint: str | None = None) -> str:
        """A presigned URL for one object, valid for `expires` (1 s .. 7 days); signed for
        `public_endpoint` (HOST:PORT as the sites reach the store) when given. Offline: no
        request is made.

        A PUT URL is write-once: it is signed with `If-None-Match: *`, so it can create the
        object but never replace it (412), and a request without that header fails the
        signature (403). The holder — a site — cannot overwrite what it wrote once the round
        has read it."""
        expires = min(max(expires, timedelta(seconds=1)), MAX_EXPIRES)
        return presign_url(
            method=method, endpoint_url=self.presigned_endpoint(public_endpoint),
            path=f"{self.bucket}/{self._name(key)}", access_key=self._keys[0],
            secret_key=self._keys[1], region=self.region, expires=expires,
            headers=WRITE_ONCE if method == "PUT" else None)

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet (another process creating it at the
        same moment is fine)."""
        if not self._call(lambda: self.client.bucket_exists(self.bucket)):
            try:
                self._call(lambda: self.client.make_bucket(self.bucket))
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def put_bytes(self, key: str, data: bytes) -> None:
        name = self._name(key)
        self._call(lambda: self.client.put_object(self.bucket, name, io.BytesIO(data),
                                                  len(data)))

    def put_file(self, key: str, path: Path) -> None:
        name = self._name(key)
        self._call(lambda: self.client.fput_object(self.bucket, name, str(path),
                                                   part_size=PART_SIZE))

    def get_bytes(self, key: str) -> bytes:
        name = self._name(key)

        def fetch() -> bytes:
            response = self.client.get_object(self.bucket, name)
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()

        try:
            return self._call(fetch)
        except S3Error as exc:
            raise self._translate(key, exc) from None

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        fd, tmp = tempfile.mkstemp(prefix="deeprad-s3-", suffix=".obj")
        os.close(fd)
        try:
            try:
                name = self._name(key)
                self._call(lambda: self.client.fget_object(self.bucket, name, tmp))
            except S3Error as exc:
                raise self._translate(key, exc) from None
            yield Path(tmp)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def exists(self, key: str) -> bool:
        try:
            name = self._name(key)
            self._call(lambda: self.client.stat_object(self.bucket, name))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise self._translate(key, exc) from None
        return True

    def size(self, key: str) -> int:
        try:
            name = self._name(key)
            return int(self._call(lambda: self.client.stat_object(self.bucket, name)).size or 0)
        except S3Error as exc:
            raise self._translate(key, exc) from None

    def list(self, prefix: str) -> list[str]:
        if prefix.rstrip("/"):
            check_key(prefix.rstrip("/"))
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0

        def names() -> list[str]:
            objects = self.client.list_objects(self.bucket, prefix=full, recursive=True)
            return sorted(o.object_name[strip:] for o in objects if o.object_name)

        return self._call(names)

    def delete(self, key: str) -> None:
        name = self._name(key)
        self._call(lambda: self.client.remove_object(self.bucket, name))

    def _translate(self, key: str, exc: S3Error) -> Exception:
        if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
            return ObjectNotFound(f"{self.url}: no object {key!r}")
        return StoreError(f"{self.url}: {key!r}: {exc.code}: {exc.message}")
