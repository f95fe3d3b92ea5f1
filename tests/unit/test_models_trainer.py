"""Model registry and local training: deltas, FedProx, federated evaluation, the Job entrypoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from deeprad.core.checkpoint import read_checkpoint
from deeprad.core.data import ImageSet
from deeprad.core.errors import ConfigError, DataError
from deeprad.core.layout import StudyLayout
from deeprad.core.metrics import clinical_metrics, combine
from deeprad.core.model_catalogue import MODEL_TASKS, MODELS
from deeprad.core.models import FACTORIES, GaussianJet, build_model, model_weights
from deeprad.core.privacy import DPConfig
from deeprad.core.protocol import DatasetSpec, ModelSpec, TrainConfig, TrainingTask
from deeprad.trainer import train_epochs, train_site
from deeprad.trainer.job import run_training_task


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 1))


def test_registered_models_build_without_batchnorm() -> None:
    assert set(FACTORIES) == set(MODELS)  # every catalogue entry has a builder
    for name in MODELS:
        if MODEL_TASKS[name] == "segmentation":  # 3D, several sequences, a logit per voxel
            model = build_model(ModelSpec(name=name, task="segmentation",
                                          kwargs={"in_channels": 3}))
            out = model(torch.rand(2, 3, 16, 16, 16))
            assert out.shape == (2, 1, 16, 16, 16)
        else:
            model = build_model(ModelSpec(name=name))
            out = model(torch.rand(2, 1, 64, 64))
            assert out.shape == (2, 1)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    n = sum(p.numel() for p in build_model(ModelSpec(name="resnet18")).parameters())
    assert 11_000_000 < n < 11_300_000


def test_gaussian_jet_tells_a_bright_blob_from_a_bright_line() -> None:
    """Both Hessian eigenvalues are strongly negative at a blob's centre; on a ridge (the skull
    ring, locally) only the one across it is."""
    ax = torch.arange(32, dtype=torch.float32) - 16
    y, x = torch.meshgrid(ax, ax, indexing="ij")
    blob = torch.exp(-(x**2 + y**2) / (2 * 2.0**2))[None, None]
    line = torch.exp(-(x**2) / (2 * 2.0**2))[None, None].expand(1, 1, 32, 32)
    jet = GaussianJet(scales=(2.0,))
    low_b, high_b = jet(blob)[0, 2:, 16, 16].tolist()
    low_l, high_l = jet(line)[0, 2:, 16, 16].tolist()
    assert low_b < -0.2 and high_b == pytest.approx(low_b, rel=1e-2)
    assert low_l < -0.2 and abs(high_l) < 0.05 * abs(low_l)
    assert jet(blob)[0, 1, 16, 16] < 1e-3 < jet(blob)[0, 1, 16, 20]  # gradient: 0 at the top


def test_tumor_jet_trains_only_its_mixing_and_head() -> None:
    model = build_model(ModelSpec(name="tumor-jet"))
    assert sum(p.numel() for p in model.parameters()) == 209
    assert not any("jet" in k for k in model.state_dict())  # fixed filters: not in checkpoints
    x = torch.rand(3, 1, 64, 64)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    # the maps are standardised per image, so a scanner's gain changes nothing
    assert torch.allclose(model(x), model(3.0 * x), atol=5e-3)
    two = build_model(ModelSpec(name="tumor-jet", kwargs={"scales": [1, 2], "width": 4}))
    assert two(torch.rand(2, 1, 32, 32)).shape == (2, 1)
    with pytest.raises(ConfigError, match="scales must be positive"):
        build_model(ModelSpec(name="tumor-jet", kwargs={"scales": [0]}))


def test_bring_your_own_model_and_errors() -> None:
    model = build_model(ModelSpec(name=f"{__name__}:tiny_net"), allow_code=True)
    assert isinstance(model[1], nn.Linear)
    with pytest.raises(ConfigError, match=r"unknown model 'unet9000'.*tumor-cnn"):
        build_model(ModelSpec(name="unet9000"))
    with pytest.raises(ConfigError, match=r"cannot import 'no_such_pkg\.mod'"):
        build_model(ModelSpec(name="no_such_pkg.mod:f"), allow_code=True)
    with pytest.raises(ConfigError, match="has no 'missing'"):
        build_model(ModelSpec(name=f"{__name__}:missing"), allow_code=True)
    with pytest.raises(ConfigError, match="bad kwargs"):
        build_model(ModelSpec(name="tumor-cnn", kwargs={"depth": 3}))
    with pytest.raises(ConfigError, match=r"'unet3d' is a segmentation network.*task: "
                                          r"segmentation"):
        build_model(ModelSpec(name="unet3d"))


def test_clinical_metrics_by_hand() -> None:
    logits = torch.tensor([3.0, -2.0, 1.0, -1.0, 2.0])
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0])
    m = clinical_metrics(logits, labels)
    assert m.sensitivity == pytest.approx(2 / 3) and m.specificity == pytest.approx(1 / 2)
    assert m.accuracy == pytest.approx(3 / 5)
    # positive scores 3, -2, 2 vs negatives 1, -1: 4 of 6 pairs ranked right
    assert m.auroc == pytest.approx(4 / 6)
    both = combine([m, clinical_metrics(torch.tensor([5.0, -5.0]), torch.tensor([1.0, 0.0]))])
    assert both is not None and both.n == 7
    # pooled, not averaged: positives 3, -2, 2, 5 vs negatives 1, -1, -5 rank 10 of 12 pairs
    assert both.auroc == pytest.approx(10 / 12)
    assert both.sensitivity == pytest.approx(3 / 4) and both.specificity == pytest.approx(2 / 3)


def _data(n: int = 32, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 2).float()
    x = torch.rand(n, 1, 8, 8, generator=g) + y[:, None, None, None]
    return ImageSet(x, y)


def test_train_site_returns_delta_and_metrics() -> None:
    spec = ModelSpec(name=f"{__name__}:tiny_net")
    torch.manual_seed(0)
    glob = model_weights(build_model(spec, allow_code=True))  # this test's own factory
    out = train_site(spec, glob, _data(), _data(8, 1), TrainConfig(local_epochs=5, lr=0.05),
                     allow_model_code=True)
    assert set(out.delta) == set(glob) and out.num_samples == 32
    assert all(torch.isfinite(d).all() for d in out.delta.values())
    assert any(d.abs().sum() > 0 for d in out.delta.values())
    assert out.global_metrics is not None and out.local_metrics is not None
    assert out.local_metrics.loss < out.global_metrics.loss  # it learned


def test_fedprox_keeps_the_model_closer_to_the_global_one() -> None:
    spec = ModelSpec(name=f"{__name__}:tiny_net")
    torch.manual_seed(0)
    glob = model_weights(build_model(spec, allow_code=True))  # this test's own factory
    drift = {}
    for mu in (0.0, 10.0):
        cfg = TrainConfig(local_epochs=5, lr=0.05, optimizer="sgd", fedprox_mu=mu)
        out = train_site(spec, glob, _data(), _data(8, 1), cfg, allow_model_code=True)
        drift[mu] = sum(float(d.pow(2).sum()) for d in out.delta.values())
    assert drift[10.0] < 0.5 * drift[0.0]


def test_empty_training_set_is_refused() -> None:
    with pytest.raises(DataError, match="empty dataset"):
        train_epochs(tiny_net(), ImageSet(torch.zeros(0, 1, 8, 8), torch.zeros(0)),
                     TrainConfig(), torch.device("cpu"))


def _seed_store(study: Any) -> tuple[Any, StudyLayout]:
    torch.manual_seed(0)
    study.write_global(model_weights(build_model(ModelSpec())))
    return study.store, study.layout


def _task(study: Any, **kw: object) -> TrainingTask:
    return TrainingTask.model_validate({
        "namespace": "ns", "study": "study", "round": 1, "site": "st-marys",
        "dataset": DatasetSpec(options={"samples": 24}).model_dump(),
        "train": TrainConfig(local_epochs=1).model_dump(),
        "registry_json": study.keys.registry.to_json(),
        "identity_dir": str(study.keys.site_dirs["st-marys"]), **kw})


def test_trainer_job_writes_update_manifest_and_result(study: Any) -> None:
    store, layout = _seed_store(study)
    result = run_training_task(_task(study), store)
    _, parent = read_checkpoint(store, layout, 0)
    manifest = json.loads(store.get_text(layout.update_manifest(1, "st-marys")))
    assert manifest["parent_sha256"] == parent.payload_sha256
    assert manifest["payload_sha256"] == result.update_sha256
    assert manifest["signature"] and manifest["namespace"] == "ns"
    assert manifest["num_samples"] == result.num_samples == 19  # 24 minus the 20% validation split
    assert json.loads(store.get_text(layout.result(1, "st-marys")))["site"] == "st-marys"
    # encrypted at rest: the stored update is an envelope, not safetensors
    assert store.get_bytes(layout.update_payload(1, "st-marys"))[:5] == b"DRENV"


def test_trainer_refuses_a_tampered_global_model(study: Any) -> None:
    store, layout = _seed_store(study)
    path = Path(store.root) / layout.global_weights(0)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "deeprad.trainer", "--store", str(store.root),
                           "--task", _task(study).model_dump_json()],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "does not match the manifest" in proc.stderr
    assert not store.exists(layout.update_manifest(1, "st-marys"))


def test_trainer_refuses_another_sites_identity(study: Any) -> None:
    store, _ = _seed_store(study)
    with pytest.raises(ConfigError, match="mount site st-marys's key folder"):
        run_training_task(_task(study, identity_dir=str(study.keys.site_dirs["a"])), store)


def test_trainer_refuses_a_task_for_another_architecture(study: Any) -> None:
    store, _ = _seed_store(study)
    with pytest.raises(ConfigError, match="differs from the checkpoint's 'tumor-cnn'"):
        run_training_task(_task(study, model={"name": "densenet121"}), store)


def test_dp_sgd_reports_the_steps_it_took_and_leaves_the_model_clean() -> None:
    spec = ModelSpec(name="tumor-cnn", kwargs={"channels": [4, 8]})
    torch.manual_seed(0)
    glob = model_weights(build_model(spec))
    train = _data(40)
    cfg = TrainConfig(local_epochs=2, batch_size=10, seed=3)
    out = train_site(spec, glob, train, _data(8, 1), cfg,
                     dp=DPConfig(noise_multiplier=1.1, max_grad_norm=1.0))
    assert out.privacy is not None
    assert out.privacy.steps == 2 * 4 and out.privacy.sample_rate == pytest.approx(0.25)
    assert out.privacy.noise_multiplier == 1.1
    assert set(out.delta) == set(glob)  # no Opacus wrapper names leak into the update
    plain = train_site(spec, glob, train, _data(8, 1), cfg)
    assert plain.privacy is None
    assert any(not torch.equal(out.delta[k], plain.delta[k]) for k in glob)


def test_dp_sgd_refuses_fedprox() -> None:
    with pytest.raises(ConfigError, match="FedProx"):
        train_site(ModelSpec(), model_weights(build_model(ModelSpec())), _data(), _data(8, 1),
                   TrainConfig(fedprox_mu=0.1), dp=DPConfig(noise_multiplier=1, max_grad_norm=1))
