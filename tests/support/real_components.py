"""Session fixtures for integration and e2e tests: real clusters, S3 and Prometheus on
loopback (imported once, by tests/conftest.py, so every folder shares the same instances).

They skip (with the command to run) only when the tools cache is not built; CI builds it first.
Teardown stops every process, also when a test fails or the run is interrupted: fixtures stop
their components, deeprad.devenv.processes stops the rest at exit or on SIGTERM/SIGHUP, and a
sweep by owner token catches anything that escaped its process group.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deeprad.devenv.binaries import GO_TOOLS, KUBE_TOOLS, SYSTEM_TOOLS, missing_tools
from deeprad.devenv.cluster import Cluster, start_clusters
from deeprad.devenv.processes import new_owner_token, sweep_token
from deeprad.devenv.prometheus_server import PrometheusServer
from deeprad.devenv.s3_server import S3Server

SITES = ("site-1", "site-2")


def _require(*names: str) -> None:
    missing = missing_tools(names)
    if missing:
        pytest.skip(f"tools cache not built (missing: {', '.join(missing)}); "
                    "run `make tools` (tools/build-tools.sh)")


@pytest.fixture(scope="session")
def devenv_tools() -> None:
    """Skip unless every source-built tool and Prometheus are installed."""
    _require(*GO_TOOLS, *SYSTEM_TOOLS)


@pytest.fixture(scope="session")
def kube_tools() -> None:
    """Skip unless the Kubernetes binaries are built."""
    _require(*KUBE_TOOLS)


@pytest.fixture(scope="session")
def owner_token() -> Iterator[str]:
    """Owner token of everything this test session starts; swept at the end."""
    token = new_owner_token()
    yield token
    sweep_token(token)


@pytest.fixture(scope="session")
def devenv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """State folder of this session's clusters and servers."""
    return tmp_path_factory.mktemp("devenv")


@pytest.fixture(scope="session")
def hub_cluster(kube_tools: None, devenv_dir: Path, owner_token: str) -> Iterator[Cluster]:
    """The hub: a real control plane with one GPU node and one CPU node."""
    cluster = Cluster("hub", devenv_dir / "clusters", owner_token=owner_token)
    start_clusters([cluster])
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def clusters(hub_cluster: Cluster, devenv_dir: Path, owner_token: str
             ) -> Iterator[dict[str, Cluster]]:
    """Hub plus two hospital clusters (site-1, site-2), independent control planes."""
    sites = [Cluster(name, devenv_dir / "clusters", owner_token=owner_token) for name in SITES]
    start_clusters(sites)
    yield {"hub": hub_cluster, **{c.name: c for c in sites}}
    for c in sites:
        c.stop()


@pytest.fixture(scope="session")
def s3_server(devenv_dir: Path, owner_token: str) -> Iterator[S3Server]:
    """A running S3 gateway (root account; create_user / create_bucket for more)."""
    _require("versitygw")
    server = S3Server(devenv_dir / "s3", owner_token=owner_token).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def prometheus(devenv_dir: Path, owner_token: str) -> Iterator[PrometheusServer]:
    """A running Prometheus with no targets yet; point it with set_targets()."""
    _require("prometheus")
    server = PrometheusServer(devenv_dir / "prometheus", owner_token=owner_token).start()
    yield server
    server.stop()
