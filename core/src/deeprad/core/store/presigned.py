"""A store that reaches exactly the objects a site was granted, through presigned URLs.

The hub presigns (GET or PUT, valid until the round's deadline) each object a site's trainer
reads or writes in one round — `site_grants` lists them — and hands the URLs over in the site's
work item. The trainer then runs against `PresignedStore` like against any other store, with no
storage credentials: any other key is refused before a request is made, and so is every URL
that does not lead to the store endpoint the site allows (`deeprad.core.store.endpoint`; the
site agent passes it in $DEEPRAD_STORE_ENDPOINT). Redirects are never followed.

Every object a site writes is write-once: its PUT URL is signed with `If-None-Match: *`
(`S3Store.presign`), this store sends that header, and the store refuses (412) to replace an
object, so a site cannot swap its update after the round aggregated it. A retried upload whose
first attempt may have landed (the answer was lost) counts as done when the retry hears 412:
S3 writes are atomic, only this task holds the URL, and the signed manifest names the payload's
digest, so bytes that were not this upload's would be refused by the aggregator, never used.
A 409 (S3's ConditionalRequestConflict: another write to the key is in flight) is retried but
never taken as a sign that this upload landed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from deeprad.core.errors import ConfigError, ObjectNotFound, PolicyViolation, StoreError
from deeprad.core.layout import StudyLayout
from deeprad.core.secagg.relay import HUB_BROADCASTS, HUB_ROUTED, SITE_POSTS
from deeprad.core.store.base import ObjectStore, check_key
from deeprad.core.store.endpoint import StoreEndpoint
from deeprad.core.store.retry import (
    RetryableAnswer,
    RetryPolicy,
    answer_cause,
    s3_error_code,
    transient_cause,
)
from deeprad.core.store.sigv4 import WRITE_ONCE

Method = Literal["GET", "PUT"]
URLS_ENV = "DEEPRAD_PRESIGNED_URLS"
ENDPOINT_ENV = "DEEPRAD_STORE_ENDPOINT"
_CHUNK = 1 << 20
_NOT_SENT = (ConnectionRefusedError, socket.gaierror)  # the request never reached the store
log = logging.getLogger("deeprad.store")


def _url_map(name: str, text: str) -> dict[str, str]:
    """The JSON object of object key -> URL in environment variable `name`."""
    try:
        urls = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{name} is not JSON: {exc}") from None
    if not isinstance(urls, dict) or not all(isinstance(v, str) for v in urls.values()):
        raise ConfigError(f"{name} must be a JSON object of key -> URL strings")
    return urls


def site_grants(layout: StudyLayout, round_no: int, site: str, secure_aggregation: bool
                ) -> dict[str, Method]:
    """Every object one site's trainer touches in round `round_no`, with the method it needs:
    the global model it starts from, its update, manifest, result and audit record, and (with
    secure aggregation) its messages and the hub's answers."""
    prev = round_no - 1
    grants: dict[str, Method] = {
        layout.global_manifest(prev): "GET",
        layout.global_weights(prev): "GET",
        layout.update_payload(round_no, site): "PUT",
        layout.update_manifest(round_no, site): "PUT",
        layout.result(round_no, site): "PUT",
        layout.site_audit(round_no, site): "PUT",
    }
    if secure_aggregation:
        for step in SITE_POSTS:
            grants[layout.secagg_message(round_no, step, site)] = "PUT"
        for step in HUB_BROADCASTS:
            grants[layout.secagg_message(round_no, step)] = "GET"
        for step in HUB_ROUTED:
            grants[layout.secagg_message(round_no, step, site)] = "GET"
    return grants


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is a request to wherever the answer says: never follow one."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> None:
        fp.close()
        target = urllib.parse.urlsplit(newurl)
        raise PolicyViolation(f"presigned store: the store answered {req.get_method()} with a "
                              f"{code} redirect to {target.scheme}://{target.netloc}; redirects "
                              "are never followed, requests go to the store endpoint only")


class PresignedStore(ObjectStore):
    """Reads and writes only the keys in `urls` (key -> presigned URL), and only when every
    URL leads to `endpoint` (the store the site allows); PolicyViolation before any request
    otherwise."""

    def __init__(self, urls: Mapping[str, str], endpoint: str, timeout_s: float = 120.0,
                 retry: RetryPolicy | None = None) -> None:
        self.endpoint = StoreEndpoint.parse(endpoint, ENDPOINT_ENV)
        for key, url in urls.items():
            try:
                self.endpoint.check(url)
            except PolicyViolation as exc:
                raise PolicyViolation(f"presigned store: refusing the URL of {key!r}: {exc}; "
                                      "no request was sent") from None
        self.urls = {check_key(k): v for k, v in urls.items()}
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy.from_env()
        self.url = f"presigned:({len(self.urls)} objects at {self.endpoint.text})"
        self.uri_prefix = "presigned:/"
        self._opener = urllib.request.build_opener(_RefuseRedirects())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PresignedStore:
        """From $DEEPRAD_PRESIGNED_URLS (a JSON object key -> URL) and $DEEPRAD_STORE_ENDPOINT
        (the store endpoint the site allows)."""
        env = os.environ if environ is None else environ
        text = env.get(URLS_ENV)
        if not text:
            raise ConfigError(f"store 'presigned:' needs {URLS_ENV} (a JSON object of object "
                              "key -> presigned URL); the site agent sets it")
        endpoint = env.get(ENDPOINT_ENV)
        if not endpoint:
            raise PolicyViolation(f"store 'presigned:' needs {ENDPOINT_ENV}, the store endpoint "
                                  "this site allows (the site agent sets it from its "
                                  "store.endpoint); no presigned URL is followed without it")
        return cls(_url_map(URLS_ENV, text), endpoint, retry=RetryPolicy.from_env(env))

    def _url(self, key: str) -> str:
        try:
            return self.urls[key]
        except KeyError:
            raise ConfigError(f"this task was granted no URL for {key!r}; the hub presigns only "
                              "the objects a site may read or write in its round") from None

    def _open(self, key: str, method: Method, data: bytes | None = None,
              body_path: Path | None = None, headers: dict[str, str] | None = None
              ) -> urllib.response.addinfourl | None:
        """Send one request, retried on transient faults (`deeprad.core.store.retry`); None
        only for a write-once PUT whose retry found the object that an earlier attempt (whose
        answer was lost) stored."""
        url = self._url(key)
        landed = False  # an earlier attempt may have reached the store

        def attempt() -> urllib.response.addinfourl | None:
            nonlocal landed
            body: Any = data
            hdrs = dict(headers or {})
            if method == "PUT":
                hdrs.update(WRITE_ONCE)
            if body_path is not None:
                hdrs["Content-Length"] = str(body_path.stat().st_size)
                body = body_path.open("rb")
            req = urllib.request.Request(url, data=body, method=method, headers=hdrs)
            try:
                return self._opener.open(req, timeout=self.timeout_s)
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    raise ObjectNotFound(f"presigned store: no object {key!r}") from None
                if exc.code == 403:
                    raise StoreError(f"presigned store: {method} {key!r} refused (403): the URL "
                                     "expired (round deadline passed) or was altered") from None
                if exc.code == 412 and method == "PUT":
                    if landed:
                        log.info("presigned store: PUT %r: the earlier attempt stored it", key)
                        return None
                    raise StoreError(
                        f"presigned store: PUT {key!r} refused (412 Precondition Failed): the "
                        "object exists and objects a site writes are write-once, so the first "
                        "upload stands; send a new update in a later round") from None
                detail = " ".join(exc.read(1000).decode("utf-8", "replace").split())
                cause = answer_cause(exc.code, s3_error_code(detail))
                if cause is None:
                    raise StoreError(f"presigned store: {method} {key!r} failed: HTTP "
                                     f"{exc.code} {detail[:300]}") from None
                # A 5xx may come after the store wrote the object; a 409 says another write
                # to the key is in flight, which is not ours landing.
                landed = landed or exc.code != 409
                raise RetryableAnswer(cause) from exc
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                landed = landed or not isinstance(getattr(exc, "reason", exc), _NOT_SENT)
                if transient_cause(exc) is None:
                    raise StoreError(f"presigned store: {method} {key!r} failed: {exc}") from None
                raise
            finally:
                if body_path is not None and hasattr(body, "close"):
                    body.close()

        return self.retry.call(self.endpoint.text, attempt)

    def _get(self, key: str, headers: dict[str, str] | None = None
             ) -> urllib.response.addinfourl:
        resp = self._open(key, "GET", headers=headers)
        assert resp is not None  # only a PUT answers None
        return resp

    def _put(self, key: str, data: bytes | None = None, body_path: Path | None = None) -> None:
        resp = self._open(key, "PUT", data=data, body_path=body_path)
        if resp is not None:
            resp.close()

    def put_bytes(self, key: str, data: bytes) -> None:
        self._put(key, data=data)

    def put_file(self, key: str, path: Path) -> None:
        self._put(key, body_path=Path(path))

    def get_bytes(self, key: str) -> bytes:
        with self._get(key) as resp:
            return bytes(resp.read())

    @contextlib.contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        fd, tmp = tempfile.mkstemp(prefix="deeprad-")
        path = Path(tmp)
        try:
            with os.fdopen(fd, "wb") as out, self._get(key) as resp:
                shutil.copyfileobj(resp, out, _CHUNK)
            yield path
        finally:
            path.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        try:
            self._get(key, headers={"Range": "bytes=0-0"}).close()
        except ObjectNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        with self._get(key, headers={"Range": "bytes=0-0"}) as resp:
            total = resp.headers.get("Content-Range", "").rpartition("/")[2]
            return int(total) if total.isdigit() else int(resp.headers.get("Content-Length", 0))

    def list(self, prefix: str) -> list[str]:
        raise StoreError("presigned store: listing is not granted; the trainer reads and writes "
                         "named objects only")

    def delete(self, key: str) -> None:
        raise StoreError(f"presigned store: deleting {key!r} is not granted")
