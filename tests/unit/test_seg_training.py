"""Local training of a 3D segmentation network on tiny synthetic volumes (a bright cube in
noise): it learns, it reports Dice/HD95/lesion metrics, DP-SGD treats a volume as the record,
and larger volumes are scored by sliding windows."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from deeprad.core.data import ImageSet, VolumeSet
from deeprad.core.errors import ConfigError, DataError
from deeprad.core.models import build_model, model_weights
from deeprad.core.privacy import DPConfig
from deeprad.core.protocol import ModelSpec, TrainConfig
from deeprad.trainer import evaluate, train_site
from deeprad.trainer.segmentation import segmentation_loss

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Networks this small train fastest on one thread, also on a busy CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

SPEC = ModelSpec(name="unet3d", task="segmentation", kwargs={"in_channels": 2})
CPU = torch.device("cpu")


def cubes(n: int, seed: int, edge: int = 16) -> VolumeSet:
    """Synthetic: two noisy sequences, a 5-voxel cube brighter in both; every fourth scan
    healthy."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, 1, edge, edge, edge, dtype=torch.uint8)
    for i in range(n):
        if i % 4 != 3:
            d, h, w = torch.randint(1, edge - 6, (3,), generator=g).tolist()
            masks[i, 0, d : d + 5, h : h + 5, w : w + 5] = 1
    images = 0.3 * torch.rand(n, 2, edge, edge, edge, generator=g) + 0.6 * masks
    return VolumeSet(images, masks, tuple(f"synthetic-{seed}-{i}" for i in range(n)),
                     spacing=(2.0, 2.0, 2.0), channels=("t1", "flair"))


def _global() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return model_weights(build_model(SPEC))


def test_training_on_volumes_raises_dice_and_reports_segmentation_metrics() -> None:
    out = train_site(SPEC, _global(), cubes(8, 0), cubes(4, 1),
                     TrainConfig(local_epochs=8, batch_size=2, lr=1e-2))
    before, after = out.global_metrics, out.local_metrics
    assert before is not None and after is not None
    assert after.loss < before.loss
    assert before.dice is not None and after.dice is not None
    assert after.dice > 0.6 > before.dice
    assert after.n == 4 and after.positives == 3
    assert after.hd95 is not None and after.hd95_cases >= 1
    assert after.lesions is not None and after.lesions.lesions == 3
    assert after.lesion_sensitivity is not None and after.lesion_sensitivity["1"] == 1.0
    assert after.histogram is not None and sum(after.histogram.positives) == 3
    assert set(out.delta) == set(_global())


def test_dp_sgd_on_volumes_counts_steps_and_clips_per_volume() -> None:
    # seed 1 draws an empty Poisson batch: it must still take a (noise-only) step
    cfg = TrainConfig(local_epochs=2, batch_size=2, lr=1e-2, seed=1)
    out = train_site(SPEC, _global(), cubes(8, 0), cubes(4, 1), cfg,
                     dp=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    assert out.privacy is not None
    assert out.privacy.steps == 2 * 4 and out.privacy.sample_rate == pytest.approx(0.25)
    assert set(out.delta) == set(_global())  # no Opacus wrapper names leak into the update


def test_dp_sgd_refuses_patients_with_several_scans() -> None:
    """A record is a scan: a patient with two follow-ups would be two records, and ε would
    bound what a scan reveals, not a patient. Refused before any step, naming the patient."""
    data = cubes(4, 0)
    twice = VolumeSet(data.images, data.masks, ("p1", "p1", "p2", "p3"), data.spacing)
    with pytest.raises(ConfigError, match=r"patient\(s\) p1 have several scans"):
        train_site(SPEC, _global(), twice, cubes(2, 1), TrainConfig(batch_size=2),
                   dp=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    # one scan per patient trains
    once = VolumeSet(data.images, data.masks, ("p1", "p2", "p3", "p4"), data.spacing)
    out = train_site(SPEC, _global(), once, cubes(2, 1), TrainConfig(batch_size=2),
                     dp=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    assert out.privacy is not None and out.privacy.steps > 0


def test_segmentation_loss_of_a_batch_is_the_mean_of_per_volume_losses() -> None:
    """What DP-SGD relies on: a volume's gradient depends on that volume only."""
    torch.manual_seed(0)
    model = build_model(SPEC)
    data = cubes(3, 2)
    loss_fn = segmentation_loss()
    y = data.masks.float()
    batch = loss_fn(model(data.images), y)
    each = [loss_fn(model(data.images[i : i + 1]), y[i : i + 1]) for i in range(3)]
    assert float(batch) == pytest.approx(sum(float(v) for v in each) / 3, rel=1e-5)


def test_ordinary_training_takes_dice_over_the_batch_and_dp_sgd_per_volume() -> None:
    """Ordinary training pools the batch's voxels for Dice (steadier on tiny lesions and
    healthy scans); DP-SGD keeps a volume's loss its own."""
    from deeprad.trainer.local_training import _loss_function

    data = cubes(4, 3)
    assert data.labels.tolist() == [True, True, True, False]
    y = data.masks.float()
    # Lesions found exactly; the healthy scan lit up everywhere: a bad volume among good ones
    # costs a quarter of the loss per volume, but dominates the batch's pooled voxels.
    logits = 8.0 * (2 * y - 1)
    logits[3] = 8.0
    pooled = float(segmentation_loss(per_volume=False)(logits, y))
    per_volume = float(segmentation_loss()(logits, y))
    assert float(_loss_function(data)(logits, y)) == pytest.approx(pooled)
    assert float(_loss_function(data, per_record=True)(logits, y)) == pytest.approx(per_volume)
    assert pooled > per_volume + 0.3


class _FixedInput(nn.Module):
    """A network that accepts only its training patch size, as a network with a fixed input
    does; scoring a larger volume must therefore go window by window."""

    def __init__(self, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.conv = nn.Conv3d(2, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != (self.patch,) * 3:
            raise ValueError(f"input {tuple(x.shape)} is not a {self.patch}^3 patch")
        out: torch.Tensor = self.conv(x)
        return out


def test_volumes_larger_than_the_training_patch_are_scored_by_sliding_windows() -> None:
    model = _FixedInput(16)
    big = cubes(2, 3, edge=24)
    with pytest.raises(ValueError, match="not a 16"):
        evaluate(model, big, CPU)  # without the patch size: one forward pass
    metrics = evaluate(model, big, CPU, roi_size=(16, 16, 16))
    assert metrics is not None and metrics.n == 2 and metrics.dice is not None


def test_train_and_validation_data_of_different_kinds_are_refused() -> None:
    images = ImageSet(torch.rand(4, 1, 8, 8), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(DataError, match="one dataset kind per site"):
        train_site(SPEC, _global(), cubes(4, 0), images, TrainConfig())


@pytest.mark.parametrize("name", ["segresnet3d", "dynunet3d"])
def test_dp_sgd_refuses_segmentation_networks_opacus_cannot_differentiate_per_record(
        name: str) -> None:
    spec = ModelSpec(name=name, task="segmentation", kwargs={"in_channels": 2})
    weights = model_weights(build_model(spec))
    with pytest.raises(ConfigError, match=r"DP-SGD: MONAI .*; use unet3d"):
        train_site(spec, weights, cubes(4, 0), cubes(2, 1), TrainConfig(batch_size=2),
                   dp=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0))


def test_patches_are_cut_from_image_and_mask_alike_and_centred_on_lesions_as_asked() -> None:
    """Foreground oversampling: with `foreground` 1 every patch of a scan with a lesion holds
    lesion voxels; image and mask come from the same box; a healthy scan gets a random patch;
    the same seed cuts the same patches."""
    from deeprad.trainer.segmentation import PatchSampler

    data = cubes(8, 4, edge=24)  # 5-voxel cubes: 0.9% of a 24^3 scan
    x, y = PatchSampler(8, foreground=1.0, seed=0)(data.images, data.masks)
    assert x.shape == (8, 2, 8, 8, 8) and y.shape == (8, 1, 8, 8, 8)
    has_lesion = data.masks.flatten(1).any(1)
    assert bool((y.flatten(1).any(1) == has_lesion).all())
    # every image voxel brighter by 0.6 is a lesion voxel: the mask crop matches the image crop
    assert bool(((x[:, 0] > 0.55) == y[:, 0].bool()).all())
    again = PatchSampler(8, foreground=1.0, seed=0)(data.images, data.masks)
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    # without oversampling, patches hold far fewer lesion voxels over many draws
    sampler = PatchSampler(8, foreground=0.0, seed=0)
    random_share = sum(float(sampler(data.images, data.masks)[1].float().mean())
                       for _ in range(20)) / 20
    oversampled = PatchSampler(8, foreground=1.0, seed=1)
    lesion_share = sum(float(oversampled(data.images, data.masks)[1].float().mean())
                       for _ in range(20)) / 20
    assert lesion_share > 3 * random_share


def test_a_patch_larger_than_the_volumes_or_on_images_is_refused_with_the_fix() -> None:
    cfg = TrainConfig(local_epochs=1, batch_size=2, patch_size=32)
    with pytest.raises(ConfigError, match=r"train.patchSize 32 is larger than the volumes "
                                          r"\(16x16x16 voxels\): set it to at most 16"):
        train_site(SPEC, _global(), cubes(4, 0), cubes(2, 1), cfg)
    images = ImageSet(torch.rand(4, 1, 8, 8), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ConfigError, match="patches are cut from 3D volumes"):
        train_site(ModelSpec(name="tumor-cnn"), model_weights(build_model(ModelSpec())),
                   images, images, cfg)


def test_training_on_patches_learns_and_scores_whole_volumes_by_windows_of_the_patch() -> None:
    """Patches of 16^3 from 24^3 volumes: the network learns the cubes from patches."""
    cfg = TrainConfig(local_epochs=8, batch_size=2, lr=1e-2, patch_size=16)
    out = train_site(SPEC, _global(), cubes(8, 0, edge=24), cubes(4, 1, edge=24), cfg)
    assert out.global_metrics is not None and out.local_metrics is not None
    assert out.local_metrics.loss < out.global_metrics.loss
    assert out.local_metrics.dice is not None and out.local_metrics.dice > 0.3


def test_patch_trained_networks_are_scored_by_windows_of_their_patch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import deeprad.trainer.local_training as lt

    seen: list[object] = []
    real = lt.evaluate_volumes

    def spy(model: nn.Module, data: VolumeSet, device: torch.device,
            roi_size: object = None, **kw: object) -> object:
        seen.append(roi_size)
        return real(model, data, device, roi_size)  # type: ignore[arg-type]

    monkeypatch.setattr(lt, "evaluate_volumes", spy)
    big = cubes(4, 0, edge=24), cubes(2, 1, edge=24)
    train_site(SPEC, _global(), *big, TrainConfig(local_epochs=1, batch_size=2, patch_size=16))
    train_site(SPEC, _global(), *big, TrainConfig(local_epochs=1, batch_size=2))
    # before and after training: windows of the patch; whole-volume training: of the volume
    assert seen == [(16, 16, 16), (16, 16, 16), (24, 24, 24), (24, 24, 24)]


def test_dp_sgd_trains_on_one_patch_per_volume_record() -> None:
    """Under DP-SGD a patch is cut from each sampled volume, so a record still gives one
    per-record gradient: steps and sample rate are those of whole volumes."""
    cfg = TrainConfig(local_epochs=2, batch_size=2, lr=1e-2, seed=2, patch_size=16)
    out = train_site(SPEC, _global(), cubes(8, 0, edge=24), cubes(4, 1, edge=24), cfg,
                     dp=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    assert out.privacy is not None
    assert out.privacy.steps == 2 * 4 and out.privacy.sample_rate == pytest.approx(0.25)
    assert any(float(d.abs().max()) > 0 for d in out.delta.values())
