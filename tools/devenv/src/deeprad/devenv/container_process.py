"""One run of one container as a local process group, its output in a CRI-format log file.

Log lines are written as kubelet's CRI logs are: `<RFC3339Nano time> <stream> F <line>`, so the
log server can honour timestamps, sinceSeconds and tailLines.
"""

from __future__ import annotations

import contextlib
import datetime
import signal
import subprocess
import threading
from pathlib import Path
from typing import IO, Any

from deeprad.devenv.processes import kill_group

JSON = dict[str, Any]


def now_rfc3339() -> str:
    """Current UTC time the way the API server writes it (seconds resolution)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now_nano() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ContainerProcess:
    """A started container process; exit_code is None while it runs."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> None:
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed when both readers finish
        self._lock = threading.Lock()
        self.started_at = now_rfc3339()
        self.finished_at: str | None = None
        try:
            self.popen = subprocess.Popen(
                argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True,
            )
        except OSError:
            self._log.close()
            raise
        assert self.popen.stdout is not None and self.popen.stderr is not None
        self._readers = [
            threading.Thread(target=self._pump, args=(self.popen.stdout, "stdout"), daemon=True),
            threading.Thread(target=self._pump, args=(self.popen.stderr, "stderr"), daemon=True),
        ]
        for t in self._readers:
            t.start()

    @property
    def pid(self) -> int:
        """Process id, also the process-group id."""
        return self.popen.pid

    def _pump(self, pipe: IO[bytes], stream: str) -> None:
        for line in iter(pipe.readline, b""):
            text = line.rstrip(b"\n")
            tag = b"F" if line.endswith(b"\n") else b"P"
            with self._lock:
                self._log.write(f"{_now_nano()} {stream} ".encode() + tag + b" " + text + b"\n")
                self._log.flush()
        pipe.close()

    def poll(self) -> int | None:
        """The exit code once the process and its output are finished, else None."""
        code = self.popen.poll()
        if code is None:
            return None
        if any(t.is_alive() for t in self._readers):
            # A child that inherited the pipes may keep them open; don't wait forever.
            for t in self._readers:
                t.join(timeout=0.5)
        if self.finished_at is None:
            self.finished_at = now_rfc3339()
            with self._lock:
                self._log.close()
        # Killed by a signal: report 128+n, as container runtimes do.
        return code if code >= 0 else 128 - code

    def terminate(self, grace: float) -> None:
        """SIGTERM the group, SIGKILL after grace seconds, then reap."""
        if self.popen.poll() is None:
            kill_group(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=max(grace, 0.0))
        kill_group(self.pid, signal.SIGKILL)  # also ends stragglers left in the group
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        self.poll()
