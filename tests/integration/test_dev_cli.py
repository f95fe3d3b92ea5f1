"""`deeprad dev up` brings up hub + sites with GPU nodes; `deeprad dev down` leaves nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from deeprad.devenv.binaries import tool, tool_env
from deeprad.devenv.ports import port_open
from deeprad.devenv.processes import OWNER_ENV

pytestmark = pytest.mark.integration


def _dev(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deeprad.devenv", "dev", *args],
                          capture_output=True, text=True, timeout=timeout)


def _owned_by(token: str) -> list[int]:
    pids = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(OWNER_ENV) == token:
                pids.append(proc.pid)
        except psutil.Error:
            pass
    return pids


def test_dev_up_status_down(devenv_tools: None, tmp_path: Path) -> None:
    state_dir = tmp_path / "dev"
    up = _dev("up", "--detach", "--sites", "1", "--state-dir", str(state_dir))
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        assert "site-1" in up.stdout and "S3:" in up.stdout and "Prometheus:" in up.stdout
        state = json.loads((state_dir / "state.json").read_text())
        for context in ("hub", "site-1"):
            out = subprocess.run(
                [tool("kubectl"), f"--kubeconfig={state['kubeconfig']}", f"--context={context}",
                 "get", "nodes", "-l", "nvidia.com/gpu.present=true", "-o", "name"],
                capture_output=True, text=True, env=tool_env(), check=True,
            ).stdout
            assert out.strip() == f"node/{context}-gpu-0"
        assert _dev("status", "--state-dir", str(state_dir)).returncode == 0
        assert _owned_by(state["owner_token"])
    finally:
        down = _dev("down", "--state-dir", str(state_dir))
    assert down.returncode == 0, down.stderr
    assert not _owned_by(state["owner_token"])
    assert not psutil.pid_exists(state["supervisor_pid"])
    urls = [c["server"] for c in state["clusters"]] + [c["etcd"] for c in state["clusters"]]
    urls += [state["s3"]["endpoint"], state["prometheus"]["url"]]
    still_open = [u for u in urls if port_open(int(u.rsplit(":", 1)[1].rstrip("/")))]
    assert not still_open, f"ports still listening after down: {still_open}"
    assert _dev("status", "--state-dir", str(state_dir)).returncode == 1
