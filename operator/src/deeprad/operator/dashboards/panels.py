"""Small builders shared by every dashboard: the Prometheus datasource variable, PromQL
targets and the few panel shapes the dashboards use.

Every query goes through `query()`, so `deeprad.operator.dashboards.promql_expressions()` can
list what each panel asks Prometheus (an e2e test checks that each returns data).
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import common, dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.models.dashboard import (
    Dashboard,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

DATASOURCE = "datasource"  # name of the datasource variable every panel uses
DS = DataSourceRef(type_val="prometheus", uid=f"${{{DATASOURCE}}}")
SCOPE = 'namespace=~"$namespace",study=~"$study"'  # the study dashboards' label filter


def datasource_variable() -> dashboard.DatasourceVariable:
    """Pick the Prometheus datasource once per dashboard."""
    return (dashboard.DatasourceVariable(DATASOURCE).label("Prometheus").type("prometheus")
            .current(VariableOption(text="default", value="default", selected=True)))


def label_variable(name: str, label: str, query_text: str) -> dashboard.QueryVariable:
    """A multi-value variable over one label's values, with an 'All' that matches anything."""
    return (dashboard.QueryVariable(name).label(label).datasource(DS)
            .query({"query": query_text, "refId": f"{name}-values"})
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*")
            .current(VariableOption(text="All", value="$__all", selected=True)))


def query(expr: str, legend: str = "__auto", ref: str = "A") -> prometheus.Dataquery:
    """One PromQL target."""
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DS)


def new_dashboard(uid: str, title: str, description: str) -> dashboard.Dashboard:
    """A dashboard with Deep-Rad's tags, a 6-hour window, 30 s refresh and the datasource
    variable."""
    return (dashboard.Dashboard(title).uid(uid).description(description)
            .tags(["deeprad", "federated-learning"]).time("now-6h", "now").refresh("30s")
            .timezone("browser").readonly().with_variable(datasource_variable()))


def _thresholds(steps: list[tuple[float | None, str]]) -> dashboard.ThresholdsConfig:
    return (dashboard.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE)
            .steps([Threshold(value=v, color=c) for v, c in steps]))


def series(title: str, description: str, targets: list[prometheus.Dataquery], unit: str = "short",
           width: int = 12, height: int = 8, min_value: float | None = None,
           max_value: float | None = None) -> timeseries.Panel:
    """A time-series panel with one or more targets."""
    panel = (timeseries.Panel().title(title).description(description).datasource(DS)
             .unit(unit).span(width).height(height).line_width(1).fill_opacity(10)
             .targets(list(targets)))
    if min_value is not None:
        panel = panel.min(min_value)
    if max_value is not None:
        panel = panel.max(max_value)
    return panel


def single(title: str, description: str, target: prometheus.Dataquery, unit: str = "short",
           width: int = 6, height: int = 4,
           steps: list[tuple[float | None, str]] | None = None) -> stat.Panel:
    """A stat panel showing the last value of one query, coloured by thresholds."""
    return (stat.Panel().title(title).description(description).datasource(DS).unit(unit)
            .span(width).height(height).with_target(target.instant())
            .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
            .thresholds(_thresholds(steps or [(None, "green")])))


def numbered(board: Dashboard) -> Dashboard:
    """The built dashboard with panel ids 1, 2, ... in layout order (the builders leave 0)."""
    for number, panel in enumerate(board.panels or [], start=1):
        panel.id_val = number
    return board
