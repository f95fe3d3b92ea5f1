"""Segmentation and lesion-detection metrics on hand-made volumes, and pooling across sites that
equals scoring the pooled predictions."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from deeprad.core.metrics import clinical_metrics, combine
from deeprad.core.seg_metrics import lesion_counts, segmentation_metrics

pytestmark = pytest.mark.unit

EDGE = 16


def _cube(lo: tuple[int, int, int], size: int = 4, value: float = 1.0) -> torch.Tensor:
    vol = torch.zeros(1, EDGE, EDGE, EDGE)
    d, h, w = lo
    vol[0, d : d + size, h : h + size, w : w + size] = value
    return vol


def test_dice_by_hand_with_the_empty_scan_convention() -> None:
    reference = torch.stack([_cube((2, 2, 2)), torch.zeros(1, EDGE, EDGE, EDGE),
                             torch.zeros(1, EDGE, EDGE, EDGE)])
    # scan 0: shifted one voxel, 3x4x4 of 4x4x4 overlap -> 2*48/128; scan 1: healthy and
    # nothing predicted -> 1; scan 2: healthy but a false alarm -> 0
    probs = torch.stack([_cube((3, 2, 2), value=0.9), torch.full((1, EDGE, EDGE, EDGE), 0.2),
                         _cube((8, 8, 8), size=2, value=0.7)])
    m = segmentation_metrics(probs, reference, (1.0, 1.0, 1.0), loss=0.3)
    assert m.dice == pytest.approx((0.75 + 1.0 + 0.0) / 3)
    assert m.n == 3 and m.positives == 1 and m.loss == 0.3
    assert m.hd95_cases == 1  # HD95 only where both reference and prediction hold a lesion
    # per scan: the lesion scan is found (0.9), one healthy scan cleared, one false alarm (0.7)
    assert m.sensitivity == 1.0 and m.specificity == 0.5 and m.accuracy == pytest.approx(2 / 3)
    assert m.auroc == 1.0  # 0.9 ranks above both 0.2 and 0.7


def test_hd95_of_a_shifted_cube_is_the_shift_in_mm() -> None:
    reference = _cube((4, 4, 4))[None]
    shifted = _cube((6, 4, 4), value=0.8)[None]  # two voxels along D
    m = segmentation_metrics(shifted, reference, (3.0, 1.0, 1.0), loss=0.0)
    assert m.hd95 == pytest.approx(6.0)
    across = segmentation_metrics(_cube((4, 4, 5), value=0.8)[None], reference,
                                  (3.0, 1.0, 1.0), loss=0.0)
    assert across.hd95 == pytest.approx(1.0)  # one voxel along W, 1 mm


def test_froc_counts_and_sensitivity_by_hand() -> None:
    reference = (_cube((1, 1, 1), size=3) + _cube((10, 10, 10), size=3))[None]
    probs = (_cube((1, 1, 1), size=3, value=0.9) + _cube((10, 10, 10), size=3, value=0.3)
             + _cube((1, 10, 1), size=2, value=0.6))[None]
    m = segmentation_metrics(probs, reference, (1.0, 1.0, 1.0), loss=0.0)
    assert m.lesions is not None and m.lesions.lesions == 2 and m.lesions.scans == 1
    by_threshold = dict(zip(m.lesions.thresholds,
                            zip(m.lesions.hits, m.lesions.false_positives, strict=True),
                            strict=True))
    assert by_threshold[0.3] == (2, 1)  # both lesions and the 0.6 blob
    assert by_threshold[0.5] == (1, 1)
    assert by_threshold[0.7] == (1, 0)
    assert by_threshold[0.95] == (0, 0)
    assert m.lesion_sensitivity is not None
    assert m.lesion_sensitivity["0.125"] == 0.5  # no false positive allowed: only the 0.9 one
    assert m.lesion_sensitivity["1"] == 1.0 and m.lesion_sensitivity["8"] == 1.0


def test_a_candidate_must_overlap_a_lesion_by_a_tenth_iou_to_find_it() -> None:
    reference = _cube((4, 4, 4), size=2)[None]  # 8 voxels
    # an untrained network's low threshold: one candidate over the whole volume touches the
    # lesion but is a false positive, and the lesion is missed
    everywhere = torch.full((1, 1, EDGE, EDGE, EDGE), 0.2)
    counts = lesion_counts(everywhere, reference, thresholds=(0.1,))
    assert (counts.hits, counts.false_positives) == ([0], [1])
    # a 4^3 candidate holding the lesion: IoU 8/64 >= 0.1 finds it; 5^3: 8/125 does not
    assert lesion_counts(_cube((3, 3, 3), size=4, value=0.8)[None], reference,
                         thresholds=(0.5,)).hits == [1]
    assert lesion_counts(_cube((3, 3, 3), size=5, value=0.8)[None], reference,
                         thresholds=(0.5,)).false_positives == [1]


def test_lesions_touching_diagonally_are_one_lesion() -> None:
    """26-connectivity: cubes meeting at a corner form one connected component."""
    mask = (_cube((2, 2, 2), size=2) + _cube((4, 4, 4), size=2))[None]
    assert lesion_counts(mask * 0.9, mask).lesions == 1


def _random_scans(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blobby masks and noisy, smoothed probability maps that partly agree with them."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, 1, EDGE, EDGE, EDGE)
    for i in range(n):
        for _ in range(int(torch.randint(0, 4, (1,), generator=g))):
            d, h, w = torch.randint(0, EDGE - 3, (3,), generator=g).tolist()
            size = int(torch.randint(1, 4, (1,), generator=g))
            masks[i, 0, d : d + size, h : h + size, w : w + size] = 1
    noise = torch.rand(n, 1, EDGE, EDGE, EDGE, generator=g)
    smooth = torch.nn.functional.avg_pool3d(noise, 3, stride=1, padding=1)
    return (0.3 * masks + 1.6 * (smooth - 0.5) + 0.45).clamp(0, 1), masks


def test_pooled_froc_dice_and_hd95_equal_those_of_the_pooled_scans() -> None:
    sites = [_random_scans(n, seed) for n, seed in ((5, 1), (3, 2), (6, 3))]
    spacing = (2.0, 1.0, 1.0)
    per_site = [segmentation_metrics(p, m, spacing, loss=0.1) for p, m in sites]
    pooled = combine(per_site)
    direct = segmentation_metrics(torch.cat([p for p, _ in sites]),
                                  torch.cat([m for _, m in sites]), spacing, loss=0.1)
    assert pooled is not None
    assert pooled.lesions == direct.lesions  # summed counts: exactly the pooled scans'
    assert pooled.lesion_sensitivity == direct.lesion_sensitivity
    assert direct.lesions is not None and len(set(direct.lesions.hits)) > 3  # a real curve
    assert pooled.dice == pytest.approx(direct.dice, abs=1e-6)
    assert pooled.hd95 == pytest.approx(direct.hd95, abs=1e-5)
    assert pooled.hd95_cases == direct.hd95_cases > 0
    assert pooled.histogram == direct.histogram
    assert (pooled.n, pooled.positives) == (direct.n, direct.positives)


def test_pooled_auroc_from_histograms_matches_the_pooled_predictions() -> None:
    g = torch.Generator().manual_seed(0)
    sites = []
    for n, shift in ((300, 0.5), (150, 1.5), (500, -0.3)):  # sites that disagree in scale
        labels = (torch.rand(n, generator=g) < 0.3).float()
        sites.append((torch.randn(n, generator=g) + shift + 1.2 * labels, labels))
    pooled = combine([clinical_metrics(logits, labels) for logits, labels in sites])
    logits = torch.cat([x for x, _ in sites])
    labels = torch.cat([y for _, y in sites])
    exact = float(binary_auroc(torch.sigmoid(logits), labels.long()))
    assert pooled is not None and pooled.auroc == pytest.approx(exact, abs=1e-3)
    # the old per-site average is measurably off here, which is why it is no longer used
    mean = sum(float(binary_auroc(torch.sigmoid(x), y.long())) * len(y) for x, y in sites)
    assert abs(mean / len(labels) - exact) > 5 * abs(pooled.auroc - exact)


def test_without_histograms_auroc_falls_back_to_the_weighted_mean() -> None:
    a = clinical_metrics(torch.tensor([3.0, -2.0, 1.0, -1.0, 2.0]),
                         torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0]))
    b = clinical_metrics(torch.tensor([5.0, -5.0]), torch.tensor([1.0, 0.0]))
    old = b.model_copy(update={"histogram": None})  # e.g. from an older trainer
    both = combine([a, old])
    assert both is not None and both.histogram is None
    assert both.auroc == pytest.approx((4 / 6 * 5 + 1.0 * 2) / 7)
