"""Push mode: for a lab cluster that cannot run an agent, the hub runs the site agent itself.

The HospitalSite names a hub Secret (`spec.connection.kubeconfigSecretRef`) holding the lab
cluster's kubeconfig and, optionally under `agent.yaml`, the same agent configuration the site
chart renders (training namespace, image, identity Secret, data, GPUs). A kopf daemon per push
site runs `SiteAgent` with the hub's own client on the hub side and that kubeconfig on the other,
so work items, heartbeats and readiness are exactly those of a pull site.

The kubeconfig may hold the server's address and inline credentials only. Kubeconfigs that run
programs (`exec` credential plugins, `auth-provider`) are refused: the hub would execute whatever
the Secret's author chose. So are file references (`tokenFile`, `client-certificate`,
`client-key`, `certificate-authority`): the hub would read files of its own, its ServiceAccount
token say, and present them to the server the Secret names. Both are refused while parsing,
before any file is opened or any connection made.
"""

from __future__ import annotations

import base64
from typing import Any

import kubernetes
import yaml
from kubernetes.client.exceptions import ApiException

from deeprad.core.errors import ConfigError
from deeprad.operator.api.hospitalsite import HospitalSiteSpec
from deeprad.operator.site.agent import SiteAgent
from deeprad.operator.site.config import (
    AgentConfig,
    AllowedStore,
    TrainingResources,
    parse_agent_config,
)

AGENT_CONFIG_KEY = "agent.yaml"


# The keys a push kubeconfig's users and clusters may hold (client-go's clientcmd v1 less those
# that run programs or name files). An allow-list: a key some client learns to read later is
# refused until someone decides it is safe.
USER_KEYS = frozenset({"token", "client-certificate-data", "client-key-data", "username",
                       "password", "as", "as-uid", "as-groups", "as-user-extra", "extensions"})
CLUSTER_KEYS = frozenset({"server", "certificate-authority-data", "tls-server-name",
                          "insecure-skip-tls-verify", "proxy-url", "disable-compression",
                          "extensions"})
PROGRAM_KEYS = ("exec", "auth-provider")
FILE_KEYS = {"tokenFile": "token", "client-certificate": "client-certificate-data",
             "client-key": "client-key-data", "certificate-authority": "certificate-authority-data"}


def check_kubeconfig(site: str, text: str) -> dict[str, Any]:
    """The parsed kubeconfig, or ConfigError when it is malformed, runs code or names a file.
    Pure: nothing is opened or contacted."""
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"HospitalSite {site}: the push kubeconfig is not YAML: {exc}") from None
    if not isinstance(config, dict) or not config.get("clusters"):
        raise ConfigError(f"HospitalSite {site}: the push kubeconfig has no clusters")
    for kind, allowed in (("user", USER_KEYS), ("cluster", CLUSTER_KEYS)):
        for name, entry in _entries(site, config, kind):
            _check_entry(site, kind, name, entry, allowed)
    return dict(config)


def _entries(site: str, config: dict[str, Any], kind: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, settings) of each `users[].user` or `clusters[].cluster`."""
    items = config.get(f"{kind}s") or []
    if not isinstance(items, list):
        raise ConfigError(f"HospitalSite {site}: the push kubeconfig's {kind}s must be a list")
    out = []
    for index, item in enumerate(items):
        entry = item.get(kind) if isinstance(item, dict) else None
        if entry is None and isinstance(item, dict) and kind == "user":
            entry = {}  # a user without credentials
        if not isinstance(entry, dict):
            raise ConfigError(f"HospitalSite {site}: the push kubeconfig's {kind}s[{index}] "
                              f"needs a `{kind}` mapping")
        out.append((str(item.get("name", f"#{index}")), entry))
    return out


def _check_entry(site: str, kind: str, name: str, entry: dict[str, Any],
                 allowed: frozenset[str]) -> None:
    where = f"HospitalSite {site}: the push kubeconfig's {kind} {name!r}"
    for key, value in entry.items():
        if key in PROGRAM_KEYS:
            raise ConfigError(f"{where} uses `{key}`, which would run a program inside the hub; "
                              "use a token or a client certificate instead")
        if key in FILE_KEYS:
            shown = repr(str(value)[:100])
            raise ConfigError(f"{where} names a file in `{key}` ({shown}), which the hub would "
                              "read from its own disk and present to the server; put the "
                              f"content inline in `{FILE_KEYS[key]}` instead")
        if key not in allowed:
            raise ConfigError(f"{where} has `{key}`, which push mode does not accept; a "
                              f"{kind} may hold only {', '.join(sorted(allowed))}")


def agent_config(site: str, spec: HospitalSiteSpec, text: str | None,
                 store_endpoint: str | None = None) -> AgentConfig:
    """The Secret's agent.yaml, or defaults: the HospitalSite's GPU settings and limits. A
    push lab's agent runs in the hub, so the store it may reach defaults to the hub's own
    (`store_endpoint`, where the hub's presigned URLs lead) unless agent.yaml names one."""
    if text:
        where = f"HospitalSite {site}: {AGENT_CONFIG_KEY} in the push Secret"
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where} is not YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be a mapping")
        data.setdefault("site", site)
        if store_endpoint and not (data.get("store") or {}).get("endpoint"):
            data["store"] = {**(data.get("store") or {}), "endpoint": store_endpoint}
        config = parse_agent_config(data, where)
        if config.site != site:
            raise ConfigError(f"HospitalSite {site}: {AGENT_CONFIG_KEY} is for site "
                              f"{config.site}")
        return config
    base = AgentConfig(site=site, store=AllowedStore(endpoint=store_endpoint))
    training = base.training.model_copy(update={
        "gpu": spec.gpu, "max_task_duration": spec.limits.max_task_duration,
        "resources": TrainingResources(cpu=spec.limits.cpu or "1",
                                       memory=spec.limits.memory or "4Gi")})
    return base.model_copy(update={"training": training})


def _secret_value(secret: Any, key: str) -> str | None:
    raw = (secret.data or {}).get(key)
    return base64.b64decode(raw).decode("utf-8") if raw else None


def push_agent(site: str, spec: HospitalSiteSpec, hub: kubernetes.client.ApiClient,
               store_endpoint: str | None = None) -> SiteAgent:
    """A SiteAgent for a push site, from its Secret; ConfigError says what is wrong."""
    ref = spec.connection.kubeconfig_secret_ref
    if ref is None:
        raise ConfigError(f"HospitalSite {site}: push mode needs "
                          "spec.connection.kubeconfigSecretRef")
    try:
        secret = kubernetes.client.CoreV1Api(hub).read_namespaced_secret(ref.name, ref.namespace)
    except ApiException as exc:
        where = f"{ref.namespace}/{ref.name}"
        raise ConfigError(f"HospitalSite {site}: cannot read Secret {where} ({exc.status} "
                          f"{exc.reason}); create it, and let the hub read it (hub chart: in "
                          "the release namespace, named in rbac.pushKubeconfigSecrets)") from None
    text = _secret_value(secret, ref.key)
    if not text:
        raise ConfigError(f"HospitalSite {site}: Secret {ref.namespace}/{ref.name} has no key "
                          f"{ref.key!r}")
    # Everything is checked before the client is built: a refused Secret opens nothing.
    kubeconfig = check_kubeconfig(site, text)
    config = agent_config(site, spec, _secret_value(secret, AGENT_CONFIG_KEY), store_endpoint)
    try:
        local = kubernetes.config.new_client_from_config_dict(kubeconfig)
    except kubernetes.config.ConfigException as exc:
        raise ConfigError(f"HospitalSite {site}: the push kubeconfig is unusable: {exc}") from None
    return SiteAgent(config, hub, local)
