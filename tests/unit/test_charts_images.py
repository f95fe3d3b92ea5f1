"""The Dockerfiles in images/ run as the non-root uid the charts and Jobs use, with the
entrypoints the Job renderer and the charts call."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from deeprad.operator.render.jobs import (
    AGGREGATOR_COMMAND,
    OPERATOR_COMMAND,
    RUN_AS,
    TRAINER_COMMAND,
)

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"


def _instructions(name: str) -> list[tuple[str, str]]:
    text = (IMAGES / name / "Dockerfile").read_text().replace("\\\n", " ")
    lines = re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)  # comments start with #
    return [(m[1].upper(), m[2].strip()) for m in lines]


def _final_stage(name: str) -> list[tuple[str, str]]:
    steps = _instructions(name)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def _value(steps: list[tuple[str, str]], op: str) -> str:
    found = [arg for o, arg in steps if o == op]
    assert found, f"no {op}"
    return found[-1]


@pytest.mark.parametrize(("name", "entrypoint"), [
    ("operator", OPERATOR_COMMAND), ("aggregator", AGGREGATOR_COMMAND),
    ("trainer", TRAINER_COMMAND)])
def test_images_run_as_nonroot_with_the_rendered_entrypoint(name: str,
                                                            entrypoint: list[str]) -> None:
    final = _final_stage(name)
    user = _value(final, "USER")
    assert user == f"{RUN_AS}:{RUN_AS}"
    assert json.loads(_value(final, "ENTRYPOINT")) == entrypoint
    assert "/opt/deeprad/bin" in _value(final, "ENV")  # `python` from the venv
    assert [op for op, _ in final].index("USER") > max(
        i for i, (op, _) in enumerate(final) if op in {"RUN", "COPY"})  # nothing runs as root after


def test_trainer_is_cuda_based_and_tensorrt_is_the_gpu_extra() -> None:
    args = [arg for op, arg in _instructions("trainer") if op == "ARG"]
    assert any(a.startswith("CUDA_IMAGE=nvidia/cuda:") for a in args)
    assert _final_stage("trainer")[0] == ("FROM", "${CUDA_IMAGE}")
    text = (IMAGES / "trainer" / "Dockerfile").read_text()
    extras = tomllib.loads((ROOT / "trainer" / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert extras["gpu"] == ["torch-tensorrt"]
    assert "trainer[gpu]" in text


def test_chart_images_name_these_images() -> None:
    hub = yaml.safe_load((ROOT / "helm" / "deeprad" / "values.yaml").read_text())
    site = yaml.safe_load((ROOT / "helm" / "deeprad-site" / "values.yaml").read_text())
    assert hub["operator"]["image"]["repository"] == "ghcr.io/deeprad/operator"
    assert hub["aggregator"]["image"]["repository"] == "ghcr.io/deeprad/aggregator"
    assert site["agent"]["image"]["repository"] == hub["operator"]["image"]["repository"]
    assert site["training"]["image"]["repository"] == "ghcr.io/deeprad/trainer"
