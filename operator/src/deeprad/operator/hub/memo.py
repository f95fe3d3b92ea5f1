"""What every hub handler shares (kopf's `memo`): the options, the API client and, when the
hub is configured for rounds, what round passes need."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import kopf
import kubernetes

from deeprad.core.errors import ConfigError
from deeprad.core.identity import PublicIdentity
from deeprad.core.store import open_store
from deeprad.core.store.retry import RetryPolicy
from deeprad.core.store.s3 import S3Store
from deeprad.operator.client import Kube, connection_info, load_configuration
from deeprad.operator.hub.cleanup import Sweeper
from deeprad.operator.hub.privacy import LedgerReader
from deeprad.operator.hub.round_children import RoundHub
from deeprad.operator.options import HubOptions


@dataclass
class HubMemo:
    """The options, the chosen client configuration and its API client."""

    options: HubOptions
    configuration: kubernetes.client.Configuration
    kube: Kube
    rounds: RoundHub | None = None  # None until the hub is configured for rounds
    ledger: LedgerReader | None = None  # the studies' privacy ledgers, with the store
    sweeper: Sweeper = field(default_factory=Sweeper)  # shared by the per-object memo copies


OPERATOR_STORE_RETRY_S = 15.0  # per pass; the next pass tries again


def make_memo(options: HubOptions, kubeconfig: str | None, context: str | None) -> HubMemo:
    """The shared memo: options, the chosen client configuration, its API client, and (when
    the store and the hub's keys are configured) what round passes need."""
    configuration = load_configuration(kubeconfig, context)
    kube = Kube(configuration)
    rounds = ledger = None
    if not options.missing_for_rounds():
        assert options.store_url is not None and options.hub_keys_dir is not None
        identity = PublicIdentity.load(Path(options.hub_keys_dir))
        if identity.role != "hub":
            raise ConfigError(f"--hub-keys {options.hub_keys_dir}: role is {identity.role!r}, "
                              "expected 'hub' (pass the hub's public key folder)")
        core = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(configuration))
        store = open_store(options.store_url)
        if isinstance(store, S3Store):
            # A pass is repeated every interval: it retries a store outage briefly and fails,
            # so no handler thread waits out the trainers' ten-minute window.
            store.retry = RetryPolicy(window_s=OPERATOR_STORE_RETRY_S)
        rounds = RoundHub(options=options, kube=kube, core=core, store=store, hub=identity)
        ledger = LedgerReader(rounds.store, identity)
    return HubMemo(options=options, configuration=configuration, kube=kube, rounds=rounds,
                   ledger=ledger, sweeper=Sweeper(options.sweep_interval,
                                                  timedelta(seconds=options.task_history)))


def login(memo: HubMemo, **_: Any) -> kopf.ConnectionInfo:
    """kopf's credentials: those of the configuration the hub chose."""
    return connection_info(memo.configuration)
