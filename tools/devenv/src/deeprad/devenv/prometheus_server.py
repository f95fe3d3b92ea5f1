"""A real Prometheus (Debian's package) scraping given metrics endpoints, e.g. the operator's."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from deeprad.devenv import binaries
from deeprad.devenv.ports import free_port
from deeprad.devenv.processes import ManagedProcess, new_owner_token, wait_until


class PrometheusServer:
    """start() → ready; set_targets() reloads; query() runs PromQL; alerts() lists what the
    rule files (evaluated every scrape interval) raise; stop() ends it."""

    def __init__(
        self,
        state_dir: Path,
        targets: list[str] | None = None,
        rule_files: list[Path] | None = None,
        scrape_interval: str = "1s",
        owner_token: str | None = None,
    ) -> None:
        self.dir = state_dir
        self.port = free_port()
        self.targets = list(targets or [])
        self.rule_files = list(rule_files or [])
        self.scrape_interval = scrape_interval
        self.owner_token = owner_token or new_owner_token()
        self.config_path = self.dir / "prometheus.yml"
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        """Base URL of the web UI and HTTP API."""
        return f"http://127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        config = {
            "global": {"scrape_interval": self.scrape_interval,
                       "evaluation_interval": self.scrape_interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {"job_name": "deeprad", "static_configs": [{"targets": self.targets}]},
            ],
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def start(self, timeout: float = 60.0) -> PrometheusServer:
        """Start Prometheus and wait for /-/ready."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        argv = [
            binaries.tool("prometheus"),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
            "--storage.tsdb.retention.time=1d",
        ]
        self.process = ManagedProcess("prometheus", argv, self.dir / "prometheus.log",
                                      self.owner_token, cwd=self.dir).start()
        proc = self.process

        def ready() -> bool:
            if not proc.alive():
                raise RuntimeError(f"prometheus exited:\n{proc.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        wait_until(ready, timeout, "prometheus /-/ready", interval=0.2)
        return self

    def stop(self) -> None:
        """Stop Prometheus."""
        if self.process is not None:
            self.process.stop()
            self.process = None

    def set_targets(self, targets: list[str]) -> None:
        """Scrape these host:port targets (path /metrics) from now on."""
        self.targets = list(targets)
        self._write_config()
        req = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        with urllib.request.urlopen(req, timeout=10):
            pass

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant PromQL query; returns the result vector."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            answer = json.load(resp)
        if answer.get("status") != "success":
            raise RuntimeError(f"query {expr!r} failed: {answer}")
        return list(answer["data"]["result"])

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts of the loaded rule files (each with labels, annotations and state
        'pending' or 'firing'); a rule whose expression matches nothing has none."""
        with urllib.request.urlopen(f"{self.url}/api/v1/alerts", timeout=10) as resp:
            answer = json.load(resp)
        if answer.get("status") != "success":
            raise RuntimeError(f"alerts failed: {answer}")
        return list(answer["data"]["alerts"])

    def target_health(self) -> dict[str, str]:
        """scrapeUrl → health ('up', 'down', 'unknown') of the active targets."""
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as resp:
            answer = json.load(resp)
        return {t["scrapeUrl"]: t["health"] for t in answer["data"]["activeTargets"]}

    def info(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {"url": self.url, "targets": self.targets,
                "pid": self.process.pid if self.process else None}


def check_rules(*rule_files: Path) -> subprocess.CompletedProcess[str]:
    """`promtool check rules` on files; returns the completed process (check returncode)."""
    return subprocess.run([binaries.tool("promtool"), "check", "rules", *map(str, rule_files)],
                          capture_output=True, text=True, timeout=60)
