"""The SigV4 query presigner: AWS's published example, the minio client's own URLs where both
sign only `host`, and a write-once PUT that binds `If-None-Match: *` into its signature.
Whether a store enforces that signature is proved against the real S3 server in
tests/integration/test_store_write_once.py."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from minio import Minio

from deeprad.core.errors import ConfigError
from deeprad.core.store.s3 import S3Store
from deeprad.core.store.sigv4 import WRITE_ONCE, presign_url

AWS_KEY, AWS_SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
WHEN = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def _query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def test_reproduces_the_aws_published_example() -> None:
    # "Authenticating Requests: Using Query Parameters (AWS Signature Version 4)", GET test.txt
    url = presign_url(method="GET", endpoint_url="https://examplebucket.s3.amazonaws.com",
                      path="test.txt", access_key=AWS_KEY, secret_key=AWS_SECRET,
                      region="us-east-1", expires=timedelta(days=1),
                      now=datetime(2013, 5, 24, tzinfo=UTC))
    assert url == (
        "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
        "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404")


@pytest.mark.parametrize("method", ["GET", "PUT"])
@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9000", "https://minio.example.org"])
def test_signing_only_host_gives_the_minio_clients_url(method: str, endpoint: str) -> None:
    """What the hub presigned before write-once (GETs still are): byte for byte minio's."""
    parts = urlsplit(endpoint)
    client = Minio(parts.netloc, access_key="AKID", secret_key="se/cr+et",
                   secure=parts.scheme == "https", region="eu-west-1")
    name = "ns/my study/rounds/1/updates/st-marys~1.bin"
    expected = client.get_presigned_url(method, "deeprad", name, expires=timedelta(hours=2),
                                        request_date=WHEN)
    assert presign_url(method=method, endpoint_url=endpoint, path=f"deeprad/{name}",
                       access_key="AKID", secret_key="se/cr+et", region="eu-west-1",
                       expires=timedelta(hours=2), now=WHEN) == expected


def test_a_signed_header_is_named_and_changes_the_signature() -> None:
    sign = functools.partial(presign_url, method="PUT", endpoint_url="http://127.0.0.1:9000",
                             path="b/k.bin", access_key="AKID", secret_key="SECRET",
                             region="us-east-1", expires=timedelta(minutes=5), now=WHEN)
    plain, once = _query(sign()), _query(sign(headers=WRITE_ONCE))
    assert plain["X-Amz-SignedHeaders"] == "host"
    assert once["X-Amz-SignedHeaders"] == "host;if-none-match"
    assert once["X-Amz-Signature"] != plain["X-Amz-Signature"]
    # the header's value is part of what is signed, not only its name
    other = _query(sign(headers={"If-None-Match": '"etag"'}))
    assert other["X-Amz-Signature"] != once["X-Amz-Signature"]


def test_the_hubs_put_urls_are_write_once_and_its_get_urls_are_not() -> None:
    store = S3Store("deeprad", "studies", "127.0.0.1:9000", "AKID", "SECRET", secure=False)
    put = store.presign("ns/s/rounds/1/updates/a.bin", "PUT", timedelta(minutes=5))
    get = store.presign("ns/s/rounds/0/global.json", "GET", timedelta(minutes=5))
    assert _query(put)["X-Amz-SignedHeaders"] == "host;if-none-match"
    assert _query(get)["X-Amz-SignedHeaders"] == "host"
    public = store.presign("ns/s/rounds/1/updates/a.bin", "PUT", timedelta(days=30),
                           public_endpoint="minio.hub.example.org:9443")
    assert public.startswith("http://minio.hub.example.org:9443/deeprad/studies/ns/s/rounds/1/")
    assert _query(public)["X-Amz-Expires"] == "604800"  # capped at SigV4's 7 days


@pytest.mark.parametrize("endpoint", ["ftp://h:1", "http://h:1/bucket", "http://h:99999",
                                      "http://u:p@h:1", "h:9000"])
def test_a_malformed_endpoint_is_refused(endpoint: str) -> None:
    with pytest.raises(ConfigError, match="expected http\\(s\\)://HOST\\[:PORT\\]"):
        presign_url(method="GET", endpoint_url=endpoint, path="b/k", access_key="a",
                    secret_key="s", region="us-east-1", expires=timedelta(minutes=1))


@pytest.mark.parametrize("expires", [timedelta(0), timedelta(days=8)])
def test_a_lifetime_outside_sigv4s_range_is_refused(expires: timedelta) -> None:
    with pytest.raises(ConfigError, match=r"outside 1 s \.\. 7 days"):
        presign_url(method="GET", endpoint_url="http://h:1", path="b/k", access_key="a",
                    secret_key="s", region="us-east-1", expires=expires)
