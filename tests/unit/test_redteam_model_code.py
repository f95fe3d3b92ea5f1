"""Red team: a model name that is an import path is code, and no Job runs it.

The attacker writes `model.name: subprocess:run` (or `os:system`, `builtins:exec`, a module the
image happens to ship) with kwargs that would run a command. The API refuses it at admission
(tests/integration/test_crds.py); here every process that builds a model refuses it too, even
when the name arrives inside a hub-signed checkpoint: the hub's prepare Job, the hospital's
trainer Job, `deeprad export` and `deeprad predict`. Each test proves the refusal message and
that nothing ran (the command would have created a marker file) and nothing was written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from redteam import refused

from deeprad.core.checkpoint import write_checkpoint
from deeprad.core.errors import ConfigError
from deeprad.core.models import build_model, model_weights
from deeprad.core.protocol import DatasetSpec, ModelSpec, PrepareTask, TrainConfig, TrainingTask

REFUSAL = "an import path is code"


def _attacks(marker: Path) -> list[tuple[str, ModelSpec]]:
    """(attack, the model spec that would create `marker` if it ever ran)."""
    return [
        ("model name subprocess:run", ModelSpec(
            name="subprocess:run", kwargs={"args": ["touch", str(marker)]})),
        ("model name os:system", ModelSpec(name="os:system", kwargs={"command":
                                                                     f"touch {marker}"})),
        ("model name builtins:exec", ModelSpec(name="builtins:exec", kwargs={
            "source": f"open({str(marker)!r}, 'w').close()"})),
        ("model name deeprad.cli:main (a module of the image)", ModelSpec(
            name="deeprad.cli:main", kwargs={"argv": ["keys", "generate", "--out", str(marker),
                                                      "--name", "x"]})),
    ]


ATTACK_IDS = ["subprocess-run", "os-system", "builtins-exec", "image-module"]


def _tiny_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return model_weights(build_model(ModelSpec()))


@pytest.mark.parametrize("index", range(4), ids=ATTACK_IDS)
def test_redteam_build_model_refuses_import_paths(tmp_path: Path, index: int) -> None:
    marker = tmp_path / "ran"
    attack, spec = _attacks(marker)[index]
    with pytest.raises(ConfigError, match=REFUSAL) as exc:
        build_model(spec)
    assert not marker.exists(), f"{attack}: the command ran"
    refused(attack, "build_model (every Job)", str(exc.value))


def _job(module: str, store: Path, task: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, "--store", str(store),
                           "--task", task.model_dump_json()],
                          capture_output=True, text=True, check=False, timeout=300)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("index", range(4), ids=ATTACK_IDS)
def test_redteam_hub_prepare_job_runs_no_model_code(study: Any, index: int) -> None:
    """The study's model reaches the hub's prepare Job, which holds the hub's private keys and
    the store credentials: it must not be code."""
    marker = study.store.root.parent / "ran"
    attack, spec = _attacks(marker)[index]
    task = PrepareTask(namespace="ns", study="study", round=0, model=spec,
                       registry_json=study.keys.registry.to_json(),
                       identity_dir=str(study.keys.hub_dir))
    before = _files(study.store.root)
    proc = _job("deeprad.aggregator.prepare", study.store.root, task)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert REFUSAL in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists(), f"{attack}: the command ran in the prepare Job"
    assert _files(study.store.root) == before, "the prepare Job wrote to the store"
    refused(attack, "hub prepare Job (exit 2)", proc.stderr)


@pytest.mark.parametrize("index", range(4), ids=ATTACK_IDS)
def test_redteam_trainer_refuses_a_signed_checkpoint_naming_code(study: Any,
                                                                 index: int) -> None:
    """Even a checkpoint the hub signed (a compromised hub) cannot make a hospital run code:
    the trainer builds the network the checkpoint names, and refuses an import path."""
    marker = study.store.root.parent / "ran"
    attack, spec = _attacks(marker)[index]
    study.write_global(_tiny_weights(), model=spec)
    task = TrainingTask.model_validate({
        "namespace": "ns", "study": "study", "round": 1, "site": "st-marys", "model": spec,
        "dataset": DatasetSpec(options={"samples": 12}).model_dump(),
        "train": TrainConfig(local_epochs=1).model_dump(),
        "registry_json": study.keys.registry.to_json(),
        "identity_dir": str(study.keys.site_dirs["st-marys"])})
    before = _files(study.store.root)
    proc = _job("deeprad.trainer", study.store.root, task)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert REFUSAL in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists(), f"{attack}: the command ran at the hospital"
    assert _files(study.store.root) == before, "the trainer wrote an update"
    refused(attack, "hospital trainer Job (exit 2)", proc.stderr)


@pytest.mark.parametrize("command", ["export", "predict"])
def test_redteam_export_and_predict_refuse_a_checkpoint_naming_code(study: Any, tmp_path: Path,
                                                                    command: str) -> None:
    """A checkpoint handed to a user (its payload digest intact) whose manifest names code."""
    marker = tmp_path / "ran"
    attack, spec = _attacks(marker)[0]
    write_checkpoint(study.store, study.layout,
                     {"study": "study", "round": 1, "producer": "attacker", "model": spec,
                      "parent_sha256": None}, _tiny_weights(), hub=study.hub)
    manifest = study.store.root / study.layout.global_manifest(1)
    assert json.loads(manifest.read_text())["model"]["name"] == "subprocess:run"
    out = tmp_path / "out"
    out.mkdir()
    args = (["export", str(manifest), "--format", "torchscript", "--output", str(out / "m.pt")]
            if command == "export" else ["predict", str(manifest), str(tmp_path)])
    proc = subprocess.run([sys.executable, "-m", "deeprad.cli", *args], capture_output=True,
                          text=True, check=False, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert REFUSAL in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists(), f"{attack}: deeprad {command} ran the command"
    assert not any(out.iterdir()), f"deeprad {command} wrote {list(out.iterdir())}"
    refused(f"{attack} in a checkpoint manifest", f"deeprad {command} (exit 2)", proc.stderr)


def test_simulate_still_runs_your_own_factory_on_your_own_machine() -> None:
    """The one place an import path is code you asked for: `deeprad simulate --model`."""
    model = build_model(ModelSpec(name="torch.nn:Identity"), allow_code=True)
    assert isinstance(model, torch.nn.Identity)
