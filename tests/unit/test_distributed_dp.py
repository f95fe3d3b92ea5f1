"""Distributed DP (deeprad.core.distributed_dp): the accounting against a hand computation of
the paper's bound, the discrete Gaussian sampler's moments, the rotate → round → wrap → unwrap
round trip, calibration, clear errors, and a site refusing a spec that lies about its noise."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from redteam import refused

from deeprad.core import distributed_dp as ddp
from deeprad.core.errors import ConfigError
from deeprad.core.identity import Identity, KeyRegistry
from deeprad.core.layout import StudyLayout
from deeprad.core.protocol import DistributedDPSpec, SecAggSpec, TrainingTask
from deeprad.core.secagg.quantize import RING_BITS
from deeprad.core.secagg.relay import StoreRelay, round_config
from deeprad.core.store.local import LocalStore
from deeprad.trainer import job as trainer_job
from deeprad.trainer.local_training import SiteTraining

# the orders dp-accounting's RDP accountant evaluates (its DEFAULT_RDP_ORDERS)
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]


def _cks_epsilon(xi: float, rho: float, delta: float) -> float:
    """(ε, δ) of (ξ, ρ)-zCDP: Canonne–Kamath–Steinke's conversion (Prop. 12 of 2004.00010)
    over the accountant's orders, written out by hand."""
    return min(xi + rho * a + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
               for a in ORDERS if a > 1.01)


def _spec(**change: float) -> DistributedDPSpec:
    values = dict(l2_clip=1.0, noise_stddev=2.0, noise_shares=5, max_sites=5, granularity=0.5,
                  beta=math.exp(-0.5), epsilon=10.0, delta=1e-5, rounds=3)
    values.update(change)
    return DistributedDPSpec(**values)  # type: ignore[arg-type]


def test_epsilon_matches_the_papers_bound_computed_by_hand() -> None:
    """Coarse granularity, so the τ correction matters: n = 5 shares of local σ_l = σ/(γ√5)
    ≈ 0.63 ring units, d = 64 (dim 50 padded), c/γ = 2; Proposition 14's three terms by hand."""
    spec = _spec(noise_stddev=0.7)
    n, d, gamma, sigma = 5, 64, 0.5, 0.7
    c = 1.0 / gamma
    delta2 = min(c + math.sqrt(d),
                 math.sqrt(c * c + d / 4 + math.sqrt(2 * 0.5) * (c + math.sqrt(d) / 2)))
    delta1 = delta2 * min(math.sqrt(d), delta2)
    local = sigma / math.sqrt(n) / gamma
    tau = 10 * sum(math.exp(-2 * math.pi ** 2 * local ** 2 * k / (k + 1)) for k in range(1, n))
    s2 = delta2 / (math.sqrt(n) * local)
    s1 = delta1 / (math.sqrt(n) * local)
    hand = [(tau * d, s2 ** 2 / 2), (0.0, (s2 ** 2 + 2 * s1 * tau + tau ** 2 * d) / 2),
            (0.0, (s2 + tau * math.sqrt(d)) ** 2 / 2)]
    assert tau > 1e-4  # the correction is really exercised
    flat = [v for term in ddp.zcdp_terms(spec, 50) for v in term]
    assert flat == pytest.approx([v for term in hand for v in term], rel=1e-12)

    rounds = 3
    expected = min(_cks_epsilon(rounds * xi, rounds * rho, 1e-5) for xi, rho in hand)
    assert ddp.epsilon_after(spec, 50, rounds) == pytest.approx(expected, rel=1e-9)
    # and never above the textbook zCDP conversion ε = ρ + 2√(ρ log 1/δ) of the ρ-only terms
    textbook = min(rounds * rho + 2 * math.sqrt(rounds * rho * math.log(1e5))
                   for xi, rho in hand if xi == 0)
    assert expected <= textbook


def test_a_32_bit_plan_costs_what_the_continuous_gaussian_costs() -> None:
    """In the 32-bit ring τ vanishes and rounding inflates the clip by ~1e-5: ε equals that
    of the Gaussian mechanism with multiplier σ/c, from dp-accounting's own Gaussian path."""
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    spec = ddp.plan(epsilon=4.0, delta=1e-5, rounds=10, l2_clip=0.5, dim=209, sites=4,
                    noise_shares=3)
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(spec.noise_stddev / spec.l2_clip), 10)
    assert ddp.epsilon_after(spec, 209, 10) == pytest.approx(accountant.get_epsilon(1e-5),
                                                             rel=1e-4)


def test_plan_spends_the_budget_over_the_planned_rounds_and_no_more() -> None:
    short = ddp.plan(epsilon=8.0, delta=1e-5, rounds=2, l2_clip=1.0, dim=209, sites=4,
                     noise_shares=3)
    long = ddp.plan(epsilon=8.0, delta=1e-5, rounds=20, l2_clip=1.0, dim=209, sites=4,
                    noise_shares=3)
    for spec in (short, long):
        spent = ddp.epsilon_after(spec, 209, spec.rounds)
        assert 0.99 * 8.0 <= spent <= 8.0
        assert ddp.epsilon_after(spec, 209, spec.rounds + 1) > 8.0
    assert long.noise_stddev > 2 * short.noise_stddev
    # the summed noise fits the ring: n·c and 8σ of the noise inside 2^31 ring units
    assert RING_BITS == ddp.RING_BITS
    assert (4 * 1.0 + 8 * 2 * long.noise_stddev / math.sqrt(3)) / long.granularity < 2 ** 31


@pytest.mark.parametrize("sigma", [0.7, 3.0, 40.0, 1e7])
def test_discrete_gaussian_has_mean_zero_and_the_exact_variance(sigma: float) -> None:
    rng = np.random.default_rng(7)
    draws = ddp.sample_discrete_gaussian(sigma, 200_000, rng)
    assert draws.dtype == np.int64
    support = np.arange(-int(12 * sigma) - 2, int(12 * sigma) + 3, dtype=np.float64) \
        if sigma < 100 else None
    if support is not None:  # the exact variance of N_Z(0, σ²), summed over its support
        weights = np.exp(-support ** 2 / (2 * sigma ** 2))
        variance = float((weights * support ** 2).sum() / weights.sum())
    else:
        variance = sigma ** 2  # equal to σ² within 1e-100 for σ >= 1
    se_mean = math.sqrt(variance / draws.size)
    assert abs(draws.mean()) < 5 * se_mean
    assert draws.var() == pytest.approx(variance, rel=5 * math.sqrt(2 / draws.size))


def test_discrete_gaussian_matches_its_probability_mass_near_zero() -> None:
    sigma = 1.3
    draws = ddp.sample_discrete_gaussian(sigma, 300_000, np.random.default_rng(3))
    ks = np.arange(-30, 31)
    pmf = np.exp(-ks.astype(float) ** 2 / (2 * sigma ** 2))
    pmf /= pmf.sum()
    for k in (-2, -1, 0, 1, 2, 3):
        p = pmf[k + 30]
        freq = float(np.mean(draws == k))
        assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / draws.size), k
    assert float(np.mean(draws == 0)) > 0.25  # mass at 0 (p ≈ 0.307): not a vacuous check


def test_rotation_is_orthonormal_shared_by_seed_and_inverted_at_the_hub() -> None:
    x = np.random.default_rng(0).normal(size=300)
    y = ddp.rotate(x, b"round-1")
    assert y.size == 512
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    assert np.allclose(ddp.unrotate(y, b"round-1", 300), x, atol=1e-12)
    assert np.array_equal(ddp.rotate(x, b"round-1"), y)
    assert not np.allclose(ddp.rotate(x, b"round-2"), y)


def test_sum_round_trips_within_the_rounding_error_without_noise() -> None:
    """Clip, rotate, scale, conditionally round and wrap into Z_(2^32) at five sites; the ring
    sum decodes to the mean of the clipped updates within the rounding bound (no noise drawn,
    so the bound is the whole error)."""
    rng = np.random.default_rng(11)
    spec = _spec(granularity=1e-6, noise_stddev=1.0)
    updates = [rng.normal(size=50) * s for s in (0.01, 0.1, 0.5, 2.0, 5.0)]  # two above c
    clipped = [ddp.clip_l2(u, spec.l2_clip)[0] for u in updates]
    ring_sum = np.zeros(64, dtype=np.uint32)
    for u in updates:
        scaled = ddp.rotate(ddp.clip_l2(u, spec.l2_clip)[0], b"seed") / spec.granularity
        bound = ddp.rounded_l2_bound(spec.l2_clip / spec.granularity, 64, spec.beta)
        rounded = ddp.conditional_round(scaled, bound, rng)
        assert np.linalg.norm(rounded) <= bound
        ring_sum += rounded.astype(np.uint32)  # negative values wrap around the ring
    mean, error_bound = ddp.decode_mean(ring_sum, spec, b"seed", 50, 5)
    true_mean = np.mean(clipped, axis=0)
    assert np.linalg.norm(mean - true_mean) <= error_bound
    assert error_bound == pytest.approx(8 * 1e-6)
    assert np.linalg.norm(true_mean) > 100 * error_bound  # the check is not vacuous


def test_encoded_shares_add_up_to_the_planned_noise() -> None:
    """Four of four sites upload encode(...): the decoded mean is the true mean plus noise of
    standard deviation σ·√(4/3)/4 per value (three planned shares, four present)."""
    spec = ddp.plan(epsilon=2.0, delta=1e-5, rounds=1, l2_clip=1.0, dim=4000, sites=4,
                    noise_shares=3)
    rng = np.random.default_rng(5)
    updates = [rng.normal(size=4000) * 0.005 for _ in range(4)]
    ring_sum = np.zeros(4096, dtype=np.uint32)
    for u in updates:
        ring_sum += ddp.encode(u, spec, b"seed", rng)
    mean, _ = ddp.decode_mean(ring_sum, spec, b"seed", 4000, 4)
    noise = mean - np.mean(updates, axis=0)
    expected = spec.noise_stddev * math.sqrt(4 / 3) / 4
    assert abs(noise.mean()) < 5 * expected / math.sqrt(4000)
    assert noise.std() == pytest.approx(expected, rel=0.05)


def test_noise_comes_from_the_os_csprng_not_a_seed() -> None:
    spec = _spec(granularity=1e-6)
    x = np.full(50, 0.01)
    assert not np.array_equal(ddp.encode(x, spec, b"seed"), ddp.encode(x, spec, b"seed"))


@pytest.mark.parametrize(("change", "field"), [
    ({"epsilon": 0.0}, "epsilon"), ({"delta": 1.0}, "delta"), ({"rounds": 0}, "rounds"),
    ({"l2_clip": -1.0}, "l2_clip"), ({"noise_shares": 5}, "noise_shares"),
    ({"beta": 1.0}, "beta"), ({"epsilon": 1e-9}, "epsilon"),
])
def test_a_bad_parameter_is_a_one_line_config_error(change: dict[str, float], field: str
                                                    ) -> None:
    values: dict[str, float] = dict(epsilon=8.0, delta=1e-5, rounds=5, l2_clip=1.0, dim=209,
                                    sites=4, noise_shares=3)
    values.update(change)
    with pytest.raises(ConfigError) as err:
        ddp.plan(**values)  # type: ignore[arg-type]
    message = str(err.value)
    assert "\n" not in message and message.startswith("distributed DP: ") and field in message


def _site_setup(tmp_path: Path, spec: SecAggSpec, round_no: int = 1
                ) -> tuple[LocalStore, ConfigError]:
    """Run the trainer's secure-aggregation set-up at hospital-1 with `spec`; the error."""
    sites = [f"hospital-{i}" for i in range(1, 5)]
    idents = [Identity.generate(s, "site") for s in sites]
    registry = KeyRegistry.of([i.public() for i in idents]
                              + [Identity.generate("hub", "hub").public()])
    task = TrainingTask(namespace="ns", study="st", round=round_no, site="hospital-1",
                        registry_json=registry.to_json(), secagg=spec)
    store = LocalStore(tmp_path)
    relay = StoreRelay(store, StudyLayout("ns", "st"), round_no, 30.0, 0.01)
    out = SiteTraining({"w": torch.full((50,), 0.01)}, 10, None, None, 0.0, 0.0)
    with pytest.raises(ConfigError) as err:
        trainer_job._secagg_setup(task, spec, idents[0], registry, relay, out)
    return store, err.value


def _ddp_secagg(ddp_spec: DistributedDPSpec, threshold: int | None = None) -> SecAggSpec:
    return SecAggSpec(roster=[f"hospital-{i}" for i in range(1, 5)], threshold=threshold,
                      weight_normalizer=40.0, distributed_dp=ddp_spec)


def test_redteam_hub_sends_quieter_noise_than_the_epsilon_it_claims(tmp_path: Path) -> None:
    honest = ddp.plan(epsilon=8.0, delta=1e-5, rounds=3, l2_clip=1.0, dim=50, sites=4,
                      noise_shares=3)
    quiet = honest.model_copy(update={"noise_stddev": honest.noise_stddev / 10})
    store, err = _site_setup(tmp_path, _ddp_secagg(quiet))
    message = str(err)
    refused("hub sends a distributed-DP spec with a tenth of the noise its ε needs",
            "trainer (distributed_dp.check_share)", message)
    assert "not the ε=8 it claims; refusing to upload" in message and "\n" not in message
    assert not any(p.is_file() for p in tmp_path.rglob("*")), "the site wrote something"
    assert store is not None


def test_redteam_hub_lowers_the_threshold_below_the_planned_noise_shares(tmp_path: Path
                                                                          ) -> None:
    plan4 = ddp.plan(epsilon=8.0, delta=1e-5, rounds=3, l2_clip=1.0, dim=50, sites=4,
                     noise_shares=4)
    _, err = _site_setup(tmp_path, _ddp_secagg(plan4, threshold=3))
    message = str(err)
    refused("hub unmasks a sum of 3 sites whose noise was planned for 4 shares",
            "trainer (secagg.relay.round_config)", message)
    assert "plan it with noise_shares <= the threshold" in message and "\n" not in message
    assert not any(p.is_file() for p in tmp_path.rglob("*")), "the site wrote something"


def test_redteam_hub_runs_more_rounds_than_the_plan_covers(tmp_path: Path) -> None:
    plan = ddp.plan(epsilon=8.0, delta=1e-5, rounds=3, l2_clip=1.0, dim=50, sites=4,
                    noise_shares=3)
    _, err = _site_setup(tmp_path, _ddp_secagg(plan), round_no=4)
    refused("hub runs round 4 on a 3-round distributed-DP plan", "trainer "
            "(distributed_dp.check_share)", str(err))
    assert "round 4 is past the 3 round(s)" in str(err)
    assert not any(p.is_file() for p in tmp_path.rglob("*")), "the site wrote something"


def test_round_config_gives_the_rotated_length_and_no_weight_value() -> None:
    plan = ddp.plan(epsilon=8.0, delta=1e-5, rounds=3, l2_clip=1.0, dim=50, sites=4,
                    noise_shares=3)
    assert round_config("ns", "st", 1, _ddp_secagg(plan), 50).vector_length == 64
    plain = _ddp_secagg(plan).model_copy(update={"distributed_dp": None})
    assert round_config("ns", "st", 1, plain, 50).vector_length == 51
