"""Markers by folder (tests/unit -> unit, tests/integration -> integration, tests/e2e -> e2e),
the shared real-component fixtures, and a sweep of leftover processes around the session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from real_components import (  # noqa: F401 (fixtures)
    clusters,
    devenv_dir,
    devenv_tools,
    hub_cluster,
    kube_tools,
    owner_token,
    prometheus,
    s3_server,
)
from redteam import table as redteam_table

from deeprad.devenv.processes import stop_all, sweep_orphans

_KINDS = ("unit", "integration", "e2e")

# Tests that run the `deeprad` command run the one installed beside this interpreter (.venv/bin
# under `make test`), whatever PATH says.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for kind in _KINDS:
            if kind in parts:
                item.add_marker(getattr(pytest.mark, kind))


def pytest_sessionstart(session: pytest.Session) -> None:
    sweep_orphans()  # leftovers of a run that was killed with SIGKILL


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    stop_all()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = redteam_table()
    if lines:
        terminalreporter.section("red team: every attack refused")
        for line in lines:
            terminalreporter.write_line(line)
