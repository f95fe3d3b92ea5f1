"""Push mode: for a lab cluster that cannot run an agent, the hub runs the site agent itself.

The HospitalSite names a hub Secret (`spec.connection.kubeconfigSecretRef`) holding the lab
cluster's kubeconfig and, optionally under `agent.yaml`, the same agent configuration the site
chart renders (training namespace, image, identity Secret, data, GPUs). A kopf daemon per push
site runs `SiteAgent` with the hub's own client on the hub side and that kubeconfig on the other,
so work items, heartbeats and readiness are exactly those of a pull site.

Kubeconfigs that run programs (`exec` credential plugins) or use `auth-provider` are refused:
the hub would execute whatever the Secret's author chose.
"""

from __future__ import annotations

import base64
from typing import Any

import kubernetes
import yaml
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from deeprad.core.errors import ConfigError
from deeprad.operator.api.hospitalsite import HospitalSiteSpec
from deeprad.operator.site.agent import SiteAgent
from deeprad.operator.site.config import AgentConfig, TrainingResources

AGENT_CONFIG_KEY = "agent.yaml"


def check_kubeconfig(site: str, text: str) -> dict[str, Any]:
    """The parsed kubeconfig, or ConfigError when it is malformed or runs code."""
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"HospitalSite {site}: the push kubeconfig is not YAML: {exc}") from None
    if not isinstance(config, dict) or not config.get("clusters"):
        raise ConfigError(f"HospitalSite {site}: the push kubeconfig has no clusters")
    for user in config.get("users") or ():
        creds = (user or {}).get("user") or {}
        for field in ("exec", "auth-provider"):
            if field in creds:
                raise ConfigError(
                    f"HospitalSite {site}: the push kubeconfig's user {user.get('name')!r} uses "
                    f"`{field}`, which would run a program inside the hub; use a token or a "
                    "client certificate instead")
    return dict(config)


def agent_config(site: str, spec: HospitalSiteSpec, text: str | None) -> AgentConfig:
    """The Secret's agent.yaml, or defaults: the HospitalSite's GPU settings and limits."""
    if text:
        try:
            data = yaml.safe_load(text) or {}
            data.setdefault("site", site)
            config = AgentConfig.model_validate(data)
        except (yaml.YAMLError, ValidationError) as exc:
            raise ConfigError(f"HospitalSite {site}: {AGENT_CONFIG_KEY} in the push Secret is "
                              f"invalid: {exc}") from None
        if config.site != site:
            raise ConfigError(f"HospitalSite {site}: {AGENT_CONFIG_KEY} is for site "
                              f"{config.site}")
        return config
    base = AgentConfig(site=site)
    training = base.training.model_copy(update={
        "gpu": spec.gpu, "max_task_duration": spec.limits.max_task_duration,
        "resources": TrainingResources(cpu=spec.limits.cpu or "1",
                                       memory=spec.limits.memory or "4Gi")})
    return base.model_copy(update={"training": training})


def _secret_value(secret: Any, key: str) -> str | None:
    raw = (secret.data or {}).get(key)
    return base64.b64decode(raw).decode("utf-8") if raw else None


def push_agent(site: str, spec: HospitalSiteSpec, hub: kubernetes.client.ApiClient) -> SiteAgent:
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
                          f"{exc.reason}); create it, and let the hub read it") from None
    text = _secret_value(secret, ref.key)
    if not text:
        raise ConfigError(f"HospitalSite {site}: Secret {ref.namespace}/{ref.name} has no key "
                          f"{ref.key!r}")
    local = kubernetes.config.new_client_from_config_dict(check_kubeconfig(site, text))
    config = agent_config(site, spec, _secret_value(secret, AGENT_CONFIG_KEY))
    return SiteAgent(config, hub, local)
