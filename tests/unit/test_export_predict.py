"""`deeprad export` and `deeprad predict`: exports reproduce PyTorch, predictions on DICOM,
NIfTI and PNG match the in-process model, tampered checkpoints and missing backends are
refused with clear messages, thresholds are calibrated, saliency maps are written."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from image_files import WRITERS
from PIL import Image

from deeprad.cli.inference import register
from deeprad.core.checkpoint import write_checkpoint
from deeprad.core.data.loaders import read_image
from deeprad.core.data.phantoms import ScannerProfile, generate_phantoms
from deeprad.core.errors import CheckpointError, ConfigError, DataError, DeepRadError
from deeprad.core.identity import Identity
from deeprad.core.layout import StudyLayout
from deeprad.core.models import build_model, model_weights
from deeprad.core.protocol import ModelSpec
from deeprad.core.store.local import LocalStore
from deeprad.inference import export as export_mod
from deeprad.inference.errors import ExportMismatch, MissingBackend
from deeprad.inference.export import export_checkpoint
from deeprad.inference.predict import predict_paths
from deeprad.inference.runtimes import open_runner
from deeprad.inference.thresholds import threshold_for_sensitivity

SIZE = 32
SPEC = ModelSpec(kwargs={"channels": [4, 8]})


# ---- fixtures: a checkpoint and images in every format ------------------------------------




def write_images(root: Path, n: int, seed: int, by_class: bool = False) -> list[Path]:
    """Phantom slices as PNG, DICOM and NIfTI in turn (class sub-folders if `by_class`)."""
    data = generate_phantoms(n, ScannerProfile(), SIZE, seed)
    paths = []
    suffixes = list(WRITERS)
    for i, (img, lab) in enumerate(zip(data.images, data.labels, strict=True)):
        folder = root / ("tumor" if lab else "normal") if by_class else root
        folder.mkdir(parents=True, exist_ok=True)
        suffix = suffixes[i % len(suffixes)]
        path = folder / f"img{i:02d}{suffix}"
        WRITERS[suffix](path, (img[0].numpy() * 255).astype(np.uint8))
        paths.append(path)
    return paths


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A round-0 checkpoint written the way the simulator writes one: its global.json, signed
    by the run's hub, whose key folder lies in the run's keys/hub."""
    store, layout = LocalStore(tmp_path / "store"), StudyLayout("ns", "study")
    hub = Identity.generate("hub", "hub")
    hub.save(tmp_path / "keys" / "hub")
    torch.manual_seed(0)
    write_checkpoint(store, layout, {"study": "study", "round": 0, "producer": "test",
                                     "model": SPEC, "parent_sha256": None},
                     model_weights(build_model(SPEC)), hub=hub)
    return store.root / layout.global_manifest(0)


@pytest.fixture
def final_pair(checkpoint: Path, tmp_path: Path) -> Path:
    """The `final.safetensors` + `final.json` pair `deeprad simulate` leaves."""
    shutil.copyfile(checkpoint.with_suffix(".safetensors"), tmp_path / "final.safetensors")
    shutil.copyfile(checkpoint, tmp_path / "final.json")
    return tmp_path / "final.safetensors"


def _in_process(checkpoint: Path, files: list[Path]) -> dict[str, float]:
    model = build_model(SPEC)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(checkpoint.with_suffix(".safetensors"))))
    model.eval()
    with torch.no_grad():
        return {str(f): float(torch.sigmoid(model(read_image(f, SIZE)[None]))[0, 0])
                for f in files}


def _tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="deeprad")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


# ---- export -------------------------------------------------------------------------------


def test_onnx_export_matches_pytorch(final_pair: Path, tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    result = export_checkpoint(final_pair, "onnx", image_size=SIZE)
    assert result.path == tmp_path / "final.onnx" and result.path.is_file()
    assert result.max_abs_diff < 1e-4 and "onnxruntime" in result.checked_with
    meta = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert meta["deeprad.image_size"] == str(SIZE)
    assert json.loads(meta["deeprad.model"])["name"] == "tumor-cnn"
    # Independently of the export's own check: a batch size it never saw.
    files = write_images(tmp_path / "imgs", 5, seed=3)
    batch = torch.stack([read_image(f, SIZE) for f in files])
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = torch.sigmoid(torch.from_numpy(sess.run(None, {"image": batch.numpy()})[0])).flatten()
    expected = torch.tensor(list(_in_process(final_pair, files).values()))
    assert torch.allclose(got, expected, atol=1e-5)


def test_torchscript_export_and_cli(checkpoint: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "exports" / "model.ts"
    assert _cli(["export", str(checkpoint), "--format", "torchscript", "--output", str(out),
                 "--image-size", str(SIZE)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["output"] == str(out) and printed["max_abs_logit_diff"] < 1e-4
    assert out.is_file() and not list(out.parent.glob(".part-*"))


def test_an_export_that_does_not_match_is_not_written(
        final_pair: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # an export that lost the model: onnxruntime answers 5.0 whatever the image
    monkeypatch.setattr(export_mod.OnnxRunner, "logits", lambda self, x: torch.full((len(x),), 5.0))
    with pytest.raises(ExportMismatch, match="differs from the PyTorch model"):
        export_checkpoint(final_pair, "onnx", image_size=SIZE)
    assert not list(final_pair.parent.glob("*.onnx")) and not list(
        final_pair.parent.glob(".part-*"))


def test_tampered_checkpoint_is_refused_by_export_and_predict(final_pair: Path,
                                                              tmp_path: Path) -> None:
    files = write_images(tmp_path / "imgs", 2, seed=1)
    _tamper(final_pair)
    for call in (lambda: export_checkpoint(final_pair, "onnx", image_size=SIZE),
                 lambda: predict_paths(final_pair, files),
                 lambda: _cli(["predict", str(final_pair.with_suffix(".json")), *map(str, files)])):
        with pytest.raises(CheckpointError, match=r"final\.safetensors: sha256 .* does not match"
                                                  r" payload_sha256 .* refusing"):
            call()
    assert not (tmp_path / "final.onnx").exists()


def test_checkpoint_file_errors_name_the_file(tmp_path: Path, final_pair: Path) -> None:
    (tmp_path / "final.json").unlink()
    with pytest.raises(CheckpointError, match=r"manifest .*final\.json does not exist"):
        export_checkpoint(final_pair, "onnx")
    (tmp_path / "final.json").write_text('{"kind": "update"}')
    with pytest.raises(CheckpointError, match=r"final\.json: not a Deep-Rad checkpoint manifest"):
        export_checkpoint(final_pair, "onnx")
    with pytest.raises(ConfigError, match=r"model\.bin: a checkpoint is a manifest"):
        export_checkpoint(tmp_path / "model.bin", "onnx")
    with pytest.raises(ConfigError, match=r"model\.h5: unknown kind"):
        (tmp_path / "model.h5").write_bytes(b"x")
        open_runner(tmp_path / "model.h5")


# ---- missing optional backends ------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_tensorrt_without_a_gpu_is_a_clear_message(checkpoint: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(MissingBackend, match=r"TensorRT export needs an NVIDIA GPU.*--format onnx"):
        _cli(["export", str(checkpoint), "--format", "tensorrt"])


def test_tensorrt_without_torch_tensorrt_is_a_clear_message(
        checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)
    with pytest.raises(MissingBackend, match=r"needs torch-tensorrt: pip install 'deeprad\[gpu\]'"):
        export_checkpoint(checkpoint, "tensorrt", image_size=SIZE)


def test_missing_onnx_packages_are_a_clear_message(
        final_pair: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    onnx_file = export_checkpoint(final_pair, "onnx", image_size=SIZE).path
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(MissingBackend, match=r"needs the onnx package.*deeprad\[export\]"):
        export_checkpoint(final_pair, "onnx", output=onnx_file.with_name("again.onnx"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingBackend, match=r"needs onnxruntime.*deeprad\[export\]"):
        open_runner(onnx_file)
    assert issubclass(MissingBackend, DeepRadError)  # the main CLI exits 2 with the message


# ---- predict ------------------------------------------------------------------------------


def test_predict_matches_the_in_process_model_for_every_format_and_runtime(
        final_pair: Path, tmp_path: Path) -> None:
    files = write_images(tmp_path / "imgs", 9, seed=2)
    assert {f.name.split(".", 1)[1] for f in files} == {"png", "dcm", "nii.gz"}
    expected = _in_process(final_pair, files)
    models = [final_pair, final_pair.with_suffix(".json"),
              export_checkpoint(final_pair, "onnx", image_size=SIZE).path,
              export_checkpoint(final_pair, "torchscript", image_size=SIZE).path]
    for model in models:
        # On the CPU, like the reference: GPU convolutions may use TF32.
        report = predict_paths(model, [tmp_path / "imgs"], image_size=None if model.suffix in (
            ".onnx", ".ts") else SIZE, batch_size=4, device="cpu")
        assert report.image_size == SIZE and report.threshold == 0.5
        got = {p.path: p.probability for p in report.predictions}
        assert got.keys() == expected.keys(), model
        for path, prob in got.items():
            assert prob == pytest.approx(expected[path], abs=1e-5), (model, path)
        assert all(p.label == int(p.probability >= 0.5) for p in report.predictions)


def test_predict_cli_writes_csv_and_json(checkpoint: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    files = write_images(tmp_path / "imgs", 3, seed=4)
    assert _cli(["predict", str(checkpoint), str(tmp_path / "imgs"), "--image-size", str(SIZE),
                 "--threshold", "0.0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "path,probability,label" and len(lines) == 4
    assert all(line.endswith(",1") for line in lines[1:])  # threshold 0 flags everything
    out = tmp_path / "pred.json"
    assert _cli(["predict", str(checkpoint), *map(str, files), "--image-size", str(SIZE),
                 "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["threshold_source"] == "default" and len(report["predictions"]) == 3
    assert "3 images" in capsys.readouterr().err


def test_exported_models_keep_their_image_size(final_pair: Path, tmp_path: Path) -> None:
    onnx_file = export_checkpoint(final_pair, "onnx", image_size=SIZE).path
    files = write_images(tmp_path / "imgs", 2, seed=5)
    with pytest.raises(ConfigError, match=r"exported for 32-pixel images.*--image-size 64"):
        predict_paths(onnx_file, files, image_size=64)
    with pytest.raises(DataError, match="no images"):
        predict_paths(onnx_file, [tmp_path / "store" / "ns"])


def test_threshold_for_a_target_sensitivity_by_hand() -> None:
    probs = torch.tensor([0.9, 0.8, 0.35, 0.2, 0.7, 0.4, 0.1, 0.05])
    labels = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    c = threshold_for_sensitivity(probs, labels, 0.75)  # 3 of 4 tumours: the 3rd-highest, 0.35
    assert c.threshold == pytest.approx(0.35)
    assert c.sensitivity == 0.75 and c.specificity == 0.5  # 0.7 and 0.4 are flagged
    assert threshold_for_sensitivity(probs, labels, 1.0).threshold == pytest.approx(0.2)
    assert threshold_for_sensitivity(probs, labels, 0.2).threshold == pytest.approx(0.9)
    with pytest.raises(DataError, match="no tumour"):
        threshold_for_sensitivity(probs, torch.zeros(8), 0.9)
    with pytest.raises(ConfigError, match="target-sensitivity"):
        threshold_for_sensitivity(probs, labels, 1.5)


def test_predict_calibrates_on_a_labelled_folder(final_pair: Path, tmp_path: Path) -> None:
    write_images(tmp_path / "val", 12, seed=6, by_class=True)
    files = write_images(tmp_path / "imgs", 3, seed=7)
    report = predict_paths(final_pair, files, image_size=SIZE, calibrate_folder=tmp_path / "val",
                           target_sensitivity=0.9)
    c = report.calibration
    assert c is not None and report.threshold_source == "calibrated"
    assert report.threshold == c.threshold and c.sensitivity >= 0.9 and c.n == 12
    assert all(p.label == int(p.probability >= c.threshold) for p in report.predictions)
    with pytest.raises(ConfigError, match="either --threshold or --calibrate"):
        predict_paths(final_pair, files, threshold=0.3, calibrate_folder=tmp_path / "val")


def test_saliency_png_needs_the_checkpoint(final_pair: Path, tmp_path: Path) -> None:
    files = write_images(tmp_path / "imgs", 2, seed=8)
    png = tmp_path / "cam" / "saliency.png"
    assert _cli(["predict", str(final_pair), str(files[0]), "--image-size", str(SIZE),
                 "--saliency", str(files[1]), "--saliency-out", str(png)]) == 0
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width == 2 * img.height >= 256
        pixels = np.asarray(img.convert("RGB"))
    assert pixels[:, img.width // 2 :].std() > 0  # the heat-map half is not blank
    onnx_file = export_checkpoint(final_pair, "onnx", image_size=SIZE).path
    with pytest.raises(ConfigError, match=r"--saliency needs the PyTorch model.*final\.onnx is "
                                          r"an exported onnx file"):
        _cli(["predict", str(onnx_file), str(files[0]), "--saliency", str(files[1]),
              "--saliency-out", str(png.with_name("x.png"))])
    with pytest.raises(ConfigError, match="not a module of the model"):
        _cli(["predict", str(final_pair), "--image-size", str(SIZE), "--saliency",
              str(files[1]), "--saliency-out", str(png), "--saliency-layer", "nope"])


def test_inference_imports_only_the_core() -> None:
    import ast

    root = Path(__file__).resolve().parents[2] / "cli" / "src" / "deeprad" / "inference"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = [n for n in names if n.startswith("deeprad.")
                   and not n.startswith(("deeprad.core", "deeprad.inference"))]
            assert not bad, f"{path.name} imports {bad}"
