"""The Grafana dashboards: generated into the hub chart from operator/dashboards (never edited
by hand), every panel on the Prometheus datasource variable, every PromQL expression listed
and naming only metrics the operator exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from deeprad.operator import metrics
from deeprad.operator.dashboards import (
    ALERTS_FILE,
    DASHBOARDS_DIR,
    alert_expressions,
    gen,
    panel_expressions,
    promql_expressions,
)

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
            "gauge": ("",)}
OTHER_SERIES = {"up", "process_resident_memory_bytes"}  # Prometheus' own; the process collector


def _exported_series() -> set[str]:
    names = set(OTHER_SERIES)
    for collector in metrics.REGISTRY._collector_to_names:  # no public listing of collectors
        if isinstance(collector, MetricWrapperBase):
            for metric in collector.describe():
                names.update(metric.name + s for s in SUFFIXES.get(metric.type, ("",)))
    return names


def test_committed_dashboards_are_exactly_what_the_source_renders() -> None:
    rendered = gen.render_all()
    committed = {p.name: p.read_text(encoding="utf-8") for p in DASHBOARDS_DIR.glob("*.json")}
    assert sorted(committed) == sorted(rendered), "run `make dashboards`"
    for name, text in rendered.items():
        assert committed[name] == text, f"{name} is stale: run `make dashboards`"
    assert gen.render_all() == rendered  # deterministic
    assert gen.main(["--check"]) == 0


def test_check_reports_a_stale_or_extra_file(tmp_path: Path) -> None:
    assert gen.main(["--out", str(tmp_path), "--check"]) == 1
    assert gen.main(["--out", str(tmp_path)]) == 0
    assert gen.main(["--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "old.json").write_text("{}")
    assert gen.main(["--out", str(tmp_path), "--check"]) == 1
    assert gen.main(["--out", str(tmp_path)]) == 0
    assert not (tmp_path / "old.json").exists()


def test_four_dashboards_with_unique_uids_and_datasource_variable() -> None:
    boards = [json.loads(t) for t in gen.render_all().values()]
    assert {b["title"] for b in boards} == {
        "Deep-Rad / Fleet", "Deep-Rad / Study progress", "Deep-Rad / Round timeline",
        "Deep-Rad / Operator health"}
    assert len({b["uid"] for b in boards}) == len(boards)
    for board in boards:
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        panels = [p for p in board["panels"] if p["type"] != "row"]
        assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
        for panel in panels:
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"] and panel["description"], panel["title"]
            for target in panel["targets"]:
                assert target["expr"] and target["datasource"] == panel["datasource"]


def test_every_expression_names_only_exported_metrics() -> None:
    exported = _exported_series()
    exprs = promql_expressions()
    assert len(exprs) >= 40
    for where, expr in exprs.items():
        assert "$" not in expr, f"{where}: unresolved variable in {expr}"
        for name in re.findall(r"\b(deeprad_[a-z_]+|process_[a-z_]+)\b", expr):
            assert name in exported, f"{where}: {name} is not exported by operator/metrics.py"


def test_the_topics_of_the_issue_are_covered() -> None:
    text = " ".join(panel_expressions().values())
    for metric in ("deeprad_site_ready", "deeprad_site_reachable", "deeprad_site_gpus",
                   "deeprad_site_last_heartbeat_timestamp_seconds", "deeprad_global_auroc",
                   "deeprad_global_dice",
                   "deeprad_global_loss", "deeprad_study_epsilon_spent",
                   "deeprad_study_epsilon_budget", "deeprad_site_epsilon_spent",
                   "deeprad_round_phase_duration_seconds",
                   "deeprad_site_training_duration_seconds", "deeprad_sites_dropped_total",
                   "deeprad_updates_rejected_total", "deeprad_reconcile_errors_total",
                   "deeprad_reconcile_duration_seconds", "process_resident_memory_bytes"):
        assert metric in text, metric


def test_alert_expressions_come_from_the_chart_file() -> None:
    alerts = alert_expressions()
    assert set(alerts) == {"alert/deeprad.rounds/DeepRadRoundStalled",
                           "alert/deeprad.sites/DeepRadSiteUnreachable",
                           "alert/deeprad.operator/DeepRadReconcileErrorsRising",
                           "alert/deeprad.privacy/DeepRadPrivacyBudgetNearlySpent"}
    assert alerts.items() <= promql_expressions().items()
    assert ALERTS_FILE.is_file()
    raw = promql_expressions(resolve=False)
    assert any("$__rate_interval" in e for e in raw.values())
