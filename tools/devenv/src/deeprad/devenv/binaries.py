"""Where the source-built tools live (see tools/build-tools.sh) and how to find them."""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

KUBE_TOOLS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
GO_TOOLS = (*KUBE_TOOLS, "helm", "kwok", "versitygw", "kueue")
SYSTEM_TOOLS = ("prometheus", "promtool")


class ToolsMissing(RuntimeError):
    """The tools cache has not been built; the message says how to build it."""


def repo_root() -> Path | None:
    """The checkout this package lives in, if it is one (it holds tools/build-tools.sh)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "tools" / "build-tools.sh").is_file():
            return parent
    return None


@cache
def tools_bin_dir() -> Path:
    """The folder holding the built binaries: $DEEPRAD_TOOLS_DIR/bin, else the pin-hash folder."""
    override = os.environ.get("DEEPRAD_TOOLS_DIR")
    if override:
        return Path(override) / "bin"
    root = repo_root()
    if root is None:
        raise ToolsMissing("cannot locate tools/build-tools.sh; set DEEPRAD_TOOLS_DIR")
    # The script owns the pin-hash recipe; asking it keeps one definition of the cache key.
    out = subprocess.run(
        ["bash", str(root / "tools" / "build-tools.sh"), "--print-bin-dir"],
        check=True, capture_output=True, text=True,
    )
    return Path(out.stdout.strip())


def tool(name: str) -> str:
    """Absolute path of a tool; Go tools from the cache, Prometheus from PATH."""
    if name in SYSTEM_TOOLS:
        found = shutil.which(name)
        if not found:
            raise ToolsMissing(f"{name} not on PATH; run `make tools` (apt-get install prometheus)")
        return found
    path = tools_bin_dir() / name
    if not os.access(path, os.X_OK):
        raise ToolsMissing(f"{path} missing; run `make tools` (tools/build-tools.sh)")
    return str(path)


def kwok_stages_dir() -> Path:
    """The kwok Stage manifests installed by the build script beside the binaries."""
    return tools_bin_dir().parent / "share" / "kwok-stages"


def missing_tools(names: tuple[str, ...] = GO_TOOLS + SYSTEM_TOOLS) -> list[str]:
    """Names of the tools that are not built or installed; empty when everything is there."""
    missing = []
    for name in names:
        try:
            tool(name)
        except ToolsMissing:
            missing.append(name)
    return missing


def tool_env() -> dict[str, str]:
    """os.environ with the tools folder first on PATH (so `kubectl` and `helm` resolve)."""
    env = dict(os.environ)
    env["PATH"] = f"{tools_bin_dir()}{os.pathsep}{env.get('PATH', '')}"
    return env
