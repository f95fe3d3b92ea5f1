"""Objects a site writes are write-once, against the real S3 server: the hub's presigned PUT
URLs carry a signed `If-None-Match: *`, so a site's URL (valid until the round's deadline plus
five minutes) can create its update but never replace it — not even after the round
aggregated it — while an upload retried after a lost answer still completes."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from redteam import refused

from deeprad.aggregator.job import run_aggregation_task
from deeprad.core.checkpoint import write_checkpoint
from deeprad.core.errors import StoreError
from deeprad.core.identity import Identity
from deeprad.core.layout import StudyLayout
from deeprad.core.models import build_model, model_weights
from deeprad.core.protocol import (
    AggregateReport,
    AggregationTask,
    DatasetSpec,
    ModelSpec,
    StrategySpec,
    TrainConfig,
    TrainingTask,
)
from deeprad.core.store.presigned import PresignedStore, site_grants
from deeprad.core.store.s3 import S3Store
from deeprad.devenv.s3_server import S3Server
from deeprad.simulate.keys import make_study_keys
from deeprad.trainer.job import run_training_task

LAYOUT = StudyLayout("hub", "write-once")
SITES = ("st-marys", "charite")
WHERE = "object store (signed If-None-Match: *)"


def _hub_store(s3_server: S3Server) -> S3Store:
    bucket = f"deeprad-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(bucket)
    return S3Store(bucket, "studies", s3_server.endpoint, s3_server.root.access_key,
                   s3_server.root.secret_key, secure=False)


def _site_store(hub: S3Store, site: str, secure_aggregation: bool = False,
                public_endpoint: str | None = None) -> PresignedStore:
    """What the operator grants a site for round 1 and the trainer builds from it."""
    grants = site_grants(LAYOUT, 1, site, secure_aggregation)
    urls = {key: hub.presign(key, method, timedelta(minutes=10), public_endpoint)
            for key, method in grants.items()}
    return PresignedStore(urls, hub.presigned_endpoint(public_endpoint))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def hub(s3_server: S3Server) -> S3Store:
    return _hub_store(s3_server)


def test_each_granted_write_happens_once(hub: S3Store) -> None:
    site = _site_store(hub, "st-marys", secure_aggregation=True)
    writes = [k for k, m in site_grants(LAYOUT, 1, "st-marys", True).items() if m == "PUT"]
    assert any("/secagg/" in k for k in writes)  # relayed messages are write-once too
    for key in writes:
        site.put_bytes(key, b"first")
        with pytest.raises(StoreError, match=r"refused \(412 Precondition Failed\): the object "
                                             r"exists and objects a site writes are write-once"):
            site.put_bytes(key, b"second")
        assert hub.get_bytes(key) == b"first"
    # a new upload of the very same bytes is a second write as well, and changes nothing
    with pytest.raises(StoreError, match="412"):
        site.put_bytes(writes[0], b"first")


def test_a_streamed_upload_is_write_once(hub: S3Store, tmp_path: Path) -> None:
    key = LAYOUT.update_payload(1, "charite")
    site = _site_store(hub, "charite")
    first, second = tmp_path / "first.bin", tmp_path / "second.bin"
    first.write_bytes(b"a" * (3 * 2**20 + 7))
    second.write_bytes(b"b" * 10)
    site.put_file(key, first)
    with pytest.raises(StoreError, match="412"):
        site.put_file(key, second)
    assert hub.size(key) == 3 * 2**20 + 7


class LoseFirstAnswers:
    """A TCP relay to the S3 server that forwards every request but, for the first `lose`
    connections, drops the server's answer: the write lands, the client hears nothing."""

    def __init__(self, upstream: tuple[str, int], lose: int) -> None:
        self.upstream, self.lose, self.requests = upstream, lose, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with client:
                request = _read_request(client)
                self.requests += 1
                with socket.create_connection(self.upstream, timeout=10) as server:
                    server.sendall(request)
                    answer = b"".join(iter(lambda s=server: s.recv(65536), b""))
                if self.lose > 0:
                    self.lose -= 1
                    continue  # closed without an answer
                client.sendall(answer)

    def close(self) -> None:
        self.sock.close()


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    length = int(match.group(1)) if match else 0
    while len(body) < length:
        body += conn.recv(65536)
    # urllib asks for Connection: close, so the server ends its answer by closing
    return head + b"\r\n\r\n" + body


@pytest.fixture
def lossy(s3_server: S3Server) -> Iterator[LoseFirstAnswers]:
    relay = LoseFirstAnswers(("127.0.0.1", s3_server.port), lose=1)
    yield relay
    relay.close()


def test_an_upload_whose_answer_was_lost_is_retried_and_counts_as_done(
        hub: S3Store, lossy: LoseFirstAnswers) -> None:
    """The trainer's first PUT lands but its answer is lost; the retry hears 412 (the object
    exists because of that first attempt) and the upload counts as done."""
    site = _site_store(hub, "st-marys", public_endpoint=f"127.0.0.1:{lossy.port}")
    key = LAYOUT.update_payload(1, "st-marys")
    site.put_bytes(key, b"the update")
    assert lossy.requests == 2 and lossy.lose == 0  # the answer was lost once, then retried
    assert hub.get_bytes(key) == b"the update"
    # after that, the object is as write-once as any other
    with pytest.raises(StoreError, match="412"):
        site.put_bytes(key, b"another update")
    assert hub.get_bytes(key) == b"the update"


# ---- red team: a site replaces its update after the round aggregated it -------------------


@dataclass
class AggregatedRound:
    hub: S3Store
    urls: dict[str, str]  # st-marys's granted key -> URL, as its SiteTask carries them
    report: AggregateReport
    stored: dict[str, bytes]  # every object of round 1 after aggregation


@pytest.fixture(scope="module")
def aggregated(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
               ) -> AggregatedRound:
    """A real round 1: the hub signs round 0, grants each site as the operator does, the real
    trainer trains and uploads through its presigned store, the real aggregator verifies."""
    hub = _hub_store(s3_server)
    keys = make_study_keys(tmp_path_factory.mktemp("keys"), list(SITES))
    write_checkpoint(hub, LAYOUT, {"study": LAYOUT.study, "round": 0, "producer": "test",
                                   "model": ModelSpec(), "parent_sha256": None},
                     model_weights(build_model(ModelSpec())), hub=Identity.load(keys.hub_dir))
    urls: dict[str, str] = {}
    for site in SITES:
        store = _site_store(hub, site)
        if site == "st-marys":
            urls = dict(store.urls)
        run_training_task(TrainingTask(
            namespace=LAYOUT.namespace, study=LAYOUT.study, round=1, site=site,
            dataset=DatasetSpec(options={"samples": 24}), train=TrainConfig(local_epochs=1),
            registry_json=keys.registry.to_json(), identity_dir=str(keys.site_dirs[site])),
            store)
    report = run_aggregation_task(AggregationTask(
        namespace=LAYOUT.namespace, study=LAYOUT.study, round=1,
        strategy=StrategySpec(name="fedavg"), registry_json=keys.registry.to_json(),
        identity_dir=str(keys.hub_dir)), hub)
    assert sorted(c.site for c in report.contributors) == sorted(SITES)
    stored = {k: hub.get_bytes(k) for k in hub.list(LAYOUT.round_prefix(1) + "/")}
    return AggregatedRound(hub, urls, report, stored)


def _raw(url: str, method: str, headers: dict[str, str], data: bytes | None) -> str:
    """Send a request as an attacker would (any client, any headers); the store's answer."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        body = exc.read().decode("utf-8", "replace")
        code = re.search(r"<Code>(.*?)</Code>", body)
        message = re.search(r"<Message>(.*?)</Message>", body)
        return (f"HTTP {exc.code} {code.group(1) if code else ''}: "
                f"{message.group(1) if message else body[:200]}")


PAYLOAD = LAYOUT.update_payload(1, "st-marys")
MANIFEST = LAYOUT.update_manifest(1, "st-marys")
FORGED = b"DRENV another update, chosen after seeing the round"


def _via_trainer_client(r: AggregatedRound) -> str:
    site = PresignedStore(r.urls, r.hub.endpoint_url)
    with pytest.raises(StoreError) as err:
        site.put_bytes(PAYLOAD, FORGED)
    return str(err.value)


def _manifest_via_trainer_client(r: AggregatedRound) -> str:
    site = PresignedStore(r.urls, r.hub.endpoint_url)
    with pytest.raises(StoreError) as err:
        site.put_text(MANIFEST, r.stored[MANIFEST].decode().replace('"num_samples"', '"n"'))
    return str(err.value)


def _without_the_header(r: AggregatedRound) -> str:
    return _raw(r.urls[PAYLOAD], "PUT", {}, FORGED)


def _another_condition(r: AggregatedRound) -> str:
    etag = '"' + hashlib.md5(r.stored[PAYLOAD]).hexdigest() + '"'
    return _raw(r.urls[PAYLOAD], "PUT", {"If-Match": etag, "If-None-Match": etag}, FORGED)


def _header_dropped_from_the_url(r: AggregatedRound) -> str:
    url = r.urls[PAYLOAD].replace("X-Amz-SignedHeaders=host%3Bif-none-match",
                                  "X-Amz-SignedHeaders=host")
    assert url != r.urls[PAYLOAD]
    return _raw(url, "PUT", {}, FORGED)


def _server_side_copy(r: AggregatedRound) -> str:
    source = f"{r.hub.bucket}/{r.hub.prefix}/{LAYOUT.update_payload(1, 'charite')}"
    return _raw(r.urls[PAYLOAD], "PUT", {"If-None-Match": "*", "x-amz-copy-source": source},
                b"")


def _delete_then_write(r: AggregatedRound) -> str:
    answer = _raw(r.urls[PAYLOAD], "DELETE", {"If-None-Match": "*"}, None)
    assert answer.startswith("HTTP 403"), answer
    return f"DELETE: {answer}; PUT: {_raw(r.urls[PAYLOAD], 'PUT', {'If-None-Match': '*'}, FORGED)}"


ATTACKS = {  # short names: they head the red-team table's rows
    "re-PUT, same URL": (_via_trainer_client, "412"),
    "manifest re-PUT": (_manifest_via_trainer_client, "412"),
    "no If-None-Match": (_without_the_header, "403"),
    "If-Match own ETag": (_another_condition, "403"),
    "header struck": (_header_dropped_from_the_url, "403"),
    "server-side copy": (_server_side_copy, "403"),
    "DELETE then PUT": (_delete_then_write, "412"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_redteam_site_replaces_its_update_after_aggregation(aggregated: AggregatedRound,
                                                            attack: str) -> None:
    run, status = ATTACKS[attack]
    message = run(aggregated)
    assert re.search(rf"\b{status}\b", message), message
    refused(f"aggregated update replaced: {attack}", WHERE, message)
    # nothing was written: every object of the round is byte for byte what was aggregated
    hub = aggregated.hub
    now = {k: hub.get_bytes(k) for k in hub.list(LAYOUT.round_prefix(1) + "/")}
    assert now == aggregated.stored
    contribution = next(c for c in aggregated.report.contributors if c.site == "st-marys")
    assert _sha256(now[PAYLOAD]) == contribution.update_sha256
    assert AggregateReport.model_validate_json(now[LAYOUT.aggregate(1)]) == aggregated.report
