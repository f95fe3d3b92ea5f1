"""Fleet: which hospitals are Ready and Reachable, their GPU capacity and heartbeat age."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard

from deeprad.operator.dashboards.panels import label_variable, new_dashboard, query, series, single

UID = "deeprad-fleet"
SITE = 'site=~"$site"'


def build() -> dashboard.Dashboard:
    """The fleet dashboard."""
    return (
        new_dashboard(UID, "Deep-Rad / Fleet", "Hospital sites: readiness, reachability, GPU "
                                              "capacity and the age of each agent's heartbeat.")
        .with_variable(label_variable("site", "Site", "label_values(deeprad_site_ready, site)"))
        .with_row(dashboard.Row("Now"))
        .with_panel(single("Sites registered", "HospitalSites the hub operator knows.",
                           query(f"count(deeprad_site_ready{{{SITE}}})")))
        .with_panel(single("Sites Ready", "Sites that may be given work (Ready=True).",
                           query(f"sum(deeprad_site_ready{{{SITE}}})"),
                           steps=[(None, "red"), (1, "green")]))
        .with_panel(single("Sites Reachable", "Sites whose agent heartbeat is recent "
                                              "(Reachable=True).",
                           query(f"sum(deeprad_site_reachable{{{SITE}}})"),
                           steps=[(None, "red"), (1, "green")]))
        .with_panel(single("GPUs", "GPUs the site agents report, all sites together.",
                           query(f"sum(deeprad_site_gpus{{{SITE}}})")))
        .with_row(dashboard.Row("Per site"))
        .with_panel(series("Ready", "1 when the site may be given work.",
                           [query(f"deeprad_site_ready{{{SITE}}}", "{{site}}")],
                           min_value=0, max_value=1))
        .with_panel(series("Reachable", "1 when the site's agent heartbeat is recent.",
                           [query(f"deeprad_site_reachable{{{SITE}}}", "{{site}}")],
                           min_value=0, max_value=1))
        .with_panel(series("GPU capacity", "GPUs each site agent reports on its cluster.",
                           [query(f"deeprad_site_gpus{{{SITE}}}", "{{site}}")], min_value=0))
        .with_panel(series("Time since last heartbeat", "Age of the renewTime of each site "
                                                        "agent's Lease on the hub.",
                           [query(f"time() - deeprad_site_last_heartbeat_timestamp_seconds"
                                  f"{{{SITE}}}", "{{site}}")], unit="s", min_value=0))
    )
