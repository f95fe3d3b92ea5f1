"""The hub operator and site agents as real subprocesses, for integration and e2e tests.

Each runs `python -m deeprad.operator.cli` from a work folder outside the checkout (`python -m`
puts cwd on sys.path, and the checkout's operator/ folder would shadow the standard library's
`operator`), logs to a file, and can be SIGKILLed to test crash recovery.
"""

from __future__ import annotations

import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deeprad.devenv.cluster import python_env
from deeprad.devenv.ports import free_port
from deeprad.devenv.processes import ManagedProcess, kill_group


class OperatorProcess:
    """`deeprad operator --mode hub|site` as a subprocess with a health and a metrics port."""

    def __init__(self, label: str, mode: str, args: list[str], workdir: Path, owner_token: str,
                 env: dict[str, str] | None = None) -> None:
        self.label = label
        self.mode = mode
        self.args = args
        self.workdir = workdir
        self.owner_token = owner_token
        self.env = {**python_env(), **(env or {})}
        self.health_port = free_port()
        self.metrics_port = free_port()
        self.process = self._process()
        self.starts = 0

    def _process(self) -> ManagedProcess:
        argv = [sys.executable, "-m", "deeprad.operator.cli", "--mode", self.mode,
                "--liveness", f"http://127.0.0.1:{self.health_port}/healthz",
                "--metrics-port", str(self.metrics_port), "--metrics-address", "127.0.0.1",
                *self.args]
        self.workdir.mkdir(parents=True, exist_ok=True)
        return ManagedProcess(self.label, argv, self.workdir / f"{self.label}.log",
                              self.owner_token, env=self.env, cwd=self.workdir)

    def start(self, timeout: float = 60.0) -> OperatorProcess:
        self.process = self._process().start()
        self.starts += 1
        wait(f"{self.label}'s health endpoint", self.healthy, timeout, self)
        return self

    def healthy(self) -> bool:
        if not self.process.alive():
            pytest.fail(f"{self.label} exited:\n{self.process.log_tail(80)}")
        try:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=5) as r:
            return str(r.read().decode())

    def kill9(self) -> None:
        """SIGKILL the process group: no shutdown code runs."""
        kill_group(self.process.pid, signal.SIGKILL)
        assert self.process.popen is not None
        self.process.popen.wait(timeout=10)

    def stop(self) -> None:
        self.process.stop()

    def log_tail(self, lines: int = 60) -> str:
        return self.process.log_tail(lines)


def wait(what: str, check: Callable[[], Any], timeout: float = 60.0,
         *logs: OperatorProcess | None, interval: float = 0.3,
         diagnostics: Callable[[], str] | None = None) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what`, with the given
    processes' log tails or `diagnostics()`, after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    tails = "\n".join(f"--- {p.label} ---\n{p.log_tail(40)}" for p in logs if p is not None)
    extra = diagnostics() if diagnostics else ""
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}{extra}")
