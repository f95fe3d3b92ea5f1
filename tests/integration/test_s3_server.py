"""The S3 server works through the minio client, with per-account credentials."""

from __future__ import annotations

import io

import pytest
from minio.error import S3Error

from deeprad.devenv.s3_server import S3Server

pytestmark = pytest.mark.integration


def test_bucket_owned_by_a_created_account(s3_server: S3Server) -> None:
    hub = s3_server.create_user("hub-operator", role="user")
    s3_server.create_bucket("rounds", owner=hub)
    client = s3_server.client(hub)
    payload = b"\x00" * 1024 + b"weights"
    client.put_object("rounds", "study/rounds/0/global.safetensors", io.BytesIO(payload),
                      len(payload))
    got = client.get_object("rounds", "study/rounds/0/global.safetensors").read()
    assert got == payload
    names = [o.object_name for o in client.list_objects("rounds", prefix="study/",
                                                        recursive=True)]
    assert names == ["study/rounds/0/global.safetensors"]


def test_presigned_put_and_get(s3_server: S3Server) -> None:
    import datetime
    import urllib.request

    s3_server.create_bucket("presign")
    client = s3_server.client()
    url = client.presigned_put_object("presign", "site-1.bin",
                                      expires=datetime.timedelta(minutes=5))
    req = urllib.request.Request(url, data=b"update", method="PUT")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    get_url = client.presigned_get_object("presign", "site-1.bin")
    with urllib.request.urlopen(get_url, timeout=10) as resp:
        assert resp.read() == b"update"


def test_wrong_secret_is_refused(s3_server: S3Server) -> None:
    from deeprad.devenv.s3_server import S3Credentials

    s3_server.create_bucket("private")
    intruder = s3_server.client(S3Credentials(s3_server.root.access_key, "wrong"))
    with pytest.raises(S3Error):
        intruder.list_objects("private").__next__()
