"""The hub operator's *act* layer: thin kopf handlers that read the world, call `decide`,
render manifests and apply them; one module per resource it reconciles.

- `sites`: HospitalSite. The site's hub namespace, agent ServiceAccount, Role, RoleBinding and
  heartbeat Lease are applied on create/resume/update; a timer sets Reachable and Ready from
  the Lease; a push-mode site's agent runs inside the hub (`push`).
- `studies`: FederatedStudy. The study is re-derived from the rounds it owns and the next round
  is created when due (deterministic name, create-or-get: a restart never duplicates one).
- `rounds`: FederatedRound. A timer runs one pass at a time (`round_pass`: observe, decide,
  act, through `round_children`); on delete, its SiteTasks and hub Jobs go too.
- `cleanup`: lifecycles. No finalizers (every object can be deleted with the operator
  absent); a sweep collects ended rounds' SiteTasks and what deleted rounds left behind.
- `memo`: what every handler shares; `resources`: the kinds watched and how status is written.

Nothing lives only in memory: kopf's indices are caches of the API that it rebuilds at start,
and every write is idempotent. API errors become kopf.TemporaryError (retried, counted in
deeprad_reconcile_errors_total); what a user must fix becomes a condition.
"""

from __future__ import annotations

import kopf

from deeprad.operator.hub import cleanup, rounds, sites, studies
from deeprad.operator.hub.memo import HubMemo, login, make_memo
from deeprad.operator.options import HubOptions


def build_registry(options: HubOptions) -> kopf.OperatorRegistry:
    """A fresh registry with every hub handler; `kopf.run(registry=...)` runs them."""
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(login)
    sites.register(registry, options)
    studies.register(registry, options)
    rounds.register(registry, options)
    cleanup.register(registry, options)
    cleanup.without_finalizers(registry)
    return registry


__all__ = ["HubMemo", "build_registry", "make_memo"]
