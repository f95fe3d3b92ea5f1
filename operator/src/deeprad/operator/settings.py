"""kopf settings of the Deep-Rad operator (the hub's own options are in options.py).

Persistence is Deep-Rad's from day one: the finalizer `deeprad.io/finalizer`, handler progress
and the last-handled configuration in `deeprad.io/...` annotations (never in status, which the
CRD schemas prune and users read), so objects keep their state across operator versions.
"""

from __future__ import annotations

import logging

import kopf

from deeprad.operator.render import site as site_render

PREFIX = "deeprad.io"
# No handler needs a finalizer any more (hub/cleanup.py); naming it still matters: kopf takes it
# off the objects an older operator put it on.
FINALIZER = f"{PREFIX}/finalizer"
DIFFBASE_KEY = "last-handled-configuration"
COMPONENT = "deeprad-operator"
AGENT_LEASES = ("coordination.k8s.io", "v1", "leases")


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
    # The agents' heartbeat Leases are watched (hub/sites.py): only those, selected by the
    # server, so no other Lease (nodes', controllers') reaches the operator; the name selector
    # is also what lets RBAC grant list/watch on these Leases alone (resourceNames).
    settings.watching.field_selectors[AGENT_LEASES] = f"metadata.name={site_render.AGENT}"
    settings.watching.label_selectors[AGENT_LEASES] = \
        f"app.kubernetes.io/component={site_render.COMPONENT}"
