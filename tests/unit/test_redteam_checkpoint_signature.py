"""Red team: a checkpoint the hub did not sign, handed to `deeprad export` or `predict`.

The payload digest in a manifest proves only that payload and manifest agree: whoever can write
one can rewrite the other. Only the hub's signature over the manifest says the hub produced the
model. The attacker here hands a user a checkpoint that is unsigned, signed by another hub key
(a forged "hub" of the same name), or a genuine one whose payload was swapped with the digest
in the manifest updated to match. Both commands check the signature against a pinned hub key
(`--hub-key`, else the `keys/hub` folder a simulate run leaves beside its output) and refuse
with one line naming the fix; nothing is built, run or written. `--insecure-skip-signature`
goes on with a warning, still checking the digest.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from image_files import write_png
from redteam import refused

from deeprad.cli import main
from deeprad.core.checkpoint import sha256_bytes, write_checkpoint
from deeprad.core.identity import Identity
from deeprad.core.layout import StudyLayout
from deeprad.core.models import build_model, model_weights
from deeprad.core.protocol import ModelSpec
from deeprad.core.store.local import LocalStore
from deeprad.inference import checkpoint_file
from deeprad.inference.hub_key import RUN_HUB_KEYS

SPEC = ModelSpec(kwargs={"channels": [4, 8]})
SIZE = 16
FIX = ("pass --hub-key with the public key folder (or signing.pub) of the hub that produced "
       "it, or --insecure-skip-signature to use it unverified")


@dataclass(frozen=True)
class Run:
    """A simulate-like run folder: `final.json` + `final.safetensors`, the hub's key folder in
    `keys/hub`, images to predict on, and an empty `out/` where the commands write."""

    root: Path
    hub: Identity

    @property
    def manifest(self) -> Path:
        return self.root / "final.json"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def out(self) -> Path:
        return self.root / "out"


def _weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return model_weights(build_model(SPEC))


def _write_final(root: Path, signer: Identity | None, seed: int = 0) -> None:
    """Write a round-0 checkpoint the way the simulator does and copy it out as final.*."""
    store, layout = LocalStore(root / "store"), StudyLayout("local", "simulated-study")
    write_checkpoint(store, layout, {"study": "simulated-study", "round": 0, "producer": "test",
                                     "model": SPEC, "parent_sha256": None},
                     _weights(seed), hub=signer)
    shutil.copyfile(store.root / layout.global_weights(0), root / "final.safetensors")
    shutil.copyfile(store.root / layout.global_manifest(0), root / "final.json")


@pytest.fixture
def run(tmp_path: Path) -> Run:
    root = tmp_path / "run"
    hub = Identity.generate("hub", "hub")
    hub.save(root / RUN_HUB_KEYS)
    _write_final(root, hub)
    for i in range(2):
        write_png(root / "images" / f"img{i}.png",
                  (np.random.default_rng(i).random((SIZE, SIZE)) * 255).astype(np.uint8))
    (root / "out").mkdir()
    return Run(root, hub)


# ---- the attacks ------------------------------------------------------------------------------


def _unsigned(run: Run) -> None:
    manifest = json.loads(run.manifest.read_text())
    manifest["signature"] = None
    run.manifest.write_text(json.dumps(manifest))


def _foreign_hub(run: Run) -> None:
    """Signed by another key under the same hub name: an impostor hub."""
    _write_final(run.root, Identity.generate("hub", "hub"), seed=1)


def _swapped_payload(run: Run) -> None:
    """The genuine signed manifest, another payload, and the manifest's digest updated to it:
    exactly what a digest-only check lets through."""
    other = run.root / "other"
    _write_final(other, None, seed=2)
    payload = (other / "final.safetensors").read_bytes()
    (run.root / "final.safetensors").write_bytes(payload)
    manifest = json.loads(run.manifest.read_text())
    manifest["payload_sha256"] = sha256_bytes(payload)
    run.manifest.write_text(json.dumps(manifest))


ATTACKS: dict[str, tuple[str, Callable[[Run], None], str]] = {
    "unsigned": ("unsigned checkpoint (signature stripped)", _unsigned,
                 "the checkpoint carries no hub signature, so nothing says hub 'hub' ("),
    "foreign-hub": ("checkpoint signed by an impostor hub key", _foreign_hub,
                    "not signed by hub 'hub' ("),
    "swapped-payload": ("payload swapped, manifest digest updated to match", _swapped_payload,
                        "not signed by hub 'hub' ("),
}


def _args(command: str, run: Run, *extra: str) -> list[str]:
    if command == "export":
        return ["export", str(run.manifest), "--format", "torchscript", "--image-size",
                str(SIZE), "--output", str(run.out / "model.ts"), *extra]
    return ["predict", str(run.manifest), str(run.images), "--image-size", str(SIZE),
            "--output", str(run.out / "predictions.csv"), *extra]


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every network the inference tools build from a checkpoint: none may be built from a
    refused one."""
    calls: list[str] = []
    real = checkpoint_file.build_model

    def recording(spec: ModelSpec, *args: Any, **kwargs: Any) -> torch.nn.Module:
        calls.append(spec.name)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(checkpoint_file, "build_model", recording)
    return calls


@pytest.mark.parametrize("command", ["export", "predict"])
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_redteam_export_and_predict_refuse_a_checkpoint_the_hub_did_not_sign(
        run: Run, attack: str, command: str, built: list[str],
        capsys: pytest.CaptureFixture[str]) -> None:
    name, tamper, says = ATTACKS[attack]
    tamper(run)
    assert main(_args(command, run)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line
    assert err.startswith(f"deeprad {command}: {run.manifest}: "), err
    assert says in err and f"{run.root / RUN_HUB_KEYS}" in err, err
    assert err.endswith(f"refusing it: {FIX}"), err
    assert built == [], "a network was built from a refused checkpoint"
    assert list(run.out.iterdir()) == [], "something was written"
    refused(name, f"deeprad {command} (exit 2)", err)


@pytest.mark.parametrize("command", ["export", "predict"])
def test_redteam_a_checkpoint_with_no_hub_key_to_check_is_refused(
        run: Run, tmp_path: Path, command: str, built: list[str],
        capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint handed over alone (no key given, none beside it) is not trusted blindly."""
    alone = tmp_path / "inbox"
    alone.mkdir()
    for name in ("final.json", "final.safetensors"):
        shutil.copyfile(run.root / name, alone / name)
    args = [a.replace(str(run.manifest), str(alone / "final.json")) for a in _args(command, run)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"deeprad {command}: {alone / 'final.json'}: no hub key to check the "
                   f"checkpoint's signature against (none given, no keys/hub/ beside it as "
                   f"`deeprad simulate` leaves); {FIX}")
    assert built == [] and list(run.out.iterdir()) == []
    refused("checkpoint without any hub key to check it against", f"deeprad {command} (exit 2)",
            err)


def test_redteam_the_real_command_refuses_an_impostor_hub(run: Run) -> None:
    """The same through the installed command line, in its own process."""
    _foreign_hub(run)
    proc = subprocess.run([sys.executable, "-m", "deeprad.cli", *_args("export", run)],
                          capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "not signed by hub 'hub' (" in proc.stderr and FIX in proc.stderr
    assert list(run.out.iterdir()) == []
    refused("checkpoint signed by an impostor hub key", "deeprad export (exit 2, own process)",
            proc.stderr)


def test_redteam_a_pinned_key_beats_the_key_shipped_beside_a_checkpoint(
        run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An attacker who ships a checkpoint with its own keys/hub folder cannot pass a user's
    pinned --hub-key: the explicit key is the one checked."""
    pinned = tmp_path / "pinned-hub"
    pinned.mkdir()
    (pinned / "signing.pub").write_text(run.hub.public().signing_key + "\n")
    shutil.rmtree(run.root / RUN_HUB_KEYS)
    attacker = Identity.generate("hub", "hub")
    attacker.save(run.root / RUN_HUB_KEYS)
    _write_final(run.root, attacker, seed=3)
    assert main(_args("export", run, "--hub-key", str(pinned / "signing.pub"))) == 2
    err = capsys.readouterr().err.strip()
    assert f"not signed by hub 'hub' (signing key {run.hub.public().signing_key[:12]}…, " \
           f"from {pinned / 'signing.pub'})" in err, err
    assert list(run.out.iterdir()) == []
    refused("checkpoint shipped with its own hub key, user pins the real one",
            "deeprad export --hub-key (exit 2)", err)


# ---- what still works -------------------------------------------------------------------------


def test_a_simulate_run_exports_and_predicts_out_of_the_box(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """README: `deeprad export runs/demo/final.json` on the run that made it, no key flags."""
    from deeprad.simulate.baselines import Baselines
    from deeprad.simulate.config import SimulationConfig
    from deeprad.simulate.finish import finish
    from deeprad.simulate.study import set_up

    out = tmp_path / "demo"
    study = set_up(SimulationConfig(sites=2, rounds=1, samples_per_site=16,
                                    test_samples_per_site=8, image_size=SIZE, output=out,
                                    baselines=False))
    finish(study, [], Baselines(), "test", started=0.0)
    capsys.readouterr()
    assert main(["export", str(out / "final.json"), "--format", "torchscript", "--image-size",
                 str(SIZE)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["hub_signature"] == (f"hub 'hub' (signing key "
                                        f"{study.hub.public().signing_key[:12]}…, from "
                                        f"{out / 'keys' / 'hub'})")
    assert (out / "final.ts").is_file()
    images = tmp_path / "images"
    write_png(images / "a.png", np.zeros((SIZE, SIZE), np.uint8))
    assert main(["predict", str(out / "final.safetensors"), str(images), "--image-size",
                 str(SIZE)]) == 0
    assert "checkpoint signature: hub 'hub' (" in capsys.readouterr().err


@pytest.mark.parametrize("form", ["folder", "folder without role", "signing.pub"])
def test_hub_key_takes_the_public_folder_or_its_signing_pub(
        run: Run, tmp_path: Path, form: str, capsys: pytest.CaptureFixture[str]) -> None:
    public = tmp_path / "hub-public"
    public.mkdir()
    for name, text in run.hub.public_files().items():
        if not (name == "role" and form == "folder without role"):
            (public / name).write_text(text)
    key = public / "signing.pub" if form == "signing.pub" else public
    shutil.rmtree(run.root / RUN_HUB_KEYS)  # only the given key can vouch
    assert main(_args("export", run, "--hub-key", str(key))) == 0
    assert json.loads(capsys.readouterr().out)["hub_signature"] == (
        f"hub 'hub' (signing key {run.hub.public().signing_key[:12]}…, from {key})")


def test_insecure_skip_signature_goes_on_with_a_warning_and_still_checks_the_digest(
        run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    _unsigned(run)
    assert main(_args("predict", run, "--insecure-skip-signature")) == 0
    err = capsys.readouterr().err
    assert ("deeprad predict: WARNING: --insecure-skip-signature: nothing checks that the hub "
            f"produced {run.manifest}") in err
    assert "checkpoint signature: NOT checked (--insecure-skip-signature)" in err
    assert (run.out / "predictions.csv").is_file()
    payload = bytearray((run.root / "final.safetensors").read_bytes())
    payload[-5] ^= 0xFF
    (run.root / "final.safetensors").write_bytes(bytes(payload))
    assert main(_args("export", run, "--insecure-skip-signature")) == 2
    assert "does not match payload_sha256" in capsys.readouterr().err
    assert not (run.out / "model.ts").exists()


def test_a_key_and_the_skip_flag_contradict_each_other(
        run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_args("export", run, "--hub-key", str(run.root / RUN_HUB_KEYS),
                      "--insecure-skip-signature")) == 2
    assert "--hub-key and --insecure-skip-signature contradict each other" in \
        capsys.readouterr().err


def test_a_site_key_is_not_a_hub_key(run: Run, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    site = Identity.generate("st-marys", "site")
    site.save(tmp_path / "st-marys")
    assert main(_args("export", run, "--hub-key", str(tmp_path / "st-marys"))) == 2
    assert "holds a site's keys (st-marys), not the hub's" in capsys.readouterr().err
