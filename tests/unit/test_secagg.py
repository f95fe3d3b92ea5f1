"""Secure aggregation: exact sums under dropouts, aborts below the threshold, masked inputs
that look uniform, refused inconsistent survivor sets, full-strength PRG keys."""

from __future__ import annotations

import base64
import itertools
import math
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from redteam import refused

from deeprad.core.checkpoint import to_bytes
from deeprad.core.errors import ConfigError
from deeprad.core.identity import Identity, KeyRegistry
from deeprad.core.layout import StudyLayout
from deeprad.core.protocol import SecAggSpec, SiteResult
from deeprad.core.secagg import (
    HubSession,
    NotEnoughShares,
    ProtocolViolation,
    SecAggAborted,
    SecAggConfig,
    SecAggResult,
    SiteSession,
    SurvivorSet,
    default_threshold,
    shamir,
    threshold_for,
)
from deeprad.core.secagg.prg import apply_mask, prg
from deeprad.core.secagg.quantize import (
    Quantizer,
    flatten,
    pack,
    unflatten,
    unpack,
)
from deeprad.core.secagg.relay import (
    StoreRelay,
    round_config,
    step_timeout,
    training_window,
)
from deeprad.core.signing import sign_message
from deeprad.core.store.local import LocalStore

STAGES = ("advertise", "share", "masked", "consistency", "unmask")
N, T = 10, 7
SITES = [f"site-{i:02d}" for i in range(N)]


@pytest.fixture(scope="module")
def people() -> tuple[dict[str, Identity], Identity, KeyRegistry]:
    ids = {s: Identity.generate(s) for s in SITES}
    hub = Identity.generate("hub", "hub")
    return ids, hub, KeyRegistry.of([*(i.public() for i in ids.values()), hub.public()])


def run_round(people: tuple[dict[str, Identity], Identity, KeyRegistry],
              xs: dict[str, np.ndarray], drop: dict[str, str] | None = None,
              threshold: int = T) -> SecAggResult:
    """One whole round; a site in `drop` sends nothing from the named stage on."""
    ids, hub_id, registry = people
    drop = drop or {}
    length = next(iter(xs.values())).size
    cfg = SecAggConfig.create("ns", "lung", 3, xs, length, threshold)
    sites = {s: SiteSession(cfg, ids[s], registry) for s in cfg.roster}
    hub = HubSession(cfg, hub_id, registry)

    def alive(stage: str) -> list[str]:
        return [s for s in sites if s not in drop or STAGES.index(drop[s]) > STAGES.index(stage)]

    adv = hub.collect_advertisements([sites[s].advertise_keys() for s in alive("advertise")])
    routed = hub.route_shares([sites[s].share_keys(adv) for s in alive("share")
                               if s in {a.site for a in adv}])
    for s in alive("masked"):
        if s in routed:
            hub.add_masked_input(s, sites[s].masked_input(routed[s], xs[s]))
    survivors = hub.survivor_set()
    sigs = hub.collect_consistency([sites[s].consistency_signature(survivors)
                                    for s in alive("consistency") if s in survivors.survivors])
    return hub.reconstruct([sites[s].unmask(sigs) for s in alive("unmask")
                            if s in {c.site for c in sigs}])


def ring_sum(xs: dict[str, np.ndarray], sites: tuple[str, ...]) -> np.ndarray:
    total = np.zeros_like(next(iter(xs.values())))
    for s in sites:
        total += xs[s]
    return total


def random_inputs(length: int = 48, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s: rng.integers(0, 2**32, length, dtype=np.uint32) for s in SITES}


# ---- exact aggregates under dropouts ----------------------------------------------------------


def test_no_dropout_gives_the_exact_sum(people: tuple) -> None:
    xs = random_inputs()
    res = run_round(people, xs)
    assert res.survivors == tuple(SITES) and res.dropped == ()
    np.testing.assert_array_equal(res.sum, ring_sum(xs, tuple(SITES)))


@pytest.mark.parametrize("stages", list(itertools.combinations_with_replacement(STAGES, 3)),
                         ids=lambda st: "+".join(st))
def test_three_dropouts_at_any_stages_give_the_exact_aggregate(people: tuple,
                                                               stages: tuple[str, ...]) -> None:
    xs = random_inputs(seed=len(stages[0]) * 31 + len(stages[2]))
    rng = np.random.default_rng(zlib.crc32("+".join(stages).encode()))
    dropped_sites = rng.choice(SITES, 3, replace=False)
    drop = dict(zip(dropped_sites, stages, strict=True))
    res = run_round(people, xs, drop)
    contributed = tuple(s for s in SITES if STAGES.index(drop.get(s, "unmask")) >= 3
                        or s not in drop)
    assert res.survivors == contributed
    np.testing.assert_array_equal(res.sum, ring_sum(xs, contributed))
    lost_after_sharing = {s for s, st in drop.items() if st == "masked"}
    assert set(res.dropped) == lost_after_sharing


@pytest.mark.parametrize("stage", STAGES)
def test_a_fourth_dropout_aborts_the_round_with_a_clear_reason(people: tuple, stage: str) -> None:
    xs = random_inputs()
    drop = dict.fromkeys(SITES[:3], "masked") | {SITES[5]: stage}
    if stage == "advertise":  # four gone before anything was shared
        drop = dict.fromkeys(SITES[:4], "advertise")
    with pytest.raises(SecAggAborted) as err:
        run_round(people, xs, drop)
    msg = str(err.value)
    assert "6 of" in msg and "threshold is 7" in msg and "n=10" in msg
    assert "lung round 3" in msg and "missing:" in msg


def test_the_threshold_follows_the_threat_model() -> None:
    semi = [threshold_for(n, "semi-honest") for n in (2, 3, 4, 5, 10, 50)]
    assert semi == [2, 2, 3, 3, 6, 26]
    malicious = [threshold_for(n, "malicious") for n in (2, 3, 4, 5, 10, 50)]
    assert malicious == [2, 3, 3, 4, 7, 34]
    assert default_threshold(10) == 6  # semi-honest unless the round says otherwise
    assert SecAggConfig.create("ns", "lung", 1, SITES, 8).threshold == 6
    with pytest.raises(ValueError, match="threat model must be one of semi-honest, malicious"):
        threshold_for(3, "paranoid")  # type: ignore[arg-type]


@pytest.mark.parametrize("threshold", [-1, 1, 5, 11])
def test_a_threshold_outside_a_majority_of_the_roster_is_refused(threshold: int) -> None:
    with pytest.raises(ConfigError) as err:
        SecAggConfig.create("ns", "lung", 1, SITES, 8, threshold=threshold)
    assert str(err.value) == (
        f"secure aggregation ns/lung round 1: threshold must satisfy "
        f"n/2 < t <= n (n=10): got t={threshold}; use t=6 (semi-honest hub) or t=7 "
        "(malicious hub)")


def test_redteam_threshold_below_a_majority(tmp_path: Path, people: tuple) -> None:
    """A task that asks for t = 1 of 3 (so that the hub alone, or one site with it, could
    unmask a single update) is refused before the site advertises anything."""
    ids, _, registry = people
    store = LocalStore(tmp_path)
    trio = SITES[:3]
    spec = SecAggSpec(roster=trio, threshold=1, weight_normalizer=30.0)
    relay = StoreRelay(store, StudyLayout("ns", "lung"), 1, spec.timeout_s, spec.poll_s)
    with pytest.raises(ConfigError, match=r"n/2 < t <= n \(n=3\): got t=1; use t=2") as err:
        session = SiteSession(round_config("ns", "lung", 1, spec, 8), ids[trio[0]], registry)
        relay.post("advertise", session.advertise_keys(), trio[0])
    refused("secure-aggregation threshold below a majority", "SecAggConfig (site and hub)",
            str(err.value))
    assert list(store.list("")) == []  # nothing advertised


@pytest.mark.parametrize("stage", STAGES)
def test_a_three_site_round_survives_one_dropout_against_a_semi_honest_hub(
        people: tuple, stage: str) -> None:
    rng = np.random.default_rng(3)
    trio = SITES[:3]
    xs = {s: rng.integers(0, 2**32, 16, dtype=np.uint32) for s in trio}
    res = run_round(people, xs, {trio[1]: stage}, threshold=threshold_for(3, "semi-honest"))
    contributed = tuple(trio) if stage in ("consistency", "unmask") else (trio[0], trio[2])
    assert res.survivors == contributed
    np.testing.assert_array_equal(res.sum, ring_sum(xs, contributed))


@pytest.mark.parametrize("stage", ["advertise", "share", "masked"])
def test_a_three_site_round_against_a_malicious_hub_survives_no_dropout(
        people: tuple, stage: str) -> None:
    rng = np.random.default_rng(4)
    trio = SITES[:3]
    xs = {s: rng.integers(0, 2**32, 16, dtype=np.uint32) for s in trio}
    with pytest.raises(SecAggAborted, match=r"2 of 3 site\(s\) took part, the threshold is 3"):
        run_round(people, xs, {trio[1]: stage}, threshold=threshold_for(3, "malicious"))


def test_step_timeouts_are_derived_from_the_window(tmp_path: Path) -> None:
    # W / 20, at least 10 s, at most 120 s; the hub's first wait leaves room for four steps
    assert [step_timeout(w) for w in (60, 600, 1800, 7200)] == [10, 30, 90, 120]
    assert [training_window(w) for w in (60, 600, 1800, 7200)] == [20, 480, 1440, 6720]
    assert training_window(20) == 10  # never less than one step
    relay = StoreRelay(LocalStore(tmp_path), StudyLayout("ns", "st"), 1, timeout_s=1800,
                       poll_s=0.01)
    assert relay.hub_timeout("advertise") == 1440 and relay.hub_timeout("shares") == 90
    assert relay.site_timeout("advertised") == 1800 and relay.site_timeout("routed") == 360


# ---- shares -----------------------------------------------------------------------------------


def test_fewer_than_t_shares_cannot_unmask() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, N, T)
    assert shamir.combine(shares[3:], T) == secret
    assert shamir.combine(shares[:T], T) == secret
    with pytest.raises(NotEnoughShares, match="6 Shamir share"):
        shamir.combine(shares[:T - 1], T)
    with pytest.raises(NotEnoughShares):  # duplicates do not count twice
        shamir.combine(shares[:T - 1] + shares[:1], T)
    # t-1 shares fit every secret equally well: interpolating them gives no information
    fake = shamir.Share(x=N + 1, y=12345)
    guess = shamir._interpolate_at([*shares[:T - 1], fake], 0)
    assert guess != int.from_bytes(secret, "big")
    # a corrupted share among more than t is detected, not silently used
    bad = [*shares[:T], shamir.Share(shares[T].x, (shares[T].y + 1) % shamir.PRIME)]
    with pytest.raises(ProtocolViolation, match="inconsistent"):
        shamir.combine(bad, T)


def test_hub_with_fewer_than_t_unmasking_messages_learns_nothing(people: tuple) -> None:
    xs = random_inputs()
    with pytest.raises(SecAggAborted, match="unmasking: 6 of"):
        run_round(people, xs, dict.fromkeys(SITES[:4], "unmask"))


# ---- a hub that lies about survivors ----------------------------------------------------------


def _sessions_up_to_consistency(people: tuple, xs: dict[str, np.ndarray], threshold: int = T
                                ) -> tuple[SecAggConfig, dict[str, SiteSession], HubSession]:
    ids, hub_id, registry = people
    cfg = SecAggConfig.create("ns", "lung", 3, SITES, xs[SITES[0]].size, threshold)
    sites = {s: SiteSession(cfg, ids[s], registry) for s in SITES}
    hub = HubSession(cfg, hub_id, registry)
    adv = hub.collect_advertisements([s.advertise_keys() for s in sites.values()])
    routed = hub.route_shares([s.share_keys(adv) for s in sites.values()])
    for s, sess in sites.items():
        hub.add_masked_input(s, sess.masked_input(routed[s], xs[s]))
    return cfg, sites, hub


def _signed_set(cfg: SecAggConfig, signer: Identity, survivors: list[str],
                dropped: list[str]) -> SurvivorSet:
    unsigned = SurvivorSet(survivors=tuple(survivors), dropped=tuple(dropped), signature="")
    sig = sign_message(signer, "secagg/survivors", unsigned.signed_bytes(cfg))
    return unsigned.model_copy(update={"signature": base64.b64encode(sig).decode()})


@pytest.mark.parametrize("threshold", [threshold_for(N, "semi-honest"), T])
def test_inconsistent_survivor_sets_are_refused(people: tuple, threshold: int) -> None:
    """With every site honest, a split into two groups leaves both below any majority
    threshold; against colluding sites only the malicious threshold holds (module docs)."""
    _, hub_id, _ = people
    xs = random_inputs()
    cfg, sites, _ = _sessions_up_to_consistency(people, xs, threshold)
    victim = SITES[9]
    # The attack: tell half the sites the victim dropped (they would reveal its mask key) and
    # the other half that it survived (they would reveal its self-mask seed).
    says_dropped = _signed_set(cfg, hub_id, SITES[:9], [victim])
    says_survived = _signed_set(cfg, hub_id, SITES, [])
    sigs = {s: sites[s].consistency_signature(says_dropped if i < 5 else says_survived)
            for i, s in enumerate(SITES)}
    everyone = list(sigs.values())
    for s in SITES:
        with pytest.raises(ProtocolViolation, match="inconsistent survivor sets"):
            sites[s].unmask(everyone)
    # relaying only the matching signatures leaves each group below the threshold
    cfg, sites, _ = _sessions_up_to_consistency(people, xs, threshold)
    sigs = {s: sites[s].consistency_signature(says_dropped if i < 5 else says_survived)
            for i, s in enumerate(SITES)}
    for i, s in enumerate(SITES):
        same = [sigs[o] for j, o in enumerate(SITES) if (j < 5) == (i < 5)]
        with pytest.raises(SecAggAborted, match=f"threshold is {threshold}"):
            sites[s].unmask(same)


def test_survivor_sets_not_signed_by_the_hub_or_not_matching_are_refused(people: tuple) -> None:
    ids, hub_id, _ = people
    cfg, sites, _ = _sessions_up_to_consistency(people, random_inputs())
    forged = _signed_set(cfg, ids[SITES[0]], SITES, [])
    with pytest.raises(ProtocolViolation, match="not signed by the hub"):
        sites[SITES[1]].consistency_signature(forged)
    invented = _signed_set(cfg, hub_id, SITES[:8], [])  # two sites vanished from the view
    with pytest.raises(ProtocolViolation, match="do not match"):
        sites[SITES[2]].consistency_signature(invented)
    not_me = _signed_set(cfg, hub_id, SITES[1:], [SITES[0]])
    with pytest.raises(ProtocolViolation, match="not listed as a survivor"):
        sites[SITES[0]].consistency_signature(not_me)


def test_forged_key_material_is_rejected(people: tuple) -> None:
    ids, hub_id, registry = people
    cfg = SecAggConfig.create("ns", "lung", 3, SITES, 8)
    sites = {s: SiteSession(cfg, ids[s], registry) for s in SITES}
    hub = HubSession(cfg, hub_id, registry)
    adv = [s.advertise_keys() for s in sites.values()]
    forged = adv[0].model_copy(update={"mask_key": adv[1].mask_key})
    good = hub.collect_advertisements([forged, *adv[1:]])
    assert SITES[0] not in {a.site for a in good}
    assert "signature does not verify" in hub.rejected[SITES[0]]
    with pytest.raises(ProtocolViolation, match="bad advertisement"):
        sites[SITES[1]].share_keys([forged, *adv[1:]])
    with pytest.raises(ProtocolViolation, match="out of order"):
        sites[SITES[2]].unmask([])
    # a failed step ends a session; start the round again for the share checks
    sites = {s: SiteSession(cfg, ids[s], registry) for s in SITES}
    hub = HubSession(cfg, hub_id, registry)
    relayed = hub.collect_advertisements([s.advertise_keys() for s in sites.values()])
    routed = hub.route_shares([s.share_keys(relayed) for s in sites.values()])
    mine = routed[SITES[3]]
    raw = bytearray(base64.b64decode(mine[0].ciphertext))
    raw[-1] ^= 1
    bad = mine[0].model_copy(update={"ciphertext": base64.b64encode(bytes(raw)).decode()})
    with pytest.raises(ProtocolViolation, match="fails authentication"):
        sites[SITES[3]].masked_input([bad, *mine[1:]], np.zeros(8, dtype=np.uint32))
    with pytest.raises(ProtocolViolation, match="routed a share"):
        sites[SITES[4]].masked_input(mine[1:2], np.zeros(8, dtype=np.uint32))
    redirected = mine[1].model_copy(update={"recipient": SITES[5]})  # relabelled by the hub
    with pytest.raises(ProtocolViolation, match="fails authentication"):
        sites[SITES[5]].masked_input([redirected], np.zeros(8, dtype=np.uint32))


# ---- the PRG ----------------------------------------------------------------------------------


def test_prg_is_keyed_by_the_full_32_byte_secret() -> None:
    seed = bytes(range(32))
    base = prg(seed, b"label", 4096)
    for pos in (0, 15, 16, 31):
        other = bytearray(seed)
        other[pos] ^= 0x01
        assert not np.array_equal(prg(bytes(other), b"label", 4096), base), pos
    assert np.array_equal(prg(seed, b"label", 4096), base)
    assert not np.array_equal(prg(seed, b"other", 4096), base)
    with pytest.raises(ValueError, match="full 32-byte"):
        prg(seed[:16], b"label", 8)
    # the construction, spelled out: AES-256-CTR under HKDF-SHA256(all 32 bytes, label)
    key = HKDF(hashes.SHA256(), 32, None, b"deeprad.io/secagg/prg/v1\x00label").derive(seed)
    ctr = Cipher(algorithms.AES256(key), modes.CTR(bytes(16))).encryptor()
    stream = ctr.update(bytes(4096 * 4))
    assert np.array_equal(np.frombuffer(stream, "<u4"), base)


def test_mask_application_streams_in_blocks() -> None:
    seed = bytes(32)
    n = (1 << 20) + 1234  # crosses the PRG's block boundary
    v = np.arange(n, dtype=np.uint32)
    apply_mask(v, seed, b"x", +1)
    np.testing.assert_array_equal(v, np.arange(n, dtype=np.uint32) + prg(seed, b"x", n))
    apply_mask(v, seed, b"x", -1)
    np.testing.assert_array_equal(v, np.arange(n, dtype=np.uint32))


# ---- what the hub sees ------------------------------------------------------------------------


def _chi_square_bytes(v: np.ndarray) -> float:
    counts = np.bincount(v.view(np.uint8), minlength=256).astype(np.float64)
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


def _ks_uniform(v: np.ndarray) -> float:
    u = np.sort(v.astype(np.float64) / 2**32)
    n = u.size
    i = np.arange(1, n + 1)
    return float(max((i / n - u).max(), (u - (i - 1) / n).max()))


def test_masked_update_is_indistinguishable_from_uniform_and_uncorrelated(people: tuple) -> None:
    ids, hub_id, registry = people
    n_values = 1 << 18
    rng = np.random.default_rng(5)
    q = Quantizer(clip=1.0, max_sites=3)
    # a very structured "true" update: smooth signal plus small noise
    true = (0.5 * np.sin(np.linspace(0, 40, n_values)) + 0.01 * rng.standard_normal(n_values))
    trio = SITES[:3]
    xs = {s: q.encode(true if s == trio[0] else rng.uniform(-1, 1, n_values), rng) for s in trio}
    cfg = SecAggConfig.create("ns", "lung", 3, trio, n_values)
    sites = {s: SiteSession(cfg, ids[s], registry) for s in trio}
    hub = HubSession(cfg, hub_id, registry)
    adv = hub.collect_advertisements([s.advertise_keys() for s in sites.values()])
    routed = hub.route_shares([s.share_keys(adv) for s in sites.values()])
    captured = sites[trio[0]].masked_input(routed[trio[0]], xs[trio[0]])

    # thresholds at about p = 1e-6, so the test is not flaky
    chi2_limit = 255 * (1 - 2 / (9 * 255) + 4.75 * math.sqrt(2 / (9 * 255))) ** 3
    ks_limit = math.sqrt(-math.log(1e-6 / 2) / 2) / math.sqrt(n_values)
    corr_limit = 5.0 / math.sqrt(n_values)
    assert _chi_square_bytes(captured) < chi2_limit
    assert _ks_uniform(captured) < ks_limit
    signed_y = captured.view(np.int32).astype(np.float64)
    assert abs(np.corrcoef(true, signed_y)[0, 1]) < corr_limit
    assert abs(np.corrcoef(true, captured.astype(np.float64))[0, 1]) < corr_limit
    assert abs(np.corrcoef(np.sign(true), np.sign(signed_y))[0, 1]) < corr_limit
    # the same statistics see straight through the unmasked update
    assert _chi_square_bytes(xs[trio[0]]) > 10 * chi2_limit
    assert _ks_uniform(xs[trio[0]]) > 10 * ks_limit
    assert abs(np.corrcoef(true, xs[trio[0]].view(np.int32))[0, 1]) > 0.99


# ---- quantization and packing ------------------------------------------------------------------


@pytest.mark.parametrize("stochastic", [True, False])
def test_secure_aggregate_equals_plain_sum_within_the_quantization_bound(
        people: tuple, stochastic: bool) -> None:
    rng = np.random.default_rng(1)
    q = Quantizer(clip=0.5, max_sites=N, stochastic=stochastic)
    floats = {s: rng.uniform(-0.6, 0.6, 500) for s in SITES}  # some values get clipped
    xs = {s: q.encode(v, rng) for s, v in floats.items()}
    res = run_round(people, xs, {SITES[1]: "masked", SITES[4]: "advertise"})
    plain = sum(np.clip(floats[s], -0.5, 0.5) for s in res.survivors)
    err = np.abs(q.decode_sum(res.sum, len(res.survivors)) - plain)
    assert err.max() <= q.error_bound(len(res.survivors)) + 1e-6
    assert q.error_bound(N) < 1e-6


def test_ring_never_wraps_at_the_clip_bound() -> None:
    q = Quantizer(clip=2.0, max_sites=50)
    for sign in (1.0, -1.0):
        enc = q.encode(np.full(1000, sign * 5.0))  # clipped to +-2
        total = np.zeros(1000, dtype=np.uint32)
        for _ in range(50):
            total += enc
        assert np.allclose(q.decode_sum(total, 50), sign * 100.0, atol=q.error_bound(50))


def test_packed_upload_is_no_larger_than_the_float32_update() -> None:
    update = {"conv.weight": torch.randn(16, 1, 3, 3), "conv.bias": torch.randn(16),
              "head.weight": torch.randn(1, 64), "head.bias": torch.randn(1)}
    vec, layout = flatten(update)
    back = unflatten(vec, layout)
    assert all(torch.equal(back[k], update[k]) for k in update)
    q = Quantizer(clip=4.0, max_sites=10)
    encoded = q.encode(vec)
    packed = pack(encoded)
    assert len(packed) <= len(to_bytes(update))
    np.testing.assert_array_equal(unpack(packed, vec.size), encoded)
    with pytest.raises(ProtocolViolation, match="uint32"):
        unpack(packed, vec.size + 1)
    with pytest.raises(ProtocolViolation):
        unpack(b"not safetensors", 4)


def test_model_sized_round_trip(people: tuple) -> None:
    """Vectors longer than one PRG block go through a whole round exactly."""
    length = (1 << 20) + 3
    rng = np.random.default_rng(2)
    four = SITES[:4]
    xs = {s: rng.integers(0, 2**32, length, dtype=np.uint32) for s in four}
    res = run_round(people, xs, {four[3]: "masked"}, threshold=3)
    assert res.survivors == tuple(four[:3]) and res.dropped == (four[3],)
    np.testing.assert_array_equal(res.sum, ring_sum(xs, tuple(four[:3])))


def test_the_hub_stops_waiting_for_sites_the_operator_marked_gone(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    relay = StoreRelay(store, StudyLayout("ns", "st"), 1, timeout_s=30.0, poll_s=0.01)
    msg = SiteResult(study="st", round=1, site="a", num_samples=1, global_metrics=None,
                     local_metrics=None, train_loss=0.0, update_sha256="0" * 64, duration_s=0)
    relay.post("advertise", msg, "a")
    relay.mark_gone("b", "Job failed")
    start = time.monotonic()
    got, bad = relay.collect("advertise", SiteResult, ["a", "b"])
    assert time.monotonic() - start < 5  # not the 30 s timeout
    assert [m.site for m in got] == ["a"] and bad == {}
