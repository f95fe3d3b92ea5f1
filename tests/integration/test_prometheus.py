"""Prometheus scrapes a metrics endpoint; promtool checks rules."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from deeprad.devenv.prometheus_server import PrometheusServer, check_rules

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
