"""Red team: a hostile hub hands a hospital presigned URLs that lead somewhere else.

The hub's work item carries the URLs a site's trainer follows from inside the hospital's
network. A hub that points them at another server turns the trainer into its client there
(SSRF inside the hospital: the update, or the hospital's network position, goes wherever the
hub likes). The hospital names its store endpoint (`store.endpoint` in the agent config); the
site agent refuses a task whose URLs lead anywhere else, and the trainer checks the same rule
again before its first request and never follows a redirect. Each test runs a server on
127.0.0.1 that counts requests, proves the attack was refused with a message naming the rule,
and that not one request reached that server and no Job was created.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from redteam import refused

from deeprad.core.errors import ConfigError, PolicyViolation
from deeprad.core.identity import Identity
from deeprad.core.layout import StudyLayout
from deeprad.core.protocol import DatasetSpec, TrainConfig, TrainingTask
from deeprad.core.store.endpoint import StoreEndpoint
from deeprad.core.store.presigned import ENDPOINT_ENV, URLS_ENV, PresignedStore, site_grants
from deeprad.operator.api import API_VERSION
from deeprad.operator.api.sitetask import TaskState
from deeprad.operator.site.agent import SiteAgent
from deeprad.operator.site.config import AgentConfig, AllowedStore, load_agent_config
from deeprad.operator.site.decide import CreateJob, ReportTask, TaskView, decide_task
from deeprad.operator.site.ledger import Ledger
from deeprad.operator.site.observe import task_view

T0 = datetime(2030, 7, 8, 9, 0, tzinfo=UTC)
HUB = Identity.generate("hub", "hub").public()
LAYOUT = StudyLayout("research", "study")
RULE = "this site allows (store.endpoint)"


# ---- a server on loopback that counts what reaches it -----------------------------------------


@dataclass
class CountingServer:
    """An HTTP server on 127.0.0.1: records every request; answers 200 (with `body` to a GET)
    or, with `redirect_to`, a 307 to that URL."""

    body: bytes = b"payload"
    redirect_to: str | None = None
    requests: list[str] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> CountingServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                owner.requests.append(f"{self.command} {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                if owner.redirect_to is not None:
                    self.send_response(307)
                    self.send_header("Location", owner.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = owner.body if self.command == "GET" else b""
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_HEAD = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def foreign() -> Iterator[CountingServer]:
    """The server a hostile hub wants the hospital's trainer to reach."""
    server = CountingServer().start()
    yield server
    server.stop()


@pytest.fixture
def store() -> Iterator[CountingServer]:
    """The store endpoint the hospital allows."""
    server = CountingServer().start()
    yield server
    server.stop()


# ---- what a hostile hub sends -----------------------------------------------------------------


def _grants() -> dict[str, str]:
    return dict(site_grants(LAYOUT, 2, "a", secure_aggregation=False))


def _urls(base: str, mangle: str | None = None) -> dict[str, str]:
    """key -> presigned-looking URL under `base`; `mangle` replaces the update's URL."""
    urls = {k: f"{base}/deeprad/{k}?X-Amz-Signature=ab12" for k in _grants()}
    if mangle is not None:
        urls[LAYOUT.update_payload(2, "a")] = mangle
    return urls


def _task_object(urls: dict[str, str]) -> dict[str, Any]:
    """The SiteTask a hostile hub writes into the site's hub namespace."""
    return {"metadata": {"name": "study-r2-a", "uid": "uid-2a"}, "spec": {
        "roundRef": {"namespace": "research", "name": "study-r2", "uid": "u-2"},
        "study": "study", "studyUid": "s-uid", "round": 2, "site": "a",
        "model": {"name": "tumor-cnn"},
        "parentDigest": "1" * 64,
        "hub": {"name": "hub", "signingKey": HUB.signing_key,
                "keyAgreementKey": HUB.key_agreement_key},
        "objects": [{"key": k, "method": m, "url": urls[k]} for k, m in _grants().items()],
        "deadline": "2030-07-08T10:00:00Z"}}


def _config(endpoint: str | None) -> AgentConfig:
    return AgentConfig(site="a", hub_signing_key=HUB.signing_key,
                       store=AllowedStore(endpoint=endpoint))


def _attacks(store: CountingServer, foreign: CountingServer
             ) -> list[tuple[str, str, dict[str, str], str]]:
    """(attack, allowed endpoint, the task's URLs, what the refusal says)."""
    s, f = store.port, foreign.port
    return [
        ("presigned URLs to another host:port", store.url, _urls(foreign.url),
         f"URL host 127.0.0.1:{f} is not the store endpoint {store.url} {RULE}"),
        ("one URL (the update's PUT) to another host:port", store.url,
         _urls(store.url, f"{foreign.url}/exfiltrate?X-Amz-Signature=ab12"),
         f"URL host 127.0.0.1:{f} is not the store endpoint {store.url} {RULE}"),
        ("the store's host in the user-info, another host behind '@'", store.url,
         _urls(store.url, f"http://127.0.0.1:{s}@127.0.0.1:{f}/deeprad/x"),
         "carries a user name or password"),
        ("plain http to a site whose endpoint is https", f"https://127.0.0.1:{f}",
         _urls(foreign.url),
         f"URL scheme http:// to 127.0.0.1:{f} is not that of the store endpoint "
         f"https://127.0.0.1:{f} {RULE} (plain http is allowed only when store.endpoint is "
         "http://)"),
        ("dot segments out of the endpoint's path prefix", f"{foreign.url}/deeprad",
         _urls(foreign.url, f"{foreign.url}/deeprad/../admin/reset"),
         f"is outside /deeprad/ of the store endpoint {foreign.url}/deeprad {RULE}"),
    ]


ATTACK_IDS = ["other-host", "one-url", "userinfo", "plain-http", "dot-segments"]


# ---- the site agent ---------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(5), ids=ATTACK_IDS)
def test_redteam_site_agent_refuses_a_task_whose_urls_lead_elsewhere(
        store: CountingServer, foreign: CountingServer, index: int) -> None:
    attack, endpoint, urls, message = _attacks(store, foreign)[index]
    task = task_view(_task_object(urls))
    actions = decide_task(_config(endpoint), task, None, T0, Ledger())
    assert [type(a) for a in actions] == [ReportTask], actions  # no Job: nothing runs
    report = actions[0]
    assert isinstance(report, ReportTask)
    assert report.status.state == TaskState.FAILED and report.status.completion_time
    text = report.status.message or ""
    assert text.startswith("refused by site a: object "), text
    assert message in text, text
    assert "X-Amz-Signature" not in text  # a refusal never repeats a URL's signature
    assert foreign.requests == [] and store.requests == []
    refused(attack, "site agent (SiteTask Failed)", text)


def test_redteam_a_site_without_a_store_endpoint_follows_no_url(foreign: CountingServer
                                                                 ) -> None:
    """No endpoint configured: there is nothing to check a URL against, so no task runs."""
    (report,) = decide_task(_config(None), task_view(_task_object(_urls(foreign.url))), None,
                            T0, Ledger())
    assert isinstance(report, ReportTask)  # and no CreateJob: nothing runs
    assert report.status.state == TaskState.FAILED
    text = report.status.message or ""
    assert ("this site allows no store endpoint, so no presigned URL is followed: set "
            "store.endpoint in the agent config (the site chart's value store.endpoint)") in text
    assert foreign.requests == []
    refused("presigned URLs at a site that configured no store endpoint",
            "site agent (SiteTask Failed)", text)


class _FakeKube:
    """Records what the agent does on one cluster; serves the objects it is given."""

    def __init__(self, objects: list[dict[str, Any]] | None = None) -> None:
        self.objects = objects or []
        self.created: list[dict[str, Any]] = []
        self.statuses: list[tuple[str, dict[str, Any]]] = []

    def list_objects(self, api_version: str, kind: str, namespace: str | None = None,
                     label_selector: str | None = None) -> list[dict[str, Any]]:
        return list(self.objects) if kind == "SiteTask" else []

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None
            ) -> dict[str, Any] | None:
        return None  # no privacy ledger yet

    def create(self, manifest: dict[str, Any]) -> bool:
        self.created.append(manifest)
        return True

    def patch_status(self, api_version: str, kind: str, name: str, namespace: str | None,
                     status: dict[str, Any]) -> None:
        assert (api_version, kind) == (API_VERSION, "SiteTask")
        self.statuses.append((name, status))


def _agent(config: AgentConfig, task: dict[str, Any]) -> tuple[SiteAgent, _FakeKube, _FakeKube]:
    agent = SiteAgent(config, hub=None, local=None)  # type: ignore[arg-type]
    hub, local = _FakeKube([task]), _FakeKube()
    agent.__dict__.update(hub=hub, local=local)  # the cached `Kube` clients
    return agent, hub, local


def test_redteam_the_running_agent_creates_no_job_for_a_foreign_url(
        store: CountingServer, foreign: CountingServer) -> None:
    """The whole pass (observe, decide, act): the task is reported Failed on the hub and no
    trainer Job is created on the hospital's cluster."""
    agent, hub, local = _agent(_config(store.url), _task_object(_urls(foreign.url)))
    agent.sync()
    assert local.created == []
    ((name, status),) = hub.statuses
    assert name == "study-r2-a" and status["state"] == "Failed"
    assert f"URL host 127.0.0.1:{foreign.port} is not the store endpoint {store.url}" \
        in status["message"]
    assert foreign.requests == [] and store.requests == []
    refused("presigned URLs to another host:port (agent loop)",
            "site agent: no Job created", status["message"])


def test_urls_of_the_allowed_store_start_a_job_that_carries_the_endpoint(
        store: CountingServer) -> None:
    """The rule lets the real store through: the Job gets the URLs and the endpoint, which the
    trainer checks again."""
    agent, hub, local = _agent(_config(store.url), _task_object(_urls(store.url)))
    agent.sync()
    ((job,),) = [local.created]
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]
           ["env"]}
    assert env[ENDPOINT_ENV] == store.url
    assert set(json.loads(env[URLS_ENV])) == set(_grants())
    assert hub.statuses[0][1]["state"] == "Accepted"


# ---- the trainer ------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(5), ids=ATTACK_IDS)
def test_redteam_presigned_store_refuses_before_any_request(
        store: CountingServer, foreign: CountingServer, index: int) -> None:
    """The trainer's store, built from the environment the agent set (had the agent let the
    URLs through, or had they been altered on the way), refuses them before any request."""
    attack, endpoint, urls, message = _attacks(store, foreign)[index]
    env = {URLS_ENV: json.dumps(urls), ENDPOINT_ENV: endpoint}
    with pytest.raises(PolicyViolation) as exc:
        PresignedStore.from_env(env)
    text = str(exc.value)
    assert text.startswith("presigned store: refusing the URL of ") and message in text, text
    assert text.endswith("no request was sent")
    assert foreign.requests == [] and store.requests == []
    refused(attack, "trainer's presigned store", text)


def test_redteam_presigned_store_refuses_file_urls(tmp_path: Any, store: CountingServer) -> None:
    """urllib would read a file:// URL from the trainer's own disk (its mounted keys, say)."""
    secret = tmp_path / "signing.key"
    secret.write_text("not for the hub")
    urls = {LAYOUT.global_manifest(1): f"file://{secret}"}
    with pytest.raises(PolicyViolation) as exc:
        PresignedStore(urls, store.url)
    assert f"is not a URL of the store endpoint {store.url} {RULE}" in str(exc.value)
    refused("file:// URL to the trainer's own disk", "trainer's presigned store", str(exc.value))


def test_redteam_presigned_store_follows_no_redirect(store: CountingServer,
                                                      foreign: CountingServer) -> None:
    """The allowed store answers with a redirect to another host: the trainer does not go."""
    key = LAYOUT.global_manifest(1)
    site = PresignedStore({key: f"{store.url}/deeprad/{key}?X-Amz-Signature=ab12"}, store.url)
    store.redirect_to = f"{foreign.url}/collect"
    with pytest.raises(PolicyViolation) as exc:
        site.get_bytes(key)
    assert (f"the store answered GET with a 307 redirect to {foreign.url}; redirects are never "
            "followed") in str(exc.value)
    assert len(store.requests) == 1 and foreign.requests == []
    with pytest.raises(PolicyViolation, match="redirects are never followed"):
        site.put_bytes(key, b"the hospital's update")
    assert foreign.requests == []
    refused("the store redirects to another host", "trainer's presigned store", str(exc.value))


def test_the_allowed_store_is_reached(store: CountingServer) -> None:
    """The counting server counts: the same store reads and writes through allowed URLs."""
    key, update = LAYOUT.global_manifest(1), LAYOUT.update_payload(2, "a")
    site = PresignedStore.from_env({URLS_ENV: json.dumps({
        key: f"{store.url}/deeprad/{key}?sig=1", update: f"{store.url}/deeprad/{update}?sig=2"}),
        ENDPOINT_ENV: store.url})
    assert site.get_bytes(key) == b"payload"
    site.put_bytes(update, b"update")
    assert store.requests == [f"GET /deeprad/{key}?sig=1", f"PUT /deeprad/{update}?sig=2"]


def test_redteam_trainer_job_refuses_foreign_urls_and_sends_nothing(
        study: Any, store: CountingServer, foreign: CountingServer) -> None:
    """`python -m deeprad.trainer --store presigned:` as the agent's Job runs it: exit 2 with
    the rule named, no request to any server, nothing written."""
    task = TrainingTask(namespace="research", study="study", round=2, site="st-marys",
                        dataset=DatasetSpec(options={"samples": 12}),
                        train=TrainConfig(local_epochs=1),
                        registry_json=study.keys.registry.to_json(),
                        identity_dir=str(study.keys.site_dirs["st-marys"]))
    env = {**os.environ, URLS_ENV: json.dumps(_urls(foreign.url)), ENDPOINT_ENV: store.url}
    before = sorted(study.store.root.rglob("*"))
    proc = subprocess.run([sys.executable, "-m", "deeprad.trainer", "--store", "presigned:",
                           "--task", task.model_dump_json()], capture_output=True, text=True,
                          check=False, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert (f"URL host 127.0.0.1:{foreign.port} is not the store endpoint {store.url} {RULE}"
            in proc.stderr), proc.stderr
    assert foreign.requests == [] and store.requests == []
    assert sorted(study.store.root.rglob("*")) == before
    refused("presigned URLs to another host:port", "hospital trainer Job (exit 2)", proc.stderr)

    # Without the endpoint (an agent that did not set it) the trainer follows no URL either.
    del env[ENDPOINT_ENV]
    proc = subprocess.run([sys.executable, "-m", "deeprad.trainer", "--store", "presigned:",
                           "--task", task.model_dump_json()], capture_output=True, text=True,
                          check=False, timeout=300, env=env)
    assert proc.returncode == 2 and f"needs {ENDPOINT_ENV}" in proc.stderr, proc.stderr
    assert foreign.requests == []
    refused("presigned URLs without the site's endpoint", "hospital trainer Job (exit 2)",
            proc.stderr)


# ---- the rule itself --------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "https://minio.hub.example.org/deeprad/ns/s/rounds/1/global.json?X-Amz-Signature=1",
    "https://MINIO.hub.example.org:443/deeprad/x",
])
def test_the_endpoint_allows_its_own_urls(url: str) -> None:
    StoreEndpoint.parse("https://minio.hub.example.org").check(url)


@pytest.mark.parametrize(("url", "says"), [
    ("https://minio.hub.example.org.evil.example/x", "URL host minio.hub.example.org.evil"),
    ("https://minio.hub.example.org:9443/x", "URL host minio.hub.example.org:9443"),
    ("https://evil.example#@minio.hub.example.org/x", "URL host evil.example:443"),
    ("https://minio.hub.example.org\\@evil.example/x", "is not a URL of"),
    ("https://minio.hub.example.org/x%2F..%2Fadmin", "is outside /"),
    ("https://minio.hub.example.org/x /y", "is not a URL of"),
    ("gopher://minio.hub.example.org/x", "is not a URL of"),
    ("http://minio.hub.example.org:443/x", "URL scheme http://"),
])
def test_the_endpoint_refuses_lookalikes(url: str, says: str) -> None:
    with pytest.raises(PolicyViolation) as exc:
        StoreEndpoint.parse("https://minio.hub.example.org").check(url)
    assert says in str(exc.value)
    assert "the store endpoint https://minio.hub.example.org this site allows" in str(exc.value)


@pytest.mark.parametrize("endpoint", ["minio:9000", "ftp://minio", "https://u:p@minio",
                                      "https://minio/?a=1", "https://minio:99999",
                                      "https://minio/../x"])
def test_a_malformed_store_endpoint_is_refused_when_the_config_is_read(tmp_path: Any,
                                                                        endpoint: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(json.dumps({"site": "a", "store": {"endpoint": endpoint}}))
    with pytest.raises(ConfigError, match=r"agent\.yaml: store\.endpoint: .*expected "
                                          r"http\(s\)://HOST\[:PORT\]\[/PATH\]"):
        load_agent_config(path)


def test_a_task_view_with_allowed_urls_is_accepted(store: CountingServer) -> None:
    task: TaskView = task_view(_task_object(_urls(store.url)))
    actions = decide_task(_config(store.url), task, None, T0, Ledger())
    assert CreateJob in [type(a) for a in actions]
