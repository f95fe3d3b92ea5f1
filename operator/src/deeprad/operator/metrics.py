"""The operator's Prometheus metrics (prometheus-client), all named `deeprad_*`.

They live in their own registry, served by `serve()` on the operator's metrics port, so an
embedding process's default registry is left alone. Label sets are bounded: namespace, study,
site, outcome, phase, kind; never a round name (rounds grow without bound).
"""

from __future__ import annotations

from collections.abc import Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes, cpu, open fds

# Round durations run from minutes to days.
_ROUND_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 172800, 604800)
_AGG_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)
_BYTES_BUCKETS = tuple(float(2 ** p) for p in range(16, 36, 2))  # 64 KiB .. 16 GiB

ROUNDS = Counter("deeprad_rounds", "Rounds finished, by outcome (succeeded, failed).",
                 ["namespace", "study", "outcome"], registry=REGISTRY)
ROUND_DURATION = Histogram("deeprad_round_duration_seconds",
                           "Wall time of a round, from creation to Succeeded or Failed.",
                           ["namespace", "study"], buckets=_ROUND_BUCKETS, registry=REGISTRY)
PHASE_DURATION = Histogram("deeprad_round_phase_duration_seconds",
                           "Wall time of each phase of a round (scheduling, training, "
                           "aggregation).", ["phase"], buckets=_ROUND_BUCKETS, registry=REGISTRY)
ROUND_SITES = Gauge("deeprad_round_sites",
                    "Sites of the study's latest round, by state (admitted, reported, dropped).",
                    ["namespace", "study", "state"], registry=REGISTRY)
AGGREGATION_DURATION = Histogram("deeprad_aggregation_duration_seconds",
                                 "Wall time of the aggregator Job.", ["namespace", "study"],
                                 buckets=_AGG_BUCKETS, registry=REGISTRY)
UPDATE_BYTES = Histogram("deeprad_update_bytes", "Size of one site's uploaded update envelope.",
                         ["namespace", "study"], buckets=_BYTES_BUCKETS, registry=REGISTRY)
GLOBAL_AUROC = Gauge("deeprad_global_auroc",
                     "AUROC of the study's newest global model on the sites' validation data.",
                     ["namespace", "study"], registry=REGISTRY)
GLOBAL_DICE = Gauge("deeprad_global_dice",
                    "Dice of the study's newest global model on the sites' validation data "
                    "(segmentation studies), pooled.", ["namespace", "study"], registry=REGISTRY)
GLOBAL_LOSS = Gauge("deeprad_global_loss",
                    "Validation loss of the study's newest global model.",
                    ["namespace", "study"], registry=REGISTRY)
STUDY_ROUNDS_COMPLETED = Gauge("deeprad_study_rounds_completed",
                               "Rounds of the study that succeeded.", ["namespace", "study"],
                               registry=REGISTRY)
STUDY_ROUNDS_PLANNED = Gauge("deeprad_study_rounds_planned", "spec.rounds of the study.",
                             ["namespace", "study"], registry=REGISTRY)
STUDY_EPSILON_SPENT = Gauge("deeprad_study_epsilon_spent",
                            "ε the study has spent (largest site), at its budget's δ.",
                            ["namespace", "study"], registry=REGISTRY)
SITE_REACHABLE = Gauge("deeprad_site_reachable",
                       "1 when the site's agent heartbeat is recent (Reachable=True).",
                       ["site"], registry=REGISTRY)
SITE_READY = Gauge("deeprad_site_ready", "1 when the site may be given work (Ready=True).",
                   ["site"], registry=REGISTRY)
ROUNDS_CREATED = Counter("deeprad_study_rounds_created",
                         "FederatedRounds this operator created for studies.",
                         ["namespace", "study"], registry=REGISTRY)
ROUND_DEADLINE = Gauge("deeprad_round_deadline_timestamp_seconds",
                       "Deadline (unix time) of the study's round in progress; 0 when none runs.",
                       ["namespace", "study"], registry=REGISTRY)
ROUND_NUMBER = Gauge("deeprad_round_number", "Number of the study's latest round.",
                     ["namespace", "study"], registry=REGISTRY)
SITE_ROUND_DURATION = Gauge("deeprad_site_training_duration_seconds",
                            "Training wall time of each site in the study's latest round "
                            "(stragglers stand out).", ["namespace", "study", "site"],
                            registry=REGISTRY)
SITES_DROPPED = Counter("deeprad_sites_dropped", "Admitted sites that did not report by the "
                        "deadline or whose Job failed.", ["namespace", "study", "site"],
                        registry=REGISTRY)
UPDATES_REJECTED = Counter("deeprad_updates_rejected", "Updates the aggregator refused "
                           "(signature, digest, replay, stale parent, malformed).",
                           ["namespace", "study"], registry=REGISTRY)
STUDY_EPSILON_BUDGET = Gauge("deeprad_study_epsilon_budget",
                             "spec.privacyBudget.epsilon of the study (absent without one).",
                             ["namespace", "study"], registry=REGISTRY)
SITE_EPSILON_SPENT = Gauge("deeprad_site_epsilon_spent",
                           "ε the study has spent of each site's data (status.privacy.sites), at "
                           "its budget's δ.", ["namespace", "study", "site"], registry=REGISTRY)
SITE_HEARTBEAT = Gauge("deeprad_site_last_heartbeat_timestamp_seconds",
                       "renewTime (unix time) of the site agent's Lease.", ["site"],
                       registry=REGISTRY)
SITE_GPUS = Gauge("deeprad_site_gpus", "GPUs the site agent reports on its cluster.", ["site"],
                  registry=REGISTRY)
RECONCILE_DURATION = Histogram("deeprad_reconcile_duration_seconds",
                               "Wall time of one reconcile pass, by kind.", ["kind"],
                               buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                               registry=REGISTRY)
RECONCILE_ERRORS = Counter("deeprad_reconcile_errors",
                           "Reconcile passes that ended in an error, by kind.", ["kind"],
                           registry=REGISTRY)


# Every metric labelled by study: what a deleted study leaves behind unless it is forgotten.
_PER_STUDY = (ROUNDS, ROUND_DURATION, ROUND_SITES, AGGREGATION_DURATION, UPDATE_BYTES,
              GLOBAL_AUROC, GLOBAL_DICE, GLOBAL_LOSS, STUDY_ROUNDS_COMPLETED, STUDY_ROUNDS_PLANNED,
              STUDY_EPSILON_SPENT, ROUNDS_CREATED, ROUND_DEADLINE, ROUND_NUMBER,
              SITE_ROUND_DURATION, SITES_DROPPED, UPDATES_REJECTED, STUDY_EPSILON_BUDGET,
              SITE_EPSILON_SPENT)


def record_study_budget(namespace: str, study: str, epsilon: float | None) -> None:
    """Export spec.privacyBudget.epsilon; a study without a budget has no series, so the
    ε-against-budget panels and the budget alert skip it instead of dividing by zero."""
    if epsilon is None:
        STUDY_EPSILON_BUDGET.remove_by_labels({"namespace": namespace, "study": study})
    else:
        STUDY_EPSILON_BUDGET.labels(namespace=namespace, study=study).set(epsilon)


def record_site_epsilon(namespace: str, study: str, per_site: Mapping[str, float]) -> None:
    """Export the ε the study has spent of each site's data, as its status lists it: a site
    no longer listed loses its series rather than showing a stale value."""
    exported = _SITES_EXPORTED.setdefault((namespace, study), set())
    for site in exported - set(per_site):
        SITE_EPSILON_SPENT.remove(namespace, study, site)
    for site, epsilon in per_site.items():
        SITE_EPSILON_SPENT.labels(namespace=namespace, study=study, site=site).set(epsilon)
    exported.clear()
    exported.update(per_site)


# the sites each study exports ε for: a pass touches its own series only, not every sample
_SITES_EXPORTED: dict[tuple[str, str], set[str]] = {}


def forget_study(namespace: str, study: str) -> None:
    """Drop every series of a deleted study, so label sets stay bounded by the studies that
    exist and its last ε and progress stop being exported (and alerted on)."""
    for metric in _PER_STUDY:
        metric.remove_by_labels({"namespace": namespace, "study": study})
    _SITES_EXPORTED.pop((namespace, study), None)


def serve(port: int, address: str = "0.0.0.0") -> WSGIServer:
    """Serve /metrics on `address:port` in a background thread; port 0 picks a free one
    (`server_port` of the returned server), `shutdown()` stops it."""
    server, _ = start_http_server(port, addr=address, registry=REGISTRY)
    return server
