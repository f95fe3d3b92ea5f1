"""Supervised child processes that never outlive their owner.

Every process started here runs in its own process group and carries an owner token in its
environment (`DEEPRAD_DEVENV_OWNER=<owner pid>:<random>`); the node agent passes the token on to
the pods it runs. Teardown stops the groups it knows and then sweeps the process table for the
token, so nothing is left behind even when a group escaped (a pod that called setsid). Tokens whose
owner pid is gone (a runner killed with SIGKILL) are swept at the next start.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType

import psutil

log = logging.getLogger(__name__)

OWNER_ENV = "DEEPRAD_DEVENV_OWNER"


def new_owner_token() -> str:
    """A token naming this process as owner of everything started with it."""
    return f"{os.getpid()}:{uuid.uuid4().hex[:12]}"


class ManagedProcess:
    """One long-running child in its own process group, its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        owner_token: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.owner_token = owner_token
        self.env = dict(os.environ if env is None else env)
        self.env[OWNER_ENV] = owner_token
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The child's pid, which is also its process-group id."""
        assert self.popen is not None, f"{self.name} not started"
        return self.popen.pid

    def start(self) -> ManagedProcess:
        """Start the child; it is stopped by stop(), stop_all() or at interpreter exit."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.cwd, start_new_session=True,
            )
        _registry.add(self)
        return self

    def alive(self) -> bool:
        """Whether the child has not exited yet."""
        return self.popen is not None and self.popen.poll() is None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the whole group, SIGKILL it after `grace` seconds; idempotent."""
        if self.popen is None:
            return
        kill_group(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing", self.name, grace)
        kill_group(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        _registry.discard(self)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the child's log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def kill_group(pgid: int, sig: signal.Signals) -> None:
    """Signal a process group, ignoring one that is already gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _owner_of(proc: psutil.Process) -> str | None:
    try:
        return proc.environ().get(OWNER_ENV)
    except (psutil.Error, OSError):
        return None


def _running(pid: int) -> bool:
    """Whether pid is a live process (a zombie waiting to be reaped is not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def sweep(predicate: Callable[[str], bool]) -> int:
    """SIGKILL every process whose owner token satisfies predicate; return how many."""
    me = os.getpid()
    victims = []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        token = _owner_of(proc)
        if token is not None and predicate(token):
            victims.append(proc)
    for proc in victims:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(victims, timeout=5)
    return len(victims)


def sweep_token(token: str) -> int:
    """Kill everything started with this owner token."""
    return sweep(lambda t: t == token)


def sweep_orphans() -> int:
    """Kill processes whose owner (the pid in their token) no longer exists."""

    def orphaned(token: str) -> bool:
        owner = token.split(":", 1)[0]
        return owner.isdigit() and not _running(int(owner))

    return sweep(orphaned)


class _Registry:
    """The live children of this interpreter, stopped at exit or on SIGTERM/SIGHUP."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: dict[ManagedProcess, None] = {}  # ordered: stopped newest first
        self._tokens: set[str] = set()
        self._installed = False

    def add(self, proc: ManagedProcess) -> None:
        with self._lock:
            self._procs[proc] = None
            self._tokens.add(proc.owner_token)
        self.install()

    def discard(self, proc: ManagedProcess) -> None:
        with self._lock:
            self._procs.pop(proc, None)

    def stop_all(self) -> None:
        with self._lock:
            procs, tokens = list(reversed(self._procs)), set(self._tokens)
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.stop(grace=2.0)
        for token in tokens:
            with contextlib.suppress(Exception):
                sweep_token(token)

    def install(self) -> None:
        """Register the atexit hook and, from the main thread, SIGTERM/SIGHUP handlers."""
        if self._installed:
            return
        if threading.current_thread() is not threading.main_thread():
            # Signal handlers can only be set from the main thread; the import-time call
            # below normally got there first. atexit still covers a normal exit.
            atexit.register(self.stop_all)
            self._installed = True
            return
        self._installed = True
        atexit.register(self.stop_all)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_all()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


_registry = _Registry()
if threading.current_thread() is threading.main_thread():
    _registry.install()


def stop_all() -> None:
    """Stop every child this interpreter started and sweep their owner tokens."""
    _registry.stop_all()


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.1
) -> None:
    """Poll condition until true; raise TimeoutError naming `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
