"""Presigned S3 URLs (AWS Signature Version 4, query-string form) that can bind request headers.

The hub presigns a site's writes so that the request must carry `If-None-Match: *`: the store
then refuses (412) to replace an object that exists, and the header is part of the signature
(`X-Amz-SignedHeaders`), so a site cannot drop it and overwrite its update after the round
aggregated it (403). The minio client signs only `host` in a presigned URL, hence this module:
the algorithm is AWS's "Authenticating requests: using query parameters" (SigV4), path-style
addressing as MinIO and S3-compatible servers expect it, body unsigned (`UNSIGNED-PAYLOAD`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, urlsplit

from deeprad.core.errors import ConfigError

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
MAX_EXPIRES = timedelta(days=7)  # SigV4 presigned URLs live at most 7 days
# A PUT carrying this creates an object and never replaces one: an existing key answers 412.
WRITE_ONCE: Mapping[str, str] = {"If-None-Match": "*"}
_DEFAULT_PORTS = {"http": 80, "https": 443}


def presign_url(*, method: str, endpoint_url: str, path: str, access_key: str,
                secret_key: str, region: str, expires: timedelta,
                headers: Mapping[str, str] | None = None, now: datetime | None = None) -> str:
    """A URL for `method` on `path` at `endpoint_url` (scheme://HOST[:PORT]; path-style S3:
    `bucket/object`), valid for `expires` (1 s .. 7 days) from `now`; each of `headers` must
    then be sent with exactly the signed value, or the store answers 403."""
    parts = urlsplit(endpoint_url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if (parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path.strip("/")
            or port == -1 or parts.query or parts.username is not None):
        raise ConfigError(f"S3 endpoint {endpoint_url!r}: expected http(s)://HOST[:PORT]")
    seconds = int(expires.total_seconds())
    if not 1 <= seconds <= MAX_EXPIRES.total_seconds():
        raise ConfigError(f"presigned URL lifetime {expires} is outside 1 s .. 7 days")
    host = _host(parts.scheme, parts.hostname, port)
    when = (now or datetime.now(UTC)).astimezone(UTC)
    stamp, day = when.strftime("%Y%m%dT%H%M%SZ"), when.strftime("%Y%m%d")
    scope = f"{day}/{region}/s3/aws4_request"
    signed = {"host": host, **{k.strip().lower(): " ".join(v.split())
                               for k, v in (headers or {}).items()}}
    names = ";".join(sorted(signed))
    query = {
        "X-Amz-Algorithm": ALGORITHM,
        "X-Amz-Credential": f"{access_key}/{scope}",
        "X-Amz-Date": stamp,
        "X-Amz-Expires": str(seconds),
        "X-Amz-SignedHeaders": names,
    }
    uri = "/" + quote(path.lstrip("/"), safe="/~")
    canonical_query = _query(query)
    canonical_request = "\n".join([
        method, uri, canonical_query,
        "".join(f"{k}:{signed[k]}\n" for k in sorted(signed)), names, UNSIGNED_PAYLOAD])
    to_sign = "\n".join([ALGORITHM, stamp, scope,
                         hashlib.sha256(canonical_request.encode()).hexdigest()])
    key = _signing_key(secret_key, day, region)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return f"{parts.scheme}://{host}{uri}?{canonical_query}&X-Amz-Signature={signature}"


def _host(scheme: str, hostname: str, port: int | None) -> str:
    """The Host header as clients send it: no port when it is the scheme's default."""
    shown = f"[{hostname}]" if ":" in hostname else hostname
    return shown if port is None or port == _DEFAULT_PORTS[scheme] else f"{shown}:{port}"


def _query(params: Mapping[str, str]) -> str:
    """Canonical query string: names and values percent-encoded (RFC 3986), sorted by name."""
    encoded = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in params.items())
    return "&".join(f"{k}={v}" for k, v in encoded)


def _signing_key(secret_key: str, day: str, region: str) -> bytes:
    key = f"AWS4{secret_key}".encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key
