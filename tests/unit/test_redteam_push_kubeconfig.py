"""Red team: a push-mode kubeconfig that makes the hub read its own files.

In push mode the hub builds a client from a kubeconfig in a Secret. A kubeconfig may name files
instead of carrying its credentials: `tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/
token` would make the hub read its own ServiceAccount token and send it, as a bearer token, to
the server the Secret's author chose; `client-certificate`, `client-key` and
`certificate-authority` would have it present or trust files of its own. The hub refuses every
file reference while parsing the Secret. Each test proves the message (the field and the fix),
that the file was never opened, that no client was built and that the server it names was
never contacted. A control test shows the attack is real without the check.
"""

from __future__ import annotations

import base64
import builtins
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kubernetes
import pytest
import yaml
from redteam import refused

from deeprad.core.errors import ConfigError
from deeprad.operator.api.hospitalsite import HospitalSiteSpec
from deeprad.operator.hub import push, sites

ROOT = Path(__file__).resolve().parents[2]
SITE = "evil-lab"
SECRET_TEXT = "hub-serviceaccount-token-do-not-leak"
FAKE_PEM = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
                            ).decode()
# (where in the kubeconfig, the key, the inline key the message must name as the fix)
FILE_FIELDS = [("user", "tokenFile", "token"),
               ("user", "client-certificate", "client-certificate-data"),
               ("user", "client-key", "client-key-data"),
               ("cluster", "certificate-authority", "certificate-authority-data")]
FIELD_IDS = [key for _, key, _ in FILE_FIELDS]


class Listener:
    """A loopback server that records every connection and request made to it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data)
                conn.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")

    @property
    def server(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def hub_file(tmp_path: Path) -> Path:
    """A file of the hub's that a kubeconfig could name (its ServiceAccount token, say)."""
    path = tmp_path / "serviceaccount" / "token"
    path.parent.mkdir()
    path.write_text(SECRET_TEXT)
    return path


def kubeconfig(server: str, user: dict[str, Any] | None = None,
               cluster: dict[str, Any] | None = None) -> dict[str, Any]:
    """A kubeconfig for `server` with inline credentials, `user`/`cluster` merged in."""
    return {"apiVersion": "v1", "kind": "Config", "current-context": "lab",
            "clusters": [{"name": "lab", "cluster": {"server": server, **(cluster or {})}}],
            "users": [{"name": "lab", "user": {"token": "inline-token", **(user or {})}}],
            "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "lab"}}]}


def evil(server: str, where: str, key: str, path: Path) -> dict[str, Any]:
    """The kubeconfig with `key` naming `path` in its user (instead of the inline token) or
    its cluster."""
    config = kubeconfig(server, **{where: {key: str(path)}})
    if where == "user":
        config["users"][0]["user"] = {key: str(path)}
    return config


def site_spec() -> HospitalSiteSpec:
    example = yaml.safe_load((ROOT / "examples" / "hospitalsite-charite.yaml").read_text())
    spec = example["spec"]
    spec["connection"]["kubeconfigSecretRef"] = {"name": "evil-kubeconfig",
                                                 "namespace": "deeprad-system",
                                                 "key": "kubeconfig"}
    return HospitalSiteSpec.model_validate(spec)


class Watch:
    """What the hub did while handling a push Secret: files opened, clients built."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, secret: dict[str, str]) -> None:
        self.opened: list[str] = []
        self.clients: list[Any] = []
        real_open, real_client = builtins.open, kubernetes.config.new_client_from_config_dict

        def recording_open(file: Any, *args: Any, **kwargs: Any) -> Any:
            self.opened.append(os.fspath(file) if isinstance(file, str | os.PathLike) else "")
            return real_open(file, *args, **kwargs)

        def recording_client(*args: Any, **kwargs: Any) -> Any:
            self.clients.append(args)
            return real_client(*args, **kwargs)

        data: dict[str, bytes | str] = {k: base64.b64encode(v.encode()).decode()
                                        for k, v in secret.items()}

        class Core:  # the hub's API, as far as push_agent reads it: the Secret
            def __init__(self, _: Any) -> None:
                pass

            def read_namespaced_secret(self, name: str, namespace: str) -> Any:
                return kubernetes.client.V1Secret(data=data)

        monkeypatch.setattr(builtins, "open", recording_open)
        monkeypatch.setattr(kubernetes.config, "new_client_from_config_dict", recording_client)
        monkeypatch.setattr(kubernetes.client, "CoreV1Api", Core)


def assert_untouched(watch: Watch, path: Path, listener: Listener) -> None:
    assert str(path) not in watch.opened, f"the hub opened {path}"
    assert not watch.clients, "a client was built from the refused kubeconfig"
    assert listener.connections == 0 and not listener.requests, "the server was contacted"


# ---- the parser -------------------------------------------------------------------------------


@pytest.mark.parametrize(("where", "key", "inline"), FILE_FIELDS, ids=FIELD_IDS)
def test_redteam_push_kubeconfig_file_reference_is_refused_while_parsing(
        monkeypatch: pytest.MonkeyPatch, listener: Listener, hub_file: Path, where: str,
        key: str, inline: str) -> None:
    watch = Watch(monkeypatch, {})
    text = yaml.safe_dump(evil(listener.server, where, key, hub_file))
    with pytest.raises(ConfigError) as exc:
        push.check_kubeconfig(SITE, text)
    message = str(exc.value)
    assert message == (
        f"HospitalSite {SITE}: the push kubeconfig's {where} 'lab' names a file in `{key}` "
        f"('{hub_file}'), which the hub would read from its own disk and present to the server; "
        f"put the content inline in `{inline}` instead")
    assert "\n" not in message
    assert_untouched(watch, hub_file, listener)
    refused(f"push kubeconfig {where}.{key} naming a hub file", "hub: push kubeconfig check",
            message)


@pytest.mark.parametrize(("where", "key", "inline"), FILE_FIELDS, ids=FIELD_IDS)
def test_redteam_push_agent_refuses_file_references_before_reading_or_connecting(
        monkeypatch: pytest.MonkeyPatch, listener: Listener, hub_file: Path, where: str,
        key: str, inline: str) -> None:
    """The whole push path (Secret -> kubeconfig -> agent) stops before the client exists."""
    watch = Watch(monkeypatch, {"kubeconfig": yaml.safe_dump(
        evil(listener.server, where, key, hub_file))})
    with pytest.raises(ConfigError, match=f"names a file in `{key}`.*inline in `{inline}`"):
        push.push_agent(SITE, site_spec(), kubernetes.client.ApiClient())
    assert_untouched(watch, hub_file, listener)


def test_redteam_yaml_merge_key_cannot_hide_a_token_file(
        monkeypatch: pytest.MonkeyPatch, listener: Listener, hub_file: Path) -> None:
    """The file reference smuggled in through an anchor and a `<<` merge key is seen too:
    the check runs on the parsed document the client would use."""
    watch = Watch(monkeypatch, {})
    text = (f"creds: &creds {{tokenFile: '{hub_file}'}}\n"
            f"clusters: [{{name: lab, cluster: {{server: '{listener.server}'}}}}]\n"
            "users: [{name: lab, user: {<<: *creds}}]\n"
            "contexts: [{name: lab, context: {cluster: lab, user: lab}}]\n"
            "current-context: lab\n")
    with pytest.raises(ConfigError, match="names a file in `tokenFile`") as exc:
        push.check_kubeconfig(SITE, text)
    assert_untouched(watch, hub_file, listener)
    refused("push kubeconfig tokenFile behind a YAML merge key", "hub: push kubeconfig check",
            str(exc.value))


@pytest.mark.parametrize(("where", "entry", "key"), [
    ("user", {"tokenfile": "/var/run/secrets/kubernetes.io/serviceaccount/token"}, "tokenfile"),
    ("user", {"client-certificate-file": "/etc/hub/tls.crt"}, "client-certificate-file"),
    ("cluster", {"certificate-authority-file": "/etc/hub/ca.crt"},
     "certificate-authority-file"),
], ids=["tokenfile", "client-certificate-file", "certificate-authority-file"])
def test_redteam_push_kubeconfig_unknown_keys_are_refused(where: str, entry: dict[str, Any],
                                                          key: str) -> None:
    """Fail closed: a key the hub does not know (a misspelling, or one a later client reads as
    a path) is refused, naming the keys it may use."""
    with pytest.raises(ConfigError) as exc:
        push.check_kubeconfig(SITE, yaml.safe_dump(kubeconfig("https://lab:6443",
                                                              **{where: entry})))
    message = str(exc.value)
    assert f"the push kubeconfig's {where} 'lab' has `{key}`, which push mode does not " \
           f"accept; a {where} may hold only " in message
    assert ("token," if where == "user" else "certificate-authority-data,") in message
    refused(f"push kubeconfig {where}.{key} (unknown key)", "hub: push kubeconfig check",
            message)


@pytest.mark.parametrize("key", ["exec", "auth-provider"])
def test_redteam_push_kubeconfig_programs_are_still_refused(key: str) -> None:
    config = kubeconfig("https://lab:6443", user={key: {"command": "/bin/sh"}})
    with pytest.raises(ConfigError, match=f"uses `{key}`, which would run a program inside "
                                          "the hub; use a token or a client certificate"):
        push.check_kubeconfig(SITE, yaml.safe_dump(config))


@pytest.mark.parametrize(("text", "message"), [
    ("clusters: {lab: {server: x}}", "the push kubeconfig's clusters must be a list"),
    ("clusters: [{name: lab, cluster: {server: x}}]\nusers: lab",
     "the push kubeconfig's users must be a list"),
    ("clusters: [lab]", "the push kubeconfig's clusters[0] needs a `cluster` mapping"),
    ("clusters: [{name: lab, cluster: {server: x}}]\nusers: [{name: u, user: tokenFile}]",
     "the push kubeconfig's users[0] needs a `user` mapping"),
    ("users: []", "the push kubeconfig has no clusters"),
])
def test_malformed_push_kubeconfigs_are_config_errors(text: str, message: str) -> None:
    """A malformed Secret becomes the same Event as any other refusal, never a crash."""
    with pytest.raises(ConfigError, match=re.escape(f"HospitalSite {SITE}: {message}")):
        push.check_kubeconfig(SITE, text)


def test_inline_credentials_are_accepted_and_nothing_is_contacted(
        monkeypatch: pytest.MonkeyPatch, listener: Listener) -> None:
    """Tokens, inline certificates, keys and CA, and basic auth: the agent is built, offline."""
    config = kubeconfig(listener.server.replace("http:", "https:"),
                        user={"client-certificate-data": FAKE_PEM, "client-key-data": FAKE_PEM,
                              "username": "u", "password": "p", "as": "someone"},
                        cluster={"certificate-authority-data": FAKE_PEM,
                                 "tls-server-name": "lab", "extensions": []})
    assert push.check_kubeconfig(SITE, yaml.safe_dump(config)) == config
    watch = Watch(monkeypatch, {"kubeconfig": yaml.safe_dump(kubeconfig(listener.server))})
    agent = push.push_agent(SITE, site_spec(), kubernetes.client.ApiClient())
    assert agent.config.site == SITE
    assert agent._local_api.configuration.host == listener.server
    assert agent._local_api.configuration.api_key["BearerToken"] == "Bearer inline-token"
    assert len(watch.clients) == 1 and listener.connections == 0


def test_the_token_file_attack_is_real_without_the_check(listener: Listener,
                                                         hub_file: Path) -> None:
    """Control: the Kubernetes client itself, given the refused kubeconfig, reads the hub's
    file and sends its content to the server the Secret names."""
    client = kubernetes.config.new_client_from_config_dict(
        evil(listener.server, "user", "tokenFile", hub_file))
    with pytest.raises(kubernetes.client.ApiException):
        kubernetes.client.CoreV1Api(client).list_namespace(_request_timeout=5)
    assert any(f"Bearer {SECRET_TEXT}".encode() in r for r in listener.requests)


def test_the_push_daemon_reports_the_refusal_as_an_event_and_never_runs_an_agent(
        monkeypatch: pytest.MonkeyPatch, listener: Listener, hub_file: Path) -> None:
    """The kopf daemon turns the refusal into one PushConfigInvalid Event and keeps waiting."""
    watch = Watch(monkeypatch, {"kubeconfig": yaml.safe_dump(
        evil(listener.server, "user", "tokenFile", hub_file))})
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(sites.kopf, "event", lambda body, **kw: events.append(kw))
    started: list[Any] = []
    monkeypatch.setattr(push, "SiteAgent", lambda *a: started.append(a))

    class Stopped:  # three passes of the daemon's loop, then stop
        waits = 0

        def __bool__(self) -> bool:
            return self.waits >= 3

        def wait(self, _: float) -> None:
            self.waits += 1

    memo = SimpleNamespace(configuration=kubernetes.client.Configuration(), rounds=None)
    spec = site_spec().model_dump(mode="json", by_alias=True, exclude_none=True)
    sites.push_daemon(SITE, spec, {"metadata": {"name": SITE}}, memo, Stopped())  # type: ignore[arg-type]
    (event,) = events  # one Event per distinct problem
    assert event["type"] == "Warning" and event["reason"] == "PushConfigInvalid"
    assert "names a file in `tokenFile`" in event["message"]
    assert not started
    assert_untouched(watch, hub_file, listener)
