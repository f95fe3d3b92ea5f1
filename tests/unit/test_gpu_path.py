"""The trainer's GPU options on the CPU: defaults change nothing, every option still trains,
batches are the same whichever way they are fed, and the CPU limit is read from the cgroup."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from deeprad.core.data import ImageSet
from deeprad.core.errors import ConfigError
from deeprad.core.models import build_model, model_weights
from deeprad.core.protocol import ModelSpec, TrainConfig
from deeprad.trainer import local_training as lt
from deeprad.trainer import train_epochs, train_site

CPU = torch.device("cpu")


def _data(n: int = 24, size: int = 16, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 2).float()
    x = torch.rand(n, 1, size, size, generator=g) * 0.5 + 0.5 * y[:, None, None, None]
    return ImageSet(x, y)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelSpec(kwargs={"channels": [4, 8]}))


def _reference_loop(model: nn.Module, data: ImageSet, cfg: TrainConfig) -> float:
    """The trainer's loop as it was before the GPU options: the CPU results must not move."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    total, batches = 0.0, 0
    for _ in range(cfg.local_epochs):
        order = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = loss_fn(model(data.images[idx]).flatten(), data.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            batches += 1
    return total / batches


def test_defaults_keep_cpu_training_bit_for_bit() -> None:
    cfg = TrainConfig(local_epochs=2, batch_size=8)
    assert (cfg.precision, cfg.channels_last, cfg.compile, cfg.deterministic) == (
        "auto", False, False, False)
    plan = lt.plan_execution(cfg, CPU)
    assert plan.precision == "fp32" and not plan.grad_scaler
    ours, ref = _model(), _model()
    loss = train_epochs(ours, _data(), cfg, CPU)
    assert loss == _reference_loop(ref, _data(), cfg)
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


@pytest.mark.parametrize("precision,dtype,scaler", [("bf16", torch.bfloat16, False),
                                                    ("fp16", torch.float16, True),
                                                    ("fp32", None, False)])
def test_each_precision_trains_on_the_cpu(precision: str, dtype: torch.dtype | None,
                                          scaler: bool) -> None:
    cfg = TrainConfig(local_epochs=2, batch_size=8, lr=0.01, device="cpu",
                      precision=precision)  # type: ignore[arg-type]
    plan = lt.plan_execution(cfg, CPU)
    assert plan.autocast_dtype == dtype and plan.grad_scaler == scaler
    spec = ModelSpec(kwargs={"channels": [4, 8]})
    torch.manual_seed(0)
    glob = model_weights(build_model(spec))
    out = train_site(spec, glob, _data(), _data(8, seed=1), cfg)
    assert all(torch.isfinite(d).all() and d.dtype == torch.float32 for d in out.delta.values())
    assert any(d.abs().sum() > 0 for d in out.delta.values())


def test_auto_precision_on_gpus_prefers_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert lt.resolve_precision("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    assert lt.resolve_precision("auto", cuda) == torch.float16
    with pytest.raises(ConfigError, match=r"Tesla V100 has no bfloat16 support; use 'fp16'"):
        lt.resolve_precision("bf16", cuda)
    assert lt.resolve_precision("auto", CPU) is None
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")  # type: ignore[arg-type]


def test_channels_last_trains_to_the_same_model() -> None:
    # SGD: Adam's first steps turn rounding noise in near-zero gradients into full-size steps.
    cfg = TrainConfig(local_epochs=1, batch_size=8, optimizer="sgd", lr=0.05)
    plain, nhwc = _model(), _model()
    train_epochs(plain, _data(), cfg, CPU)
    train_epochs(nhwc, _data(), cfg.model_copy(update={"channels_last": True}), CPU)
    for k, v in plain.state_dict().items():
        assert torch.allclose(nhwc.state_dict()[k], v, atol=1e-4), k
    weights = model_weights(nhwc)
    assert all(t.is_contiguous() for t in weights.values())  # checkpoints stay NCHW


def test_compile_goes_through_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[nn.Module] = []
    original = torch.compile

    def spy(model: nn.Module, **kw: object) -> object:
        calls.append(model)
        return original(model, backend="eager")  # the Dynamo path, without C++ builds

    monkeypatch.setattr(torch, "compile", spy)
    model = _model()
    loss = train_epochs(model, _data(), TrainConfig(local_epochs=1, batch_size=8, compile=True),
                        CPU)
    assert calls == [model] and loss > 0


def test_deterministic_mode_is_on_while_training_and_restored_after() -> None:
    seen: list[bool] = []
    model = _model()
    model.register_forward_hook(
        lambda *_: seen.append(torch.are_deterministic_algorithms_enabled()))
    before = torch.are_deterministic_algorithms_enabled()
    cfg = TrainConfig(local_epochs=1, batch_size=8, deterministic=True)
    loss_a = train_epochs(model, _data(), cfg, CPU)
    assert seen and all(seen)
    assert torch.are_deterministic_algorithms_enabled() == before
    assert loss_a == train_epochs(_model(), _data(), cfg, CPU)


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_feeder_modes_give_the_same_batches(channels_last: bool) -> None:
    data = _data(10)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    feeders = [lt.BatchFeeder(data, CPU, 4, channels_last, mode=m)
               for m in ("direct", "resident", "staged")]
    assert lt.BatchFeeder(data, CPU, 4).mode == "direct"  # CPUs keep the historical path
    for i in range(0, 10, 4):  # includes a short last batch
        batches = [f.batch(f.epoch_order(order)[i : i + 4]) for f in feeders]
        for x, y in batches[1:]:
            assert torch.equal(x, batches[0][0]) and torch.equal(y, batches[0][1])
            assert x.is_contiguous(memory_format=torch.channels_last) or not channels_last


def _cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_cpu_limit_reads_the_cgroup_quota(tmp_path: Path) -> None:
    import os

    cores = len(os.sched_getaffinity(0))
    assert lt.cpu_limit(_cgroup(tmp_path / "a", {"cpu.max": "max 100000\n"})) == cores
    assert lt.cpu_limit(_cgroup(tmp_path / "b", {"cpu.max": "150000 100000\n"})) == 1
    assert lt.cpu_limit(_cgroup(tmp_path / "c", {"cpu.max": "50000 100000\n"})) == 1
    v1 = {"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}
    assert lt.cpu_limit(_cgroup(tmp_path / "d", v1)) == 1
    v1_unlimited = {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}
    assert lt.cpu_limit(_cgroup(tmp_path / "e", v1_unlimited)) == cores
    assert lt.cpu_limit(tmp_path / "missing") == cores


def test_limit_threads_only_ever_lowers(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(lt, "cpu_limit", lambda: 1)
        assert lt.limit_threads() == 1
        monkeypatch.setattr(lt, "cpu_limit", lambda: 64)
        assert lt.limit_threads() == 1  # a caller's lower choice stands
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        lt.select_device("cuda")
    assert lt.select_device("auto") == CPU
