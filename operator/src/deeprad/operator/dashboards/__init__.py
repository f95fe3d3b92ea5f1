"""Deep-Rad's Grafana dashboards, built in Python with grafana-foundation-sdk.

One module per dashboard (fleet, study progress, round timeline, operator health); `gen`
serialises them into the hub chart (`make dashboards`), where the JSON is never edited by hand.
`promql_expressions()` lists every PromQL expression of every panel and alert, so a test can
check each one against a real Prometheus.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml
from grafana_foundation_sdk.builders.dashboard import Dashboard

from deeprad.operator.dashboards import fleet, health, rounds, study

# File stem in the chart → builder. The stems are the ConfigMap keys Grafana loads.
DASHBOARDS: dict[str, Callable[[], Dashboard]] = {
    "deeprad-fleet": fleet.build,
    "deeprad-study-progress": study.build,
    "deeprad-round-timeline": rounds.build,
    "deeprad-operator-health": health.build,
}
# The dashboards are written into the hub chart of the checkout this source lives in.
REPO_ROOT = next((p for p in Path(__file__).resolve().parents if (p / "helm" / "deeprad").is_dir()),
                 Path.cwd())
CHART_DIR = REPO_ROOT / "helm" / "deeprad"
DASHBOARDS_DIR = CHART_DIR / "files" / "dashboards"
ALERTS_FILE = CHART_DIR / "files" / "alerts.yaml"

# What Grafana substitutes at query time, with values Prometheus accepts, so the expressions
# can be sent to Prometheus as they are. Longest names first ($__range before $__rate_interval
# is harmless, but $__interval must not eat $__interval_ms).
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
}
MULTI_VALUE_VARIABLES = ("$namespace", "$study", "$site", "$job")


def panel_expressions() -> dict[str, str]:
    """`<dashboard>/<panel title>/<refId>` → PromQL of every target of every panel, as written
    (with Grafana variables)."""
    found: dict[str, str] = {}
    for stem, build in DASHBOARDS.items():
        board = build().build()
        for panel in board.panels or []:
            for target in getattr(panel, "targets", None) or []:
                expr = getattr(target, "expr", None)
                if expr:
                    found[f"{stem}/{panel.title}/{target.ref_id}"] = expr
        for variable in (board.templating.list_val or []) if board.templating else []:
            query = variable.query
            if isinstance(query, dict) and query.get("query"):
                found[f"{stem}/${variable.name}"] = str(query["query"])
    return found


def alert_expressions(alerts_file: Path = ALERTS_FILE) -> dict[str, str]:
    """`alert/<group>/<alert>` → PromQL of every rule in the Prometheus rule file."""
    groups = yaml.safe_load(Path(alerts_file).read_text(encoding="utf-8"))["groups"]
    return {f"alert/{g['name']}/{r.get('alert') or r.get('record')}": str(r["expr"]).strip()
            for g in groups for r in g["rules"]}


def resolve_variables(expr: str) -> str:
    """The expression as Prometheus would receive it from Grafana with every variable at
    'All' (`.*`) and the time variables at typical values."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    for name in MULTI_VALUE_VARIABLES:
        expr = expr.replace(name, ".*")
    return expr


def promql_expressions(alerts_file: Path = ALERTS_FILE, resolve: bool = True) -> dict[str, str]:
    """Every PromQL expression of every dashboard panel and alert, keyed by where it is used;
    with `resolve`, Grafana variables replaced so each can be sent to Prometheus. Variable
    queries (`label_values(...)`) are Grafana functions, not PromQL: they are not included."""
    exprs = {k: v for k, v in panel_expressions().items() if "/$" not in k}
    exprs.update(alert_expressions(alerts_file))
    return {k: resolve_variables(v) for k, v in exprs.items()} if resolve else exprs


__all__ = ["DASHBOARDS", "alert_expressions", "panel_expressions", "promql_expressions",
           "resolve_variables"]
