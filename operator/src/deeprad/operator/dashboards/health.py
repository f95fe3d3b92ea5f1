"""Operator health: reconcile errors and latency by kind, reconcile rate, and memory."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard

from deeprad.operator.dashboards.panels import label_variable, new_dashboard, query, series, single

UID = "deeprad-operator"
JOB = 'job=~"$job"'


def _latency(q: float) -> str:
    return (f"histogram_quantile({q}, sum by (kind, le) "
            f"(rate(deeprad_reconcile_duration_seconds_bucket{{{JOB}}}[$__rate_interval])))")


def build() -> dashboard.Dashboard:
    """The operator-health dashboard."""
    return (
        new_dashboard(UID, "Deep-Rad / Operator health",
                      "Reconcile errors, latency and rate by kind; the operator's memory.")
        .with_variable(label_variable(
            "job", "Job", 'label_values(process_resident_memory_bytes{job=~".*deeprad.*"}, job)'))
        .with_row(dashboard.Row("Now"))
        .with_panel(single("Operator up", "1 when Prometheus scrapes the operator.",
                           query(f"min(up{{{JOB}}})"), steps=[(None, "red"), (1, "green")]))
        .with_panel(single("Reconcile errors (1h)", "Reconcile passes that failed in the last "
                                                    "hour, all kinds.",
                           query(f"sum(increase(deeprad_reconcile_errors_total{{{JOB}}}[1h]))"),
                           steps=[(None, "green"), (1, "orange")]))
        .with_panel(single("Reconcile p95", "95th percentile of a reconcile pass, all kinds.",
                           query("histogram_quantile(0.95, sum by (le) (rate("
                                 f"deeprad_reconcile_duration_seconds_bucket{{{JOB}}}[5m])))"),
                           unit="s", steps=[(None, "green"), (5, "orange")]))
        .with_panel(single("Memory", "Resident memory of the operator process.",
                           query(f"max(process_resident_memory_bytes{{{JOB}}})"), unit="bytes"))
        .with_row(dashboard.Row("Reconciles"))
        .with_panel(series("Reconcile errors", "Failed reconcile passes per second, by kind.",
                           [query(f"sum by (kind) (rate(deeprad_reconcile_errors_total{{{JOB}}}"
                                  "[$__rate_interval]))", "{{kind}}")], unit="ops", min_value=0))
        .with_panel(series("Reconcile rate", "Reconcile passes per second, by kind.",
                           [query(f"sum by (kind) (rate("
                                  f"deeprad_reconcile_duration_seconds_count{{{JOB}}}"
                                  "[$__rate_interval]))", "{{kind}}")], unit="ops", min_value=0))
        .with_panel(series("Reconcile latency (p50, p99)", "Wall time of a reconcile pass.",
                           [query(_latency(0.5), "{{kind}} p50"),
                            query(_latency(0.99), "{{kind}} p99", "B")], unit="s"))
        .with_panel(series("Resident memory", "process_resident_memory_bytes of the operator.",
                           [query(f"process_resident_memory_bytes{{{JOB}}}", "{{instance}}")],
                           unit="bytes", min_value=0))
    )
