"""MONAI bundles as model packages: a deterministic archive and a content digest, refusals of
pickles, tampering and configs that would run code, a catalogue network exported and rebuilt
with the same weights, and the site policy's say over which bundle a study may run."""

from __future__ import annotations

import json
import os
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from deeprad.cli import main
from deeprad.core.bundle import (
    BUNDLES_ENV,
    WEIGHTS,
    BundleError,
    find_bundle,
    pack_bundle,
    read_bundle,
    verify_bundle,
)
from deeprad.core.errors import ConfigError, PolicyViolation
from deeprad.core.model_catalogue import model_digest
from deeprad.core.protocol import ModelSpec, TrainConfig, TrainingTask
from deeprad.core.site_policy import POLICY_ENV, SitePolicy, policy_json
from deeprad.trainer import site_checks

pytestmark = pytest.mark.unit

UNET = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1,
        "out_channels": 1, "channels": [4, 8], "strides": [2], "num_res_units": 0,
        "norm": "instance"}


def _metadata(fmt: str = "segmentation") -> dict[str, Any]:
    tensor = {"type": "image", "num_channels": 1, "spatial_shape": [16, 16, 16],
              "dtype": "float32"}
    return {"version": "0.1.0", "monai_version": "1.6.1", "pytorch_version": "2.15.0",
            "task": "test lesion segmentation", "description": "a tiny test bundle",
            "network_data_format": {"inputs": {"image": {**tensor, "format": "magnitude"}},
                                    "outputs": {"pred": {**tensor, "format": fmt}}}}


def _bundle(root: Path, network_def: dict[str, Any] | None = None,
            weights: bool = True) -> Path:
    """A small hand-written bundle folder (no torch needed to write it)."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "docs").mkdir()
    (root / "configs" / "metadata.json").write_text(json.dumps(_metadata()))
    (root / "configs" / "inference.json").write_text(json.dumps(
        {"network_def": network_def or UNET,
         "postprocessing": {"_target_": "Activationsd", "keys": "pred", "sigmoid": True}}))
    (root / "docs" / "README.md").write_text("# test bundle (synthetic)\n")
    if weights:
        save_file({"w": np.arange(4096, dtype=np.float32)}, str(root / WEIGHTS))
    return root


def _refusal(path: Path, digest: str | None = None) -> str:
    with pytest.raises(BundleError) as exc:
        verify_bundle(read_bundle(path), digest)
    text = str(exc.value)
    assert "\n" not in text
    return text


# ---- digest and archive -----------------------------------------------------------------------


def test_pack_is_deterministic_and_the_archive_has_the_folders_digest(tmp_path: Path) -> None:
    folder = _bundle(tmp_path / "tiny")
    first = pack_bundle(folder, tmp_path / "a.tar")
    for i, path in enumerate(sorted(folder.rglob("*"))):
        os.utime(path, (1_000_000 + i, 2_000_000 + 7 * i))  # other times, same content
    second = pack_bundle(folder, tmp_path / "b.tar")
    assert first == second == read_bundle(folder).digest == read_bundle(tmp_path / "a.tar").digest
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert {m.mtime for m in tar} == {0} and {m.uid for m in tar} == {0}
        sums = tar.extractfile("tiny/SHA256SUMS")
        assert sums is not None
        listing = sums.read().decode()
    # the digest is the sha256 of SHA256SUMS, which coreutils' `sha256sum -c` can check
    assert first == "sha256:" + __import__("hashlib").sha256(listing.encode()).hexdigest()
    assert "models/model.safetensors" in listing and "SHA256SUMS" not in listing


def test_a_flipped_byte_changes_the_digest_and_verify_names_the_file(tmp_path: Path) -> None:
    folder = _bundle(tmp_path / "tiny")
    digest = pack_bundle(folder, tmp_path / "b.tar")
    with tarfile.open(tmp_path / "b.tar") as tar:
        offset = tar.getmember("tiny/models/model.safetensors").offset_data
    data = bytearray((tmp_path / "b.tar").read_bytes())
    data[offset + 1000] ^= 0x01  # inside the tensor data: the header still parses
    (tmp_path / "b.tar").write_bytes(bytes(data))
    assert read_bundle(tmp_path / "b.tar").digest != digest
    said = _refusal(tmp_path / "b.tar")
    assert said.startswith("models/model.safetensors: sha256") and "changed after" in said
    # a folder carries no SHA256SUMS: the expected digest catches the change
    weights = folder / WEIGHTS
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0x01
    weights.write_bytes(bytes(raw))
    said = _refusal(folder, digest)
    assert f"is not the expected {digest}" in said


def test_symlinks_and_members_outside_the_bundle_are_refused(tmp_path: Path) -> None:
    folder = _bundle(tmp_path / "tiny")
    (tmp_path / "secret.txt").write_text("not part of the bundle")
    (folder / "docs" / "more.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(BundleError, match=r"docs/more.txt: a symlink"):
        read_bundle(folder)
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        tar.add(tmp_path / "secret.txt", arcname="../secret.txt")
    with pytest.raises(BundleError, match="points outside the bundle"):
        read_bundle(evil)


# ---- refusals ---------------------------------------------------------------------------------


def test_pickle_weights_are_refused_even_when_renamed(tmp_path: Path) -> None:
    folder = _bundle(tmp_path / "a")
    (folder / "models" / "model.pt").write_bytes(pickle.dumps({"w": [1.0]}, protocol=4))
    said = _refusal(folder)
    assert said.startswith("models/model.pt: a pickle-format file") and "safetensors" in said
    other = _bundle(tmp_path / "b", weights=False)
    (other / WEIGHTS).write_bytes(pickle.dumps({"w": [1.0]}, protocol=2))
    assert _refusal(other).startswith(f"{WEIGHTS}: not a safetensors file")


def test_code_and_unknown_files_are_refused(tmp_path: Path) -> None:
    folder = _bundle(tmp_path / "a")
    (folder / "scripts").mkdir()
    (folder / "scripts" / "net.py").write_text("import os\n")
    assert _refusal(folder).startswith("scripts/net.py: not part of a Deep-Rad bundle")
    other = _bundle(tmp_path / "b")
    (other / "configs" / "logging.conf").write_text("[handlers]\n")
    assert _refusal(other).startswith("configs/logging.conf: not part of a Deep-Rad bundle")


def test_missing_metadata_is_refused(tmp_path: Path) -> None:
    folder = _bundle(tmp_path / "a")
    (folder / "configs" / "metadata.json").unlink()
    assert "missing configs/metadata.json" in _refusal(folder)
    meta = _metadata()
    del meta["monai_version"]
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta))
    assert _refusal(folder) == ("configs/metadata.json: missing monai_version (MONAI metadata "
                                "schema); add it")


def test_attack_a_target_that_runs_a_shell_command_is_refused_and_never_run(
        tmp_path: Path) -> None:
    """Attack: a bundle whose network_def names `os.system` with a command. MONAI's
    ConfigParser would import and call it; Deep-Rad refuses it by name and never calls it:
    the file the command would create does not appear."""
    marker = tmp_path / "pwned"
    folder = _bundle(tmp_path / "evil", {"_target_": "os.system",
                                         "command": f"touch {marker}"})
    said = _refusal(folder)
    assert said.startswith("configs/inference.json: network_def._target_ 'os.system' is not "
                           "a MONAI network or transform; bundles may only instantiate")
    digest = read_bundle(folder).digest
    with pytest.raises(BundleError, match=r"os\.system"):
        _build(digest, folder)
    assert not marker.exists()


@pytest.mark.parametrize(("network_def", "says"), [
    ({**UNET, "act": "$__import__('os').system('touch pwned')"},
     "network_def.act \"$__import__('os').system('touch pwned')\": a `$` expression is "
     "Python code"),
    ({**UNET, "norm": "%configs/other.json::norm"}, "a `%` macro pulls text"),
    ({**UNET, "_mode_": "callable"}, "network_def._mode_ is a MONAI instantiation option"),
    ({"_target_": "DenseNet121", "spatial_dims": 2, "in_channels": 1, "out_channels": 1,
      "pretrained": True}, "network_def.pretrained True is not allowed for DenseNet121"),
    ({**UNET, "extra": {"_target_": "monai.transforms.Lambda", "func": "print"}},
     "network_def.extra._target_ 'monai.transforms.Lambda' is not a MONAI network"),
])
def test_attack_configs_that_would_run_code_are_refused(tmp_path: Path,
                                                        network_def: dict[str, Any],
                                                        says: str) -> None:
    """Attack: code smuggled past the target allowlist (expressions, macros, instantiation
    modes, downloads, a transform that calls whatever it is given)."""
    assert says in _refusal(_bundle(tmp_path / "evil", network_def))


# ---- build_model ------------------------------------------------------------------------------


def _build(digest: str, path: Path | None = None, task: str = "segmentation",
           allow_code: bool = True) -> Any:
    from deeprad.core.models import build_model

    kwargs: dict[str, Any] = {"digest": digest}
    if path is not None:
        kwargs["path"] = str(path)
    return build_model(ModelSpec(name="bundle", kwargs=kwargs, task=task),  # type: ignore[arg-type]
                       allow_code=allow_code)


@pytest.mark.parametrize(("name", "kwargs"), [("unet3d", {"in_channels": 2}),
                                              ("tumor-cnn", {"channels": [4, 8]}),
                                              ("dynunet3d", {})])  # shares tensors
def test_export_verify_build_round_trip_keeps_the_weights(tmp_path: Path, name: str,
                                                          kwargs: dict[str, Any]) -> None:
    import torch

    from deeprad.core.bundle_model import export_bundle
    from deeprad.core.model_catalogue import MODEL_TASKS
    from deeprad.core.models import build_model, model_weights

    spec = ModelSpec(name=name, kwargs=kwargs, task=MODEL_TASKS[name])  # type: ignore[arg-type]
    torch.manual_seed(7)
    trained = model_weights(build_model(spec))
    bundle = export_bundle(spec, tmp_path / name, weights=trained)
    digest = pack_bundle(tmp_path / name, tmp_path / f"{name}.tar")
    assert digest == bundle.digest
    rebuilt = _build(digest, tmp_path / f"{name}.tar", task=MODEL_TASKS[name])
    state = rebuilt.state_dict()
    assert state.keys() == trained.keys()
    assert all(torch.equal(state[k], trained[k]) for k in trained)


def test_a_job_finds_bundles_by_digest_in_the_sites_folder_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _bundle(tmp_path / "store" / "tiny", weights=False)
    digest = read_bundle(folder).digest
    with pytest.raises(ConfigError, match=r"kwargs\.path is for `deeprad simulate` only"):
        _build(digest, folder, allow_code=False)
    monkeypatch.setenv(BUNDLES_ENV, str(tmp_path / "store"))
    assert type(_build(digest, allow_code=False)).__name__ == "UNet"
    with pytest.raises(BundleError, match=f"bundle sha256:{'0' * 64}: not found in"):
        find_bundle("sha256:" + "0" * 64)
    with pytest.raises(ConfigError, match="a segmentation bundle but the study's task is "
                                          "classification"):
        _build(digest, task="classification", allow_code=False)


# ---- site policy ------------------------------------------------------------------------------


def _task(model: ModelSpec) -> TrainingTask:
    return TrainingTask(namespace="research", study="brain", round=1, site="a",
                        registry_json="{}", model=model,
                        train=TrainConfig(local_epochs=1, batch_size=2))


def test_a_bundle_runs_only_where_the_site_policy_lists_its_digest(tmp_path: Path) -> None:
    digest = read_bundle(_bundle(tmp_path / "tiny")).digest
    task = _task(ModelSpec(name="bundle", kwargs={"digest": digest}, task="segmentation"))
    env = {POLICY_ENV: policy_json(SitePolicy())}  # the catalogue only
    with pytest.raises(PolicyViolation) as refused:
        site_checks.check_task(task, env)
    said = str(refused.value)
    assert "\n" not in said
    assert said.startswith(f"PolicyViolation: policy.models: study research/brain round 1 "
                           f"asks for MONAI bundle '{digest}'")
    assert "add its digest (`deeprad bundle verify` prints it) to policy.models" in said
    # the digest of the spec that names the bundle is not the bundle's: no ambiguity
    spec_digest = model_digest("bundle", {"digest": digest})
    with pytest.raises(PolicyViolation):
        site_checks.check_task(task, {POLICY_ENV: policy_json(SitePolicy(models=[spec_digest]))})
    allowed = {POLICY_ENV: policy_json(SitePolicy(models=["unet3d", digest]))}
    assert site_checks.check_task(task, allowed) is not None


# ---- the command ------------------------------------------------------------------------------


def test_cli_pack_verify_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _bundle(tmp_path / "tiny")
    assert main(["bundle", "pack", str(folder), "-o", str(tmp_path / "t.tar")]) == 0
    digest = capsys.readouterr().out.strip().rsplit(" ", 1)[-1]
    assert digest == read_bundle(folder).digest
    assert main(["bundle", "verify", str(tmp_path / "t.tar"), "--digest", digest]) == 0
    assert capsys.readouterr().out.startswith(f"OK {tmp_path / 't.tar'}: {digest}")
    assert main(["bundle", "inspect", str(tmp_path / "t.tar")]) == 0
    shown = capsys.readouterr().out
    assert "network_def -> monai.networks.nets.UNet" in shown
    assert "weights  models/model.safetensors: 1 tensors, 4096 values" in shown
    assert "task     segmentation" in shown


def test_cli_refusals_are_one_line_with_exit_code_2(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    evil = _bundle(tmp_path / "evil", {"_target_": "os.system", "command": "true"})
    assert main(["bundle", "verify", str(evil)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("deeprad bundle: configs/inference.json: network_def._target_ "
                          "'os.system'")
    good = _bundle(tmp_path / "good")
    assert main(["bundle", "verify", str(good), "--digest", "sha256:" + "a" * 64]) == 2
    assert "is not the expected sha256:aaaa" in capsys.readouterr().err
    assert main(["bundle", "verify", str(tmp_path / "nowhere")]) == 2
    assert "no such bundle folder or archive" in capsys.readouterr().err
    assert main(["bundle", "pack", str(evil), "-o", str(tmp_path / "e.tar")]) == 2
    assert not (tmp_path / "e.tar").exists()


@pytest.mark.parametrize("name", ["segmentation", "classification", "segresnet3d",
                                  "dynunet3d", "tumor-jet"])
def test_each_task_and_network_exports_as_a_bundle_that_verifies(tmp_path: Path,
                                                                 name: str) -> None:
    """Export checks that the bundle's network_def builds the catalogue's parameters."""
    from deeprad.core.bundle_model import TASK_NETWORKS, export_bundle, network_from_bundle

    bundle = export_bundle(ModelSpec(name=name), tmp_path / name)
    verify_bundle(read_bundle(tmp_path / name), bundle.digest)
    if name in TASK_NETWORKS:
        assert bundle.task == name
    model = network_from_bundle(bundle)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert export_bundle(ModelSpec(name=name), tmp_path / "again").digest == bundle.digest


def test_every_allowlisted_target_is_a_monai_class_of_its_kind() -> None:
    """The allowlist names real classes: a MONAI rename must fail here, not at a hospital."""
    import importlib

    from torch import nn

    from deeprad.core.bundle import ALLOWED_TARGETS, target_class_name

    for module_name, names in ALLOWED_TARGETS.items():
        module = importlib.import_module(module_name)
        for name in names:
            cls = getattr(module, name)
            assert isinstance(cls, type), f"{module_name}.{name}"
            if module_name in ("monai.networks.nets", "monai.losses"):
                assert issubclass(cls, nn.Module), f"{module_name}.{name}"
            assert target_class_name(f"{module_name}.{name}") == name
    assert target_class_name("monai.networks.nets.unet.UNet") is None  # submodule paths: no
    assert target_class_name("os.system") is None


# ---- bounded reading --------------------------------------------------------------------------


def _peak_bytes(run: Any) -> int:
    """Peak Python memory while `run()` runs (it must raise BundleError or return)."""
    import tracemalloc

    tracemalloc.start()
    try:
        run()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def _refuse_reading(path: Path) -> tuple[str, int]:
    said: list[str] = []

    def run() -> None:
        with pytest.raises(BundleError) as exc:
            verify_bundle(read_bundle(path))
        said.append(str(exc.value))

    peak = _peak_bytes(run)
    assert "\n" not in said[0]
    return said[0], peak


def test_attack_a_compressed_archive_bomb_is_refused_before_it_is_unpacked(
        tmp_path: Path) -> None:
    """Attack: a few-kilobyte .tar.gz whose configs/metadata.json unpacks to 8 MB of JSON
    (memory grows with what is unpacked). Refused by its magic number; nothing is unpacked."""
    bomb = b"[" + b"0," * (4 << 20) + b"0]"
    info = tarfile.TarInfo("b/configs/metadata.json")
    info.size = len(bomb)
    with tarfile.open(tmp_path / "b.tar.gz", "w:gz") as tar:
        tar.addfile(info, __import__("io").BytesIO(bomb))
    assert (tmp_path / "b.tar.gz").stat().st_size < 64 << 10
    said, peak = _refuse_reading(tmp_path / "b.tar.gz")
    assert said.startswith(f"{tmp_path / 'b.tar.gz'}: a compressed archive; bundles are plain "
                           ".tar")
    assert peak < 1 << 20


def test_attack_oversized_files_are_refused_before_they_are_read(tmp_path: Path) -> None:
    """Attack: an 8 MiB config (the limit is 1 MiB), weights whose tar header claims 3 GiB, more
    members than a bundle holds. Each is refused from its stated size or count: the config's
    bytes are never held in memory."""
    from deeprad.core.bundle import MAX_CONFIG_BYTES, MAX_MEMBERS

    folder = _bundle(tmp_path / "big", weights=False)
    (folder / "configs" / "train.json").write_bytes(b" " * (8 << 20))
    said, peak = _refuse_reading(folder)
    assert said.startswith(f"configs/train.json: {8 << 20} bytes, over the "
                           f"{MAX_CONFIG_BYTES} byte limit for a config")
    assert peak < 2 << 20  # the hashing buffer only, not the file
    claims = tarfile.TarInfo("w/models/model.safetensors")
    claims.size = 3 << 30  # the header says 3 GiB; the archive holds a few bytes
    with tarfile.open(tmp_path / "w.tar", "w") as tar:
        tar.addfile(claims)
    said, _ = _refuse_reading(tmp_path / "w.tar")
    assert said.startswith(f"models/model.safetensors: {3 << 30} bytes, over the {2 << 30} "
                           "byte limit for weights")
    with tarfile.open(tmp_path / "many.tar", "w") as tar:
        for i in range(MAX_MEMBERS + 1):
            tar.addfile(tarfile.TarInfo(f"m/docs/{i}.md"))
    said, _ = _refuse_reading(tmp_path / "many.tar")
    assert said == (f"{tmp_path / 'many.tar'}: more than {MAX_MEMBERS} files and folders; a "
                    "bundle holds configs, weights and a few docs")


def test_verify_reads_only_the_safetensors_header(tmp_path: Path) -> None:
    """8 MB of weights are hashed as a stream and their header parsed alone (peak memory far
    below the file); a header that claims 1 GiB is refused without reading it."""
    folder = _bundle(tmp_path / "a", weights=False)
    save_file({"w": np.zeros(2 << 20, dtype=np.float32)}, str(folder / WEIGHTS))
    assert _peak_bytes(lambda: verify_bundle(read_bundle(folder))) < 4 << 20
    other = _bundle(tmp_path / "b", weights=False)
    (other / WEIGHTS).write_bytes((1 << 30).to_bytes(8, "little") + b"{}")
    said, peak = _refuse_reading(other)
    assert said.startswith(f"{WEIGHTS}: not a safetensors file (its header would be "
                           f"{1 << 30} bytes, over the {16 << 20} byte limit")
    assert peak < 2 << 20


def test_find_bundle_reads_only_the_listing_of_other_bundles(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A site folder of packed bundles: those whose SHA256SUMS hashes to another digest are
    skipped without reading their files."""
    import deeprad.core.bundle as bundle_module

    store = tmp_path / "store"
    store.mkdir()
    wanted = pack_bundle(_bundle(tmp_path / "want"), store / "b-want.tar")
    pack_bundle(_bundle(tmp_path / "other", {**UNET, "channels": [2, 4]}), store / "a-other.tar")
    read: list[str] = []
    real = bundle_module.read_bundle

    def spy(path: str | Path) -> Any:
        read.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(bundle_module, "read_bundle", spy)
    assert find_bundle(wanted, env={BUNDLES_ENV: str(store)}).digest == wanted
    assert read == ["b-want.tar"]


def _deep(depth: int) -> Any:
    node: Any = 1
    for _ in range(depth):
        node = [node]
    return node


def test_attack_deeply_nested_json_is_refused_in_one_line(tmp_path: Path) -> None:
    """Attack: configs nested deeper than Python's stack (a RecursionError traceback in the
    parser or in the recursive config walkers). Refused, naming the file."""
    from deeprad.core.bundle import INFERENCE, MAX_JSON_DEPTH, Bundle, check_config
    from deeprad.core.bundle_model import network_from_bundle

    folder = _bundle(tmp_path / "a")
    (folder / "configs" / "metadata.json").write_text("[" * 200_000)
    with pytest.raises(BundleError) as exc:
        read_bundle(folder)
    assert str(exc.value) == ("configs/metadata.json: not valid JSON (nested too deeply); fix "
                              "the file and pack again")
    (folder / "configs" / "metadata.json").write_text(json.dumps(_deep(MAX_JSON_DEPTH + 1)))
    with pytest.raises(BundleError, match=f"^configs/metadata.json: arrays and objects nest "
                                          f"more than {MAX_JSON_DEPTH} deep"):
        read_bundle(folder)
    with pytest.raises(BundleError, match=r"^configs/x\.json: arrays and objects nest"):
        check_config("configs/x.json", _deep(50_000))
    deep = Bundle(folder, (), {INFERENCE: {"network_def": {"layers": _deep(50_000)}}}, None)
    with pytest.raises(BundleError, match=f"^{INFERENCE}: arrays and objects nest"):
        network_from_bundle(deep)


def test_attack_weights_swapped_after_verification_are_refused_not_loaded(
        tmp_path: Path) -> None:
    """Attack: the weights file is replaced (or turned into a symlink to other weights) after
    `find_bundle` verified the digest and before the network loads them. The bytes loaded are
    checked against the verified listing, so the swap is refused and never loaded."""
    import safetensors.torch
    import torch

    from deeprad.core.bundle_model import bundle_weights, instantiate, network_from_bundle

    folder = _bundle(tmp_path / "a", weights=False)
    torch.manual_seed(0)
    reviewed = bundle_weights(instantiate(UNET, "network_def"))
    safetensors.torch.save_file(reviewed, str(folder / WEIGHTS))
    torch.manual_seed(1)
    safetensors.torch.save_file(bundle_weights(instantiate(UNET, "network_def")),
                                str(tmp_path / "other.safetensors"))
    digest = read_bundle(folder).digest
    bundle = find_bundle(digest, folder)
    state = network_from_bundle(bundle).state_dict()
    assert all(torch.equal(state[k], v) for k, v in reviewed.items())
    (folder / WEIGHTS).write_bytes((tmp_path / "other.safetensors").read_bytes())
    with pytest.raises(BundleError) as exc:
        network_from_bundle(bundle)
    assert str(exc.value) == (f"{WEIGHTS}: changed in {folder} since the bundle was read and "
                              "verified; restore the reviewed bundle and run again")
    (folder / WEIGHTS).unlink()
    (folder / WEIGHTS).symlink_to(tmp_path / "other.safetensors")
    with pytest.raises(BundleError, match=r"changed in .* since the bundle was read"):
        network_from_bundle(bundle)
