"""`deeprad site token SITE`: the hub kubeconfig a hospital's agent uses, with a token of bounded
lifetime that the hub admin can revoke at once.

The token is a TokenRequest for the site's ServiceAccount `deeprad-agent` in its hub namespace
`deeprad-site-<site>` (the operator creates both when it registers the HospitalSite), bound to a
fresh anchor Secret there: the token expires after `--duration` (the API server may shorten it;
the expiry printed is the one it granted), and deleting its anchor Secret revokes it before
that. Rotation is: run the command again, hand the new file to the hospital (`helm upgrade
--set-file hub.kubeconfig=FILE` rolls the agent), then `--revoke-others` (or delete the old
anchor) so the previous token stops working. The token reaches only what the site's Role in its
namespace grants (read its SiteTasks, report their status, renew its Lease).
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from deeprad.core.errors import ConfigError
from deeprad.core.layout import check_name

AGENT = "deeprad-agent"  # the site's ServiceAccount on the hub (operator/render/site.py)
ANCHOR_PREFIX = "deeprad-agent-token-"
ANCHOR_LABEL = "deeprad.io/agent-token"
DEFAULT_DURATION = "720h"
MAX_DURATION = timedelta(days=90)
MIN_DURATION = timedelta(minutes=10)  # the API server refuses shorter tokens
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?$")


def register(site_parsers: argparse._SubParsersAction) -> None:
    """Add `site token` under `deeprad site`."""
    tok = site_parsers.add_parser(
        "token", help="write a site agent's hub kubeconfig with a bounded, revocable token",
        description="Requests a token for the site's ServiceAccount deeprad-agent in hub "
                    "namespace deeprad-site-<SITE>, bound to a new anchor Secret there, and "
                    "writes a kubeconfig for the site chart's hub.kubeconfig value. The token "
                    "expires after --duration (at most 90 days); delete the anchor Secret (or "
                    "pass --revoke-others on the next rotation) to revoke it earlier. Run it "
                    "with the hub admin's kubeconfig.")
    tok.add_argument("site", help="the HospitalSite's name")
    tok.add_argument("-o", "--output", type=Path, required=True,
                     help="kubeconfig file to write (mode 0600)")
    tok.add_argument("--duration", default=DEFAULT_DURATION,
                     help=f"token lifetime, e.g. 720h, 30d, 90m (default {DEFAULT_DURATION}, "
                          "at least 10m, at most 90d)")
    tok.add_argument("--server", help="the hub API server URL as the hospital reaches it "
                                      "(default: the admin kubeconfig's server)")
    tok.add_argument("--revoke-others", action="store_true",
                     help="delete this site's other anchor Secrets: their tokens stop working")
    tok.add_argument("--kubeconfig", help="the hub admin's kubeconfig (default: $KUBECONFIG "
                                          "or ~/.kube/config)")
    tok.add_argument("--context", help="kubeconfig context (default: the current one)")
    tok.set_defaults(func=cmd_site_token)


def parse_duration(text: str) -> timedelta:
    """'30d', '720h', '1d12h', '90m' as a timedelta within [10m, 90d]; ConfigError otherwise."""
    match = _DURATION.match(text.strip())
    if not text.strip() or match is None:
        raise ConfigError(f"--duration {text!r}: write it as days, hours and minutes, e.g. "
                          "720h, 30d or 1d12h")
    days, hours, minutes = (int(g or 0) for g in match.groups())
    value = timedelta(days=days, hours=hours, minutes=minutes)
    if not MIN_DURATION <= value <= MAX_DURATION:
        raise ConfigError(f"--duration {text}: a site token lives between 10m and 90d; rotate "
                          "it (run this command again) rather than issuing a longer one")
    return value


def kubeconfig_for(site: str, server: str, ca_data: str | None, token: str) -> dict[str, Any]:
    """A single-context kubeconfig for the site's agent; inline data only (no file paths)."""
    cluster: dict[str, Any] = {"server": server}
    if ca_data:
        cluster["certificate-authority-data"] = ca_data
    name = f"deeprad-hub-{site}"
    return {"apiVersion": "v1", "kind": "Config", "current-context": name,
            "clusters": [{"name": name, "cluster": cluster}],
            "users": [{"name": f"{site}-agent", "user": {"token": token}}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": f"{site}-agent",
                                                    "namespace": f"deeprad-site-{site}"}}]}


def cmd_site_token(args: argparse.Namespace) -> int:
    """Issue (and optionally rotate) a site's hub token; write its kubeconfig."""
    import kubernetes
    import yaml
    from kubernetes.client.exceptions import ApiException

    site = check_name("site", args.site)
    lifetime = parse_duration(args.duration)
    namespace = f"deeprad-site-{site}"
    api = kubernetes.config.new_client_from_config(config_file=args.kubeconfig,
                                                   context=args.context)
    core = kubernetes.client.CoreV1Api(api)
    try:
        core.read_namespaced_service_account(AGENT, namespace)
    except ApiException as exc:
        if exc.status == 404:
            raise ConfigError(f"site {site}: ServiceAccount {namespace}/{AGENT} does not exist; "
                              f"apply HospitalSite {site} on the hub first (the operator "
                              "creates its namespace and account)") from None
        raise
    client = kubernetes.client
    anchor = core.create_namespaced_secret(namespace, client.V1Secret(
        type="Opaque", metadata=client.V1ObjectMeta(
            generate_name=ANCHOR_PREFIX, labels={ANCHOR_LABEL: site},
            annotations={"deeprad.io/purpose": "binds the site agent's hub token; delete it "
                                               "to revoke the token"})))
    anchor_name, anchor_uid = _name_uid(anchor.metadata)
    granted = core.create_namespaced_service_account_token(
        AGENT, namespace, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
            audiences=[], expiration_seconds=int(lifetime.total_seconds()),
            bound_object_ref=client.V1BoundObjectReference(
                api_version="v1", kind="Secret", name=anchor_name, uid=anchor_uid)))).status
    if granted is None or not granted.token:
        raise ConfigError(f"site {site}: the API server issued no token for "
                          f"{namespace}/{AGENT}")
    expires = granted.expiration_timestamp
    server = args.server or api.configuration.host
    ca_data = None
    if api.configuration.ssl_ca_cert:
        ca_data = base64.b64encode(Path(api.configuration.ssl_ca_cert).read_bytes()).decode()
    text = yaml.safe_dump(kubeconfig_for(site, server, ca_data, granted.token), sort_keys=False)
    fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    revoked: list[str] = []
    if args.revoke_others:
        others = core.list_namespaced_secret(namespace, label_selector=f"{ANCHOR_LABEL}={site}")
        for secret in others.items:
            name, _ = _name_uid(secret.metadata)
            if name != anchor_name:
                core.delete_namespaced_secret(name, namespace)
                revoked.append(name)
    print(f"wrote the hub kubeconfig of site {site} to {args.output} (mode 0600): token "
          f"expires {expires.isoformat() if expires else 'at an unknown time'}, bound to Secret "
          f"{namespace}/{anchor_name} (delete it to revoke the token)", file=sys.stderr)
    if revoked:
        print(f"revoked {len(revoked)} earlier token(s): deleted {', '.join(revoked)}",
              file=sys.stderr)
    return 0


def _name_uid(meta: Any) -> tuple[str, str]:
    """An API object's name and uid (the client types both as optional)."""
    return str(meta.name), str(meta.uid)
