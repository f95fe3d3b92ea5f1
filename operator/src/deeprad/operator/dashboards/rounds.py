"""Round timeline: how long each phase takes, which sites straggle or drop out, and how many
updates the aggregator rejects."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard

from deeprad.operator.dashboards.panels import SCOPE, new_dashboard, query, series, single
from deeprad.operator.dashboards.study import STUDY, study_variables

UID = "deeprad-rounds"


def _quantile(q: float, metric: str, by: str, selector: str = "") -> str:
    return (f"histogram_quantile({q}, sum by ({by}, le) "
            f"(rate({metric}_bucket{selector}[$__rate_interval])))")


def build() -> dashboard.Dashboard:
    """The round-timeline dashboard."""
    board = new_dashboard(UID, "Deep-Rad / Round timeline",
                          "Phase durations, stragglers, dropouts and rejected updates of the "
                          "studies' rounds.")
    scoped = f"{{{SCOPE}}}"
    return (
        study_variables(board)
        .with_row(dashboard.Row("Current round"))
        .with_panel(single("Time to deadline", "Seconds until the deadline of the round in "
                                               "progress (negative: overdue).",
                           query(f"min((deeprad_round_deadline_timestamp_seconds{scoped} > 0)"
                                 " - time())"), unit="s",
                           steps=[(None, "red"), (0, "yellow"), (600, "green")]))
        .with_panel(single("Sites admitted", "Sites admitted to the latest round.",
                           query(f'sum(deeprad_round_sites{{{SCOPE},state="admitted"}})')))
        .with_panel(single("Sites reported", "Sites of the latest round that uploaded.",
                           query(f'sum(deeprad_round_sites{{{SCOPE},state="reported"}})')))
        .with_panel(single("Sites dropped", "Sites of the latest round that missed the "
                                            "deadline or failed.",
                           query(f'sum(deeprad_round_sites{{{SCOPE},state="dropped"}})'),
                           steps=[(None, "green"), (1, "orange")]))
        .with_row(dashboard.Row("Durations"))
        .with_panel(series("Phase duration (p50, p95)", "Scheduling, training and aggregation "
                                                        "time of rounds, all studies.",
                           [query(_quantile(0.5, "deeprad_round_phase_duration_seconds",
                                            "phase"), "{{phase}} p50"),
                            query(_quantile(0.95, "deeprad_round_phase_duration_seconds",
                                            "phase"), "{{phase}} p95", "B")], unit="s"))
        .with_panel(series("Round duration (p95)", "Wall time of a round from creation to "
                                                   "Succeeded or Failed.",
                           [query(_quantile(0.95, "deeprad_round_duration_seconds",
                                            "namespace, study", scoped), STUDY)], unit="s"))
        .with_panel(series("Aggregation duration (p95)", "Wall time of the aggregator Job.",
                           [query(_quantile(0.95, "deeprad_aggregation_duration_seconds",
                                            "namespace, study", scoped), STUDY)], unit="s"))
        .with_panel(series("Update size (p50)", "Size of one site's uploaded update envelope.",
                           [query(_quantile(0.5, "deeprad_update_bytes", "namespace, study",
                                            scoped), STUDY)], unit="bytes"))
        .with_row(dashboard.Row("Sites"))
        .with_panel(series("Training time per site", "Training wall time of each site in the "
                                                     "latest round: stragglers stand out.",
                           [query(f"deeprad_site_training_duration_seconds{scoped}",
                                  "{{study}} {{site}}")], unit="s"))
        .with_panel(series("Straggler ratio", "Slowest site's training time over the median "
                                              "site's, per study (1 = no straggler).",
                           [query(f"max by (namespace, study) "
                                  f"(deeprad_site_training_duration_seconds{scoped}) / "
                                  f"quantile by (namespace, study) (0.5, "
                                  f"deeprad_site_training_duration_seconds{scoped})", STUDY)]))
        .with_panel(series("Sites per round", "Admitted, reported and dropped sites of the "
                                              "latest round.",
                           [query(f"deeprad_round_sites{scoped}",
                                  "{{study}} {{state}}")], min_value=0))
        .with_panel(series("Dropouts", "Admitted sites that did not report by the deadline or "
                                       "whose Job failed.",
                           [query(f"sum by (study, site) (increase("
                                  f"deeprad_sites_dropped_total{scoped}[$__rate_interval]))",
                                  "{{study}} {{site}}")], min_value=0))
        .with_panel(series("Rejected updates", "Updates the aggregator refused (signature, "
                                               "digest, replay, stale parent, malformed).",
                           [query(f"sum by (namespace, study) (increase("
                                  f"deeprad_updates_rejected_total{scoped}"
                                  "[$__rate_interval]))", STUDY)], min_value=0, width=24))
    )
