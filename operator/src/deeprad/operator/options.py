"""The hub operator's own options (no kopf here: `deeprad --help` reads the defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HubOptions:
    """The hub's configuration: intervals of the passes that re-derive state, and what rounds
    need (the store, the Jobs' namespace, image and Secrets, the hub's public keys)."""

    site_interval: float = 15.0  # re-read each site's heartbeat Lease
    study_interval: float = 10.0  # re-derive each study from its rounds
    round_interval: float = 5.0  # re-derive each running round from its tasks, Jobs and store
    task_history: float = 600.0  # seconds an ended round keeps its SiteTasks (hub/cleanup.py)
    sweep_interval: float = 60.0  # seconds between garbage sweeps (hub/cleanup.py)
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
    # Trust deeprad.io/created-by (audit records name the study's creator) only when the
    # deeprad-study-creator admission policies guard it; otherwise any author could forge it.
    record_study_creator: bool = False

    def missing_for_rounds(self) -> list[str]:
        """The flags a hub needs before it can run rounds, if any are unset."""
        return [flag for flag, value in (("--store", self.store_url),
                                         ("--hub-keys", self.hub_keys_dir),
                                         ("--hub-identity-secret", self.hub_identity_secret))
                if not value]
