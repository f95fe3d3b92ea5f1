"""Prometheus scrapes a metrics endpoint; promtool checks rules; the shipped privacy-budget
alert fires, and the ε panels of the generated dashboards return data, on the operator's own
metrics."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from deeprad_processes import wait

from deeprad.devenv.binaries import missing_tools
from deeprad.devenv.prometheus_server import PrometheusServer, check_rules
from deeprad.operator import metrics
from deeprad.operator.api.federatedstudy import FederatedStudySpec, FederatedStudyStatus
from deeprad.operator.dashboards import ALERTS_FILE, DASHBOARDS_DIR, resolve_variables
from deeprad.operator.hub.studies import export_study

pytestmark = pytest.mark.integration


class _Metrics(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"# TYPE deeprad_rounds_total counter\ndeeprad_rounds_total 42\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def metrics_endpoint() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_scrapes_the_given_endpoint(prometheus: PrometheusServer, metrics_endpoint: str) -> None:
    prometheus.set_targets([metrics_endpoint])
    deadline = time.monotonic() + 30
    result: list[dict[str, object]] = []
    while time.monotonic() < deadline and not result:
        result = prometheus.query("deeprad_rounds_total")
        time.sleep(0.5)
    assert result, "the metric never arrived"
    assert result[0]["value"][1] == "42"  # type: ignore[index]


def test_promtool_checks_rules(prometheus: PrometheusServer, tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "groups:\n- name: deeprad\n  rules:\n  - alert: RoundStuck\n"
        "    expr: deeprad_rounds_total == 0\n    for: 10m\n"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups:\n- name: deeprad\n  rules:\n  - alert: Broken\n    expr: rate(\n")
    assert check_rules(good).returncode == 0
    assert check_rules(bad).returncode != 0


# ---- the ε metrics, the shipped budget alert and the generated ε panels --------------------------

BUDGET_ALERT = "DeepRadPrivacyBudgetNearlySpent"
BUDGET = 8.0
NEAR = ("oncology", "eps-near-budget")   # 95% of its budget spent: the alert must fire
HALF = ("oncology", "eps-half-budget")   # 50%: it must not
SPENT_PER_SITE = {NEAR: {"st-marys": 0.95 * BUDGET, "charite": 0.6 * BUDGET},
                  HALF: {"st-marys": 0.5 * BUDGET}}
EPSILON_PANELS = {"Privacy budget used", "ε spent against budget", "ε spent per site"}


def _export(namespace: str, study: str, spent: dict[str, float]) -> None:
    """What the hub operator exports for a DP study, through its own functions."""
    spec = FederatedStudySpec.model_validate({
        "model": {"name": "tumor-cnn"}, "rounds": 20,
        "privacyBudget": {"epsilon": BUDGET, "delta": 1e-5}})
    status = FederatedStudyStatus(completed_rounds=3, epsilon_spent=max(spent.values()))
    export_study(namespace, study, spec, status, None)
    metrics.record_site_epsilon(namespace, study, spent)


@pytest.fixture(scope="module")
def budget_prometheus(devenv_dir: Path, owner_token: str) -> Iterator[PrometheusServer]:
    """A Prometheus of its own that evaluates the chart's alerts.yaml, unchanged (the budget rule
    has no `for:`, so no shortened copy is needed), every second, scraping the operator's real
    registry with one study at 95% and one at 50% of its ε budget."""
    if missing_tools(("prometheus",)):
        pytest.skip("prometheus not installed; run `make tools` (tools/build-tools.sh)")
    for (namespace, study), spent in SPENT_PER_SITE.items():
        _export(namespace, study, spent)
    endpoint = metrics.serve(0, "127.0.0.1")
    server = PrometheusServer(devenv_dir / "prometheus-alerts", rule_files=[ALERTS_FILE],
                              targets=[f"127.0.0.1:{endpoint.server_port}"],
                              owner_token=owner_token).start()
    try:
        wait("Prometheus to scrape both studies' ε and budget", lambda: len(server.query(
            "deeprad_study_epsilon_spent / deeprad_study_epsilon_budget")) == 2, 60)
        yield server
    finally:
        server.stop()
        endpoint.shutdown()
        endpoint.server_close()
        for namespace, study in SPENT_PER_SITE:
            metrics.forget_study(namespace, study)


def _budget_alerts(server: PrometheusServer) -> dict[str, dict[str, Any]]:
    return {a["labels"]["study"]: a for a in server.alerts()
            if a["labels"].get("alertname") == BUDGET_ALERT}


def _near_firing(server: PrometheusServer) -> dict[str, dict[str, Any]]:
    """The budget alerts once the study at 95% fires: the rule has then been evaluated on a
    scrape that held both studies."""
    def firing() -> dict[str, dict[str, Any]] | None:
        found = _budget_alerts(server)
        return found if found.get(NEAR[1], {}).get("state") == "firing" else None

    return dict(wait(f"{BUDGET_ALERT} to fire for {NEAR[1]}", firing, 30,
                     diagnostics=lambda: f"\nalerts now: {server.alerts()}"))


def test_budget_alert_from_the_chart_fires_for_a_study_at_95_percent(
        budget_prometheus: PrometheusServer) -> None:
    rule = next(r for g in yaml.safe_load(ALERTS_FILE.read_text(encoding="utf-8"))["groups"]
                for r in g["rules"] if r.get("alert") == BUDGET_ALERT)
    assert "for" not in rule, "the rule gained a `for:`: render a test copy with a short one"
    alert = _near_firing(budget_prometheus)[NEAR[1]]
    assert alert["labels"]["namespace"] == NEAR[0]
    assert alert["labels"]["severity"] == "info"
    assert float(alert["value"]) == pytest.approx(0.95)
    assert alert["annotations"]["summary"] == (
        f"Study {NEAR[0]}/{NEAR[1]} spent 90% of its privacy budget")
    assert "95%" in alert["annotations"]["description"]


def test_budget_alert_stays_quiet_for_a_study_at_50_percent(
        budget_prometheus: PrometheusServer) -> None:
    alerts = _near_firing(budget_prometheus)
    assert HALF[1] not in alerts, f"{BUDGET_ALERT} raised at 50%: {alerts[HALF[1]]}"
    ratios = {r["metric"]["study"]: float(r["value"][1]) for r in budget_prometheus.query(
        "deeprad_study_epsilon_spent / deeprad_study_epsilon_budget")}
    assert ratios == pytest.approx({NEAR[1]: 0.95, HALF[1]: 0.5})


def _panels(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in node.get("panels") or []:
        yield panel
        yield from _panels(panel)  # panels of a collapsed row


def test_every_epsilon_panel_of_the_generated_dashboards_returns_data(
        budget_prometheus: PrometheusServer) -> None:
    targets: dict[str, str] = {}
    for path in sorted(DASHBOARDS_DIR.glob("*.json")):
        for panel in _panels(json.loads(path.read_text(encoding="utf-8"))):
            for target in panel.get("targets") or []:
                if "epsilon" in target.get("expr", ""):
                    targets[f"{path.stem}/{panel['title']}/{target['refId']}"] = target["expr"]
    assert {where.split("/")[1] for where in targets} == EPSILON_PANELS
    results = {where: budget_prometheus.query(resolve_variables(expr))
               for where, expr in targets.items()}
    empty = [f"{where}: {targets[where]}" for where, result in results.items() if not result]
    assert not empty, "ε panels without data:\n" + "\n".join(empty)

    used = results["deeprad-study-progress/Privacy budget used/A"]
    assert float(used[0]["value"][1]) == pytest.approx(0.95)
    per_site = {(r["metric"]["study"], r["metric"]["site"]): float(r["value"][1])
                for r in results["deeprad-study-progress/ε spent per site/A"]}
    assert per_site == pytest.approx({(study, site): value
                                      for (_, study), spent in SPENT_PER_SITE.items()
                                      for site, value in spent.items()})
