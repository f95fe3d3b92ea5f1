"""kopf settings of the Deep-Rad operator, and the hub's own options.

Persistence is Deep-Rad's from day one: the finalizer `deeprad.io/finalizer`, handler progress
and the last-handled configuration in `deeprad.io/...` annotations (never in status, which the
CRD schemas prune and users read), so objects keep their state across operator versions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import kopf

PREFIX = "deeprad.io"
FINALIZER = f"{PREFIX}/finalizer"
DIFFBASE_KEY = "last-handled-configuration"
COMPONENT = "deeprad-operator"


@dataclass(frozen=True)
class HubOptions:
    """The hub's configuration: intervals of the passes that re-derive state, and what rounds
    need (the store, the Jobs' namespace, image and Secrets, the hub's public keys)."""

    site_interval: float = 15.0  # re-read each site's heartbeat Lease
    study_interval: float = 10.0  # re-derive each study from its rounds
    round_interval: float = 5.0  # re-derive each running round from its tasks, Jobs and store
    store_url: str | None = None  # s3://bucket?endpoint=HOST:PORT (keys from the environment)
    public_store_endpoint: str | None = None  # HOST:PORT the sites reach the store at
    jobs_namespace: str = "deeprad-system"  # where prepare and aggregator Jobs run
    job_image: str = "ghcr.io/deeprad/deeprad:latest"
    image_pull_policy: str = "IfNotPresent"
    store_credentials_secret: str | None = None  # keys `access-key`, `secret-key`
    hub_identity_secret: str | None = None  # the hub's private key folder, for Jobs only
    hub_keys_dir: str | None = None  # the hub's public key files
    aggregator_cpu: str = "1"
    aggregator_memory: str = "4Gi"
    aggregation_timeout: float = 3600.0  # seconds an aggregator Job may run after training

    def missing_for_rounds(self) -> list[str]:
        """The flags a hub needs before it can run rounds, if any are unset."""
        return [flag for flag, value in (("--store", self.store_url),
                                         ("--hub-keys", self.hub_keys_dir),
                                         ("--hub-identity-secret", self.hub_identity_secret))
                if not value]


def operator_settings(standalone: bool = True, peering: str | None = None
                      ) -> kopf.OperatorSettings:
    """kopf settings: Deep-Rad persistence, Events as `deeprad-operator`, bounded watches.
    `peering` names a KopfPeering for several replicas; otherwise the operator runs alone."""
    settings = kopf.OperatorSettings()
    configure(settings)
    settings.peering.standalone = standalone and peering is None
    if peering is not None:
        settings.peering.name = peering
        settings.peering.mandatory = True
    return settings


def configure(settings: kopf.OperatorSettings) -> None:
    """Apply Deep-Rad's persistence, posting and watching settings to `settings`."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key=DIFFBASE_KEY)
    settings.posting.reporting_component = COMPONENT
    # kopf's per-handler INFO Events are noise; our handlers post theirs with kopf.event().
    settings.posting.level = logging.WARNING
    # Reconnect watches regularly, so a silently dropped connection costs minutes, not hours.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
