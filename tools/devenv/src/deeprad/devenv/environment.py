"""The whole development environment: a hub cluster, N hospital clusters, S3 and Prometheus.

Shared by `deeprad dev up` and the integration fixtures. Everything lives in one state folder;
`state.json` there says what runs where, so `deeprad dev down` can stop it from another shell.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deeprad.devenv.cluster import Cluster, start_clusters
from deeprad.devenv.processes import new_owner_token, sweep_orphans, sweep_token
from deeprad.devenv.prometheus_server import PrometheusServer
from deeprad.devenv.s3_server import S3Server

STATE_FILE = "state.json"
DEFAULT_BUCKET = "deeprad"
DEFAULT_OPERATOR_METRICS = "127.0.0.1:8080"


def default_state_dir() -> Path:
    """$DEEPRAD_DEV_STATE_DIR, else $XDG_STATE_HOME/deeprad/dev (~/.local/state/...)."""
    override = os.environ.get("DEEPRAD_DEV_STATE_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "deeprad" / "dev"


def site_names(sites: int) -> list[str]:
    """Cluster names of the hospital sites: site-1 ... site-N."""
    return [f"site-{i}" for i in range(1, sites + 1)]


@dataclass
class DevEnvironment:
    """Start with start(), stop with stop(); info() is what state.json holds."""

    state_dir: Path
    sites: int = 2
    metrics_targets: list[str] = field(default_factory=lambda: [DEFAULT_OPERATOR_METRICS])
    owner_token: str = field(default_factory=new_owner_token)
    clusters: list[Cluster] = field(default_factory=list)
    s3: S3Server | None = None
    prometheus: PrometheusServer | None = None
    started_seconds: float | None = None

    def start(self) -> DevEnvironment:
        """Start everything (clusters in parallel); on failure stop what started and raise."""
        begin = time.monotonic()
        sweep_orphans()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._write_state(ready=False)
        try:
            self.s3 = S3Server(self.state_dir / "s3", owner_token=self.owner_token).start()
            self.s3.create_bucket(DEFAULT_BUCKET)
            self.prometheus = PrometheusServer(
                self.state_dir / "prometheus", targets=self.metrics_targets,
                owner_token=self.owner_token, scrape_interval="5s",
            ).start()
            names = ["hub", *site_names(self.sites)]
            self.clusters = [Cluster(n, self.state_dir / "clusters", owner_token=self.owner_token)
                             for n in names]
            start_clusters(self.clusters)
        except BaseException:
            self.stop()
            raise
        self._write_merged_kubeconfig()
        self.started_seconds = time.monotonic() - begin
        self._write_state(ready=True)
        return self

    def stop(self) -> None:
        """Stop every cluster and server, then sweep anything left with our owner token."""
        for cluster in self.clusters:
            with contextlib.suppress(Exception):
                cluster.stop()
        for server in (self.prometheus, self.s3):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()
        sweep_token(self.owner_token)
        with contextlib.suppress(OSError):
            (self.state_dir / STATE_FILE).unlink()

    @property
    def kubeconfig(self) -> Path:
        """One kubeconfig holding a context per cluster (hub, site-1, ...)."""
        return self.state_dir / "kubeconfig"

    def _write_merged_kubeconfig(self) -> None:
        merged: dict[str, Any] = {"apiVersion": "v1", "kind": "Config", "clusters": [],
                                  "users": [], "contexts": [], "current-context": "hub"}
        for cluster in self.clusters:
            one = yaml.safe_load(cluster.kubeconfig.read_text())
            for key in ("clusters", "users", "contexts"):
                merged[key].extend(one[key])
        self.kubeconfig.touch(mode=0o600)
        self.kubeconfig.write_text(yaml.safe_dump(merged, sort_keys=False))

    def info(self, ready: bool = True) -> dict[str, Any]:
        """What runs where: supervisor pid, owner token, clusters, S3, Prometheus."""
        return {
            "ready": ready,
            "supervisor_pid": os.getpid(),
            "owner_token": self.owner_token,
            "state_dir": str(self.state_dir),
            "kubeconfig": str(self.kubeconfig),
            "started_seconds": self.started_seconds,
            "clusters": [c.info() for c in self.clusters],
            "s3": self.s3.info() if self.s3 else None,
            "s3_bucket": DEFAULT_BUCKET,
            "prometheus": self.prometheus.info() if self.prometheus else None,
        }

    def _write_state(self, ready: bool) -> None:
        path = self.state_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.touch(mode=0o600)
        tmp.write_text(json.dumps(self.info(ready), indent=2))
        tmp.replace(path)


def read_state(state_dir: Path) -> dict[str, Any] | None:
    """The state.json of a running (or crashed) environment, if any."""
    try:
        return dict(json.loads((state_dir / STATE_FILE).read_text()))
    except (OSError, ValueError):
        return None
