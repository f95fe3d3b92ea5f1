"""The node agent's path rewriting and env expansion (pure logic of the dev environment)."""

from __future__ import annotations

from pathlib import Path

from deeprad.devenv.pod_env import expand, resolve_executable
from deeprad.devenv.pod_volumes import PathMap


def test_mount_paths_are_rewritten_only_at_path_boundaries() -> None:
    paths = PathMap()
    paths.add("/data", Path("/host/pvc-1"))
    paths.add("/data/cache", Path("/host/empty"))
    assert paths.rewrite("/data") == "/host/pvc-1"
    assert paths.rewrite("/data/train/x.nii") == "/host/pvc-1/train/x.nii"
    assert paths.rewrite("--root=/data/train") == "--root=/host/pvc-1/train"
    assert paths.rewrite("/data/cache/a") == "/host/empty/a"  # the longer mount wins
    assert paths.rewrite("a:/data:b") == "a:/host/pvc-1:b"
    assert paths.rewrite("/database") == "/database"
    assert paths.rewrite("/x/data") == "/x/data"
    assert paths.host_path("/elsewhere") is None


def test_env_expansion_follows_kubelet() -> None:
    env = {"A": "1", "B": "two"}
    assert expand("$(A)-$(B)", env) == "1-two"
    assert expand("$$(A)", env) == "$(A)"
    assert expand("$(MISSING)", env) == "$(MISSING)"


def test_python_images_map_to_this_interpreter() -> None:
    import sys

    assert resolve_executable("python3", "/usr/bin") == sys.executable
    assert resolve_executable("/usr/local/bin/python3.11", "/usr/bin") == sys.executable
    assert resolve_executable("sh", "/usr/bin:/bin").endswith("/sh")
