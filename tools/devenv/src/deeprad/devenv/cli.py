"""`deeprad dev up | down | status`: the local multi-cluster environment.

Only argparse is imported at module level: registering the command must not start anything or
install signal handlers in the product CLI; the machinery is imported when a command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `dev` command with its up/down/status subcommands."""
    dev = subparsers.add_parser(
        "dev", help="local hub + hospital clusters, S3 and Prometheus (no containers needed)"
    )
    sub = dev.add_subparsers(dest="dev_command", required=True)

    up = sub.add_parser("up", help="start the environment; runs until `deeprad dev down`")
    up.add_argument("--sites", type=int, default=2, help="hospital clusters (default 2)")
    up.add_argument("--detach", action="store_true",
                    help="run in the background and return once everything is ready")
    up.add_argument("--metrics-target", action="append", default=None, metavar="HOST:PORT",
                    help="what Prometheus scrapes (default: the operator on 127.0.0.1:8080)")
    _state_dir_arg(up)
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop the environment; leaves no process behind")
    _state_dir_arg(down)
    down.set_defaults(func=cmd_down)

    status = sub.add_parser("status", help="show what runs and where")
    _state_dir_arg(status)
    status.set_defaults(func=cmd_status)


def _state_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="state folder (default $DEEPRAD_DEV_STATE_DIR or "
                             "~/.local/state/deeprad/dev)")


def _state_dir(args: argparse.Namespace) -> Path:
    from deeprad.devenv.environment import default_state_dir

    return Path(args.state_dir) if args.state_dir else default_state_dir()


def _read_state(state_dir: Path) -> dict[str, Any] | None:
    from deeprad.devenv.environment import read_state

    return read_state(state_dir)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def print_summary(state: dict[str, Any]) -> None:
    """Human-readable endpoints of a running environment."""
    print(f"kubeconfig (all clusters): {state['kubeconfig']}")
    for c in state["clusters"]:
        print(f"  {c['name']:<8} context={c['context']:<8} server={c['server']}  "
              f"kubeconfig={c['kubeconfig']}  nodes={','.join(c['nodes'])}")
    if state.get("s3"):
        s3 = state["s3"]
        print(f"S3:         {s3['endpoint']}  bucket={state['s3_bucket']}  "
              f"access_key={s3['access_key']} secret_key={s3['secret_key']}")
    if state.get("prometheus"):
        p = state["prometheus"]
        print(f"Prometheus: {p['url']}  scraping {', '.join(p['targets'])}")
    if state.get("started_seconds"):
        print(f"started in {state['started_seconds']:.1f}s; "
              f"stop with `deeprad dev down --state-dir {state['state_dir']}`")


def cmd_up(args: argparse.Namespace) -> int:
    """Start the environment (foreground, or --detach)."""
    from deeprad.devenv.binaries import missing_tools
    from deeprad.devenv.environment import DevEnvironment

    state_dir = _state_dir(args)
    missing = missing_tools()
    if missing:
        print(f"missing tools: {', '.join(missing)}; run `make tools` first", file=sys.stderr)
        return 1
    existing = _read_state(state_dir)
    if existing and _alive(existing.get("supervisor_pid")):
        print(f"already running (pid {existing['supervisor_pid']}); `deeprad dev down` first",
              file=sys.stderr)
        return 1
    if args.detach:
        return _up_detached(args, state_dir)
    env = DevEnvironment(state_dir, sites=args.sites,
                         metrics_targets=args.metrics_target or ["127.0.0.1:8080"])
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        env.start()
        state = _read_state(state_dir)
        assert state is not None
        print_summary(state)
        sys.stdout.flush()
        stop.wait()
    finally:
        env.stop()
    print("deeprad dev: stopped")
    return 0


def _up_detached(args: argparse.Namespace, state_dir: Path) -> int:
    state_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "deeprad.devenv", "dev", "up", "--sites", str(args.sites),
            "--state-dir", str(state_dir)]
    for target in args.metrics_target or []:
        argv += ["--metrics-target", target]
    log_path = state_dir / "dev-up.log"
    with open(log_path, "ab") as log:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if child.poll() is not None:
            print(f"deeprad dev up failed; see {log_path}:", file=sys.stderr)
            print("\n".join(log_path.read_text().splitlines()[-30:]), file=sys.stderr)
            return 1
        state = _read_state(state_dir)
        if state and state.get("ready") and state.get("supervisor_pid") == child.pid:
            print_summary(state)
            print(f"running in the background (pid {child.pid}, log {log_path})")
            return 0
        time.sleep(0.5)
    print("deeprad dev up: not ready after 600s", file=sys.stderr)
    return 1


def cmd_down(args: argparse.Namespace) -> int:
    """Stop a running environment and sweep any process it left."""
    from deeprad.devenv.processes import sweep_token

    state_dir = _state_dir(args)
    state = _read_state(state_dir)
    if state is None:
        print(f"nothing running in {state_dir}")
        return 0
    pid = state.get("supervisor_pid")
    if _alive(pid):
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 90
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    swept = sweep_token(state["owner_token"])
    with contextlib.suppress(OSError):
        (state_dir / "state.json").unlink()
    extra = f" (killed {swept} leftover processes)" if swept else ""
    print(f"deeprad dev: down{extra}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print what runs; exit 1 if the environment is not running."""
    state_dir = _state_dir(args)
    state = _read_state(state_dir)
    if state is None:
        print(f"not running (no state in {state_dir})")
        return 1
    alive = _alive(state.get("supervisor_pid"))
    phase = "ready" if state.get("ready") else "starting"
    print(f"supervisor pid {state.get('supervisor_pid')}: {phase if alive else 'dead'}")
    for c in state["clusters"]:
        dead = [name for name, pid in c["pids"].items() if not _alive(pid)]
        health = "ok" if not dead else f"DOWN: {', '.join(dead)}"
        print(f"  cluster {c['name']:<8} {c['server']}  {health}")
    print_summary(state)
    return 0 if alive else 1
