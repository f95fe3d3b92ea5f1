"""Segmentation and lesion-detection metrics on hand-made volumes, and pooling across sites that
equals scoring the pooled predictions."""

from __future__ import annotations

import math
import warnings

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


def test_dice_is_over_lesion_scans_and_healthy_scans_count_in_specificity() -> None:
    reference = torch.stack([_cube((2, 2, 2)), torch.zeros(1, EDGE, EDGE, EDGE),
                             torch.zeros(1, EDGE, EDGE, EDGE), _cube((9, 9, 9))])
    # scan 0: shifted one voxel, 3x4x4 of 4x4x4 overlap -> 2*48/128; scan 1: healthy and
    # nothing predicted; scan 2: healthy but a false alarm; scan 3: its lesion missed -> 0
    probs = torch.stack([_cube((3, 2, 2), value=0.9), torch.full((1, EDGE, EDGE, EDGE), 0.2),
                         _cube((8, 8, 8), size=2, value=0.7), torch.full((1, EDGE, EDGE, EDGE),
                                                                          0.3)])
    m = segmentation_metrics(probs, reference, (1.0, 1.0, 1.0), loss=0.3)
    assert m.dice == pytest.approx((0.75 + 0.0) / 2)  # the two lesion scans only
    assert m.n == 4 and m.positives == 2 and m.loss == 0.3
    assert m.specificity == 0.5  # one healthy scan clean, one with a false alarm


def test_dice_of_a_network_that_never_fires_is_zero_and_none_without_lesions() -> None:
    reference = torch.stack([_cube((2, 2, 2)), torch.zeros(1, EDGE, EDGE, EDGE)])
    silent = torch.full((2, 1, EDGE, EDGE, EDGE), 0.1)
    assert segmentation_metrics(silent, reference, (1.0, 1.0, 1.0), loss=0.0).dice == 0.0
    healthy = torch.zeros(2, 1, EDGE, EDGE, EDGE)
    assert segmentation_metrics(silent, healthy, (1.0, 1.0, 1.0), loss=0.0).dice is None


def test_scan_level_rule_and_auroc() -> None:
    reference = torch.stack([_cube((2, 2, 2)), torch.zeros(1, EDGE, EDGE, EDGE),
                             torch.zeros(1, EDGE, EDGE, EDGE)])
    probs = torch.stack([_cube((3, 2, 2), value=0.9), torch.full((1, EDGE, EDGE, EDGE), 0.2),
                         _cube((8, 8, 8), size=2, value=0.7)])
    m = segmentation_metrics(probs, reference, (1.0, 1.0, 1.0), loss=0.3)
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
    # at threshold t: the 0.9 lesion is hit when t <= 0.9, the 0.3 one when t <= 0.3, and the
    # 0.6 blob is a false positive when t <= 0.6 (no threshold is near those scores)
    assert m.lesions.hits == [(t <= 0.9) + (t <= 0.3) for t in m.lesions.thresholds]
    assert m.lesions.false_positives == [int(t <= 0.6) for t in m.lesions.thresholds]
    assert len(set(m.lesions.hits)) == 3
    assert m.lesion_sensitivity is not None
    assert m.lesion_sensitivity["0.125"] == 0.5  # no false positive allowed: only the 0.9 one
    assert m.lesion_sensitivity["1"] == 1.0 and m.lesion_sensitivity["8"] == 1.0


def test_confident_false_positives_leave_low_false_positive_operating_points_reachable() -> None:
    """A trained network's false alarm at 0.997 next to a lesion found at 0.9999: a threshold
    between them finds the lesion with no false positive, so sensitivity at 1/8 FP per scan is
    1 (thresholds stopping at 0.99 kept the false alarm on every operating point: 0)."""
    reference = _cube((2, 2, 2), size=3)[None]
    probs = (_cube((2, 2, 2), size=3, value=0.9999) + _cube((10, 10, 10), size=2, value=0.997)
             )[None]
    m = segmentation_metrics(probs, reference, (1.0, 1.0, 1.0), loss=0.0)
    assert m.lesions is not None and m.lesion_sensitivity is not None
    assert (1, 0) in zip(m.lesions.hits, m.lesions.false_positives, strict=True)
    assert m.lesion_sensitivity["0.125"] == 1.0


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
    assert pooled is not None and pooled.auroc is not None
    assert pooled.auroc == pytest.approx(exact, abs=1e-3)
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


def _saturated_scores() -> tuple[torch.Tensor, torch.Tensor]:
    """The reviewer's case of a trained network: 40 positive scans scored in [0.9995, 1), 30 of
    60 negatives in [0.9991, 1), the rest lower; spread evenly in logit (exact AUROC 0.894)."""
    positives = torch.linspace(math.log(0.9995 / 0.0005), 10.0, 40)
    negatives = torch.cat([torch.linspace(math.log(0.9991 / 0.0009), 9.0, 30),
                           torch.linspace(-4.0, 3.0, 30)])
    return torch.cat([positives, negatives]), torch.cat([torch.ones(40), torch.zeros(60)])


def test_pooled_auroc_stays_exact_when_scores_saturate_near_one() -> None:
    """Equal bins in probability put all 40 positives and 30 negatives into the top bin, as ties
    (pooled AUROC 0.750); logit bins keep them apart."""
    logits, labels = _saturated_scores()
    exact = float(binary_auroc(torch.sigmoid(logits), labels.long()))
    assert 0.88 < exact < 0.90  # the reviewer measured 0.892
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    sites = [order[:30], order[30:55], order[55:]]
    pooled = combine([clinical_metrics(logits[i], labels[i]) for i in sites])
    assert pooled is not None and pooled.auroc == pytest.approx(exact, abs=1e-3)


def test_pooled_scan_auroc_of_segmentations_stays_exact_when_scores_saturate() -> None:
    """The same saturated scan scores as lesion probabilities of 4^3 volumes (one voxel each,
    the lesion there on positive scans): the per-site histograms pool to the exact AUROC."""
    logits, labels = _saturated_scores()
    probs = torch.zeros(100, 1, 4, 4, 4)
    probs[:, 0, 1, 1, 1] = torch.sigmoid(logits)
    masks = torch.zeros(100, 1, 4, 4, 4)
    masks[:, 0, 1, 1, 1] = labels
    direct = segmentation_metrics(probs, masks, (1.0, 1.0, 1.0), loss=0.0)
    assert direct.auroc is not None and 0.88 < direct.auroc < 0.90
    sites = [segmentation_metrics(probs[i:i + 25], masks[i:i + 25], (1.0, 1.0, 1.0), loss=0.0)
             for i in range(0, 100, 25)]
    pooled = combine(sites)
    assert pooled is not None and pooled.auroc == pytest.approx(direct.auroc, abs=1e-3)


def test_hd95_emits_no_monai_deprecation_warning() -> None:
    """MONAI 1.6 warns about its own always_return_as_numpy on every HD95; the report must not
    carry that noise (warnings are errors here)."""
    reference = _cube((4, 4, 4))[None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = segmentation_metrics(_cube((5, 4, 4), value=0.8)[None], reference,
                                 (1.0, 1.0, 1.0), loss=0.0)
    assert m.hd95 == pytest.approx(1.0)
