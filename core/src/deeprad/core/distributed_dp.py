"""Distributed differential privacy: each site adds its share of discrete Gaussian noise to its
quantised update before secure-aggregation masking, so the sum the hub unmasks is already
(ε, δ)-DP — against the hub and every other party, with no trusted server.

Anchor: Kairouz, Liu and Steinke, "The Distributed Discrete Gaussian Mechanism for Federated
Learning with Secure Aggregation" (ICML 2021; arXiv:2102.06387), the "DDGauss" mechanism.

Unit of privacy (what "neighbouring" means). Site level: two executions are neighbours when
one site's clipped update in a round is present in one and absent (replaced by zero) in the
other — add/remove one site, the unit of the paper's theorem. The guarantee covers everything
a site's update carries in that round, i.e. its whole dataset. For records this means: any set
of records that lives at one site — one patient or all of that hospital's patients — is
protected at the same (ε, δ) (no group-privacy factor is owed), a strictly stronger statement
than record-level DP-SGD at the same ε; but it is a statement about the sum of a handful of
sites, so it needs far more noise per record than record-level DP to reach the same ε. The two
ε are different units and must not be added or compared as if they were one.

Threat model. Every site draws its share from a fresh CSPRNG seed (`secrets`), never from the
task's seed: the hub sends the task, so it could reproduce seeded noise. Each site adds variance
σ²/t, t = the secure-aggregation threshold, because the protocol unmasks no sum of fewer than t
sites: whichever t..n sites survive, the sum carries at least σ² (n/t·σ² when all survive —
the price of dropout tolerance). Sites that collude with the hub know their own shares and can
subtract them; ε is then that of the honest sites' shares (as for secure aggregation itself,
the guarantee assumes fewer than t colluders, and the reported ε assumes honest shares).

Per round, per site (the paper's Algorithm 1):
1. clip the update to L2 norm c (site-level sensitivity);
2. rotate: pad to a power of two d and apply H·D/√d, a randomised Walsh–Hadamard transform
   whose ±1 diagonal D comes from the round's secure-aggregation config digest, so every site
   and the hub use the same one (the rotation needs no secrecy; it spreads the update evenly
   across coordinates, which bounds wrap-around and keeps the bits per coordinate low);
3. scale by 1/γ and round each coordinate at random to a neighbouring integer, unbiased,
   redrawing until the L2 norm is within the paper's bound (conditional randomised rounding,
   bias β), so the integer sensitivity Δ2 is known;
4. add N_Z(0, σ²/(t·γ²)) to each coordinate (exact CKS 2020 rejection sampler, vectorised);
5. reduce mod 2^32 into the secure-aggregation ring.
The hub reads the unmasked sum as signed 32-bit integers, multiplies by γ, undoes the rotation
and divides by the survivors' count: every site counts once (a sample-weighted sum would let a
big site move the sum further than c). γ is chosen so that n·c plus 8 standard deviations of
the summed noise fit in (-2^31, 2^31): wrap-around (modular clipping) is then a < 1e-14 event
per coordinate, and rounding adds an error of at most √d·γ in L2 to the mean.

Accounting. The sum of m ≥ t shares is, at every Rényi order α (paper, Proposition 14),
    D_α ≤ min(α/2·s2² + τd,  α/2·(s2² + 2·s1·τ + τ²d),  α/2·(s2 + τ√d)²),
    s2 = Δ2/(√m σ_l), s1 = Δ1/(√m σ_l), τ = 10·Σ_{k=1}^{m-1} exp(-2π²σ_l²·k/(k+1)),
with σ_l = σ/(γ√t) a share's integer standard deviation, Δ2 the rounding-inflated clip and
Δ1 = Δ2·min(√d, Δ2). Each term is a (ξ, ρ)-zCDP statement (`dp_accounting`'s `ZCDpEvent`);
taking the worst over m = t..n, composing one event per round with the RDP accountant and
keeping the smallest ε of the three gives ε at δ. `plan` calibrates σ to a target ε over the
planned rounds. τ is far below 1e-100 at the noise levels a 32-bit ring allows, so the
mechanism costs what a continuous Gaussian with multiplier σ/c costs.
"""

from __future__ import annotations

import hashlib
import math
import secrets

import numpy as np

from deeprad.core.errors import ConfigError
from deeprad.core.protocol import DistributedDPSpec

RING_BITS = 32  # the secure-aggregation ring Z_(2^32) (deeprad.core.secagg.quantize)
_RING_MAX = (1 << (RING_BITS - 1)) - 1
DEFAULT_BETA = math.exp(-0.5)  # the paper's choice: the conditional rounding redraws rarely
SIGNAL_STDDEVS = 8.0  # noise standard deviations kept inside the ring
_MAX_ROUNDING_TRIES = 1000


def _where(field: str) -> str:
    return f"distributed DP: {field}"


# ---- rotation -------------------------------------------------------------------------------


def padded_length(dim: int) -> int:
    """The rotated vector's length: the smallest power of two >= `dim`."""
    if dim < 1:
        raise ConfigError(f"{_where('update length')} must be >= 1, got {dim}")
    return 1 << (dim - 1).bit_length()


def _signs(seed: bytes, length: int) -> np.ndarray:
    digest = hashlib.sha256(b"deeprad.io/distributed-dp/rotation/v1\x00" + seed).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "big"))
    return rng.integers(0, 2, size=length).astype(np.float64) * 2 - 1


def _hadamard(v: np.ndarray) -> np.ndarray:
    """The orthonormal Walsh–Hadamard transform H/√d (its own inverse), O(d log d)."""
    d = v.size
    out = v.astype(np.float64, copy=True)
    h = 1
    while h < d:
        pairs = out.reshape(-1, 2, h)
        a, b = pairs[:, 0, :].copy(), pairs[:, 1, :]
        pairs[:, 0, :] += b
        pairs[:, 1, :] = a - b
        h *= 2
    return out / math.sqrt(d)


def rotate(x: np.ndarray, seed: bytes) -> np.ndarray:
    """H·D·x/√d of `x` zero-padded to `padded_length`; `seed` picks D (shared by the round)."""
    d = padded_length(x.size)
    padded = np.zeros(d, dtype=np.float64)
    padded[:x.size] = x
    return _hadamard(padded * _signs(seed, d))


def unrotate(y: np.ndarray, seed: bytes, dim: int) -> np.ndarray:
    """The inverse of `rotate`, cut back to the first `dim` values."""
    return (_hadamard(y) * _signs(seed, y.size))[:dim]


# ---- sampling and rounding ------------------------------------------------------------------


def secure_generator() -> np.random.Generator:
    """A generator seeded with 256 bits from the OS CSPRNG: noise no task seed reproduces."""
    return np.random.Generator(np.random.PCG64DXSM(secrets.randbits(256)))


def sample_discrete_gaussian(sigma: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` draws of N_Z(0, σ²), P(x) ∝ exp(-x²/2σ²) on the integers.

    Canonne, Kamath and Steinke (2020), Algorithm 3: draw a discrete Laplace of scale
    t = ⌊σ⌋+1 (a difference of two geometrics) and keep it with probability
    exp(-(|y| - σ²/t)²/2σ²); redraw the rest. The distribution is exact up to the float64
    evaluation of that probability (no truncated tail, no rounded continuous Gaussian)."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise ConfigError(f"{_where('noise standard deviation')} must be a positive number, "
                          f"got {sigma}")
    t = math.floor(sigma) + 1
    p = -math.expm1(-1.0 / t)
    out = np.empty(size, dtype=np.int64)
    todo = np.arange(size)
    while todo.size:
        y = rng.geometric(p, todo.size) - rng.geometric(p, todo.size)
        keep = rng.random(todo.size) < np.exp(-np.square(np.abs(y) - sigma * sigma / t)
                                              / (2 * sigma * sigma))
        out[todo[keep]] = y[keep]
        todo = todo[~keep]
    return out


def rounded_l2_bound(scaled_clip: float, dim: int, beta: float) -> float:
    """Δ2: the L2 norm a vector of norm <= `scaled_clip` keeps after conditional randomised
    rounding to the integers in `dim` dimensions (paper, Theorem 2 / Proposition 22)."""
    always = scaled_clip + math.sqrt(dim)  # each value moves by < 1
    if beta == 0:
        return always
    conditional = math.sqrt(scaled_clip ** 2 + dim / 4 + math.sqrt(2 * math.log(1 / beta))
                            * (scaled_clip + math.sqrt(dim) / 2))
    return min(always, conditional)


def conditional_round(v: np.ndarray, bound: float, rng: np.random.Generator) -> np.ndarray:
    """Round each value to floor or ceil, unbiased; redraw until the L2 norm is <= `bound`
    (probability >= 1 - β per draw)."""
    floor = np.floor(v)
    frac = v - floor
    for _ in range(_MAX_ROUNDING_TRIES):
        rounded = floor + (rng.random(v.size) < frac)
        if float(np.linalg.norm(rounded)) <= bound:
            return rounded.astype(np.int64)
    raise ConfigError(f"{_where('conditional rounding')} found no rounding within L2 {bound:g} "
                      f"in {_MAX_ROUNDING_TRIES} tries; the vector was not clipped to the plan's "
                      "l2_clip")


# ---- parameters -----------------------------------------------------------------------------


def granularity(l2_clip: float, local_stddev: float, sites: int) -> float:
    """γ such that `sites` clipped updates plus SIGNAL_STDDEVS standard deviations of their
    summed noise (and one rounding unit per site) fit in (-2^31, 2^31) per coordinate."""
    return (sites * l2_clip + SIGNAL_STDDEVS * math.sqrt(sites) * local_stddev) / (
        _RING_MAX - sites)


def _check(epsilon: float, delta: float, rounds: int, l2_clip: float, dim: int, sites: int,
           noise_shares: int, beta: float) -> None:
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"{_where('epsilon')} must be a positive number, got {epsilon}")
    if not 0 < delta < 1:
        raise ConfigError(f"{_where('delta')} must be in (0, 1), got {delta}; use less than "
                          "1/(number of sites)")
    if rounds < 1:
        raise ConfigError(f"{_where('rounds')} must be >= 1, got {rounds}")
    if not (math.isfinite(l2_clip) and l2_clip > 0):
        raise ConfigError(f"{_where('l2_clip')} must be a positive number, got {l2_clip}")
    if dim < 1:
        raise ConfigError(f"{_where('update length')} must be >= 1, got {dim}")
    if not 1 <= sites <= 1 << 20:
        raise ConfigError(f"{_where('sites')} must be in [1, 2^20], got {sites}")
    if not 1 <= noise_shares <= sites:
        raise ConfigError(f"{_where('noise_shares')} must be in [1, sites={sites}], got "
                          f"{noise_shares}; use the secure-aggregation threshold")
    if not 0 <= beta < 1:
        raise ConfigError(f"{_where('beta')} must be in [0, 1), got {beta}; the paper uses "
                          "exp(-1/2)")


def mechanism(noise_multiplier: float, *, epsilon: float, delta: float, rounds: int,
              l2_clip: float, sites: int, noise_shares: int, beta: float = DEFAULT_BETA
              ) -> DistributedDPSpec:
    """The spec for a summed noise of σ = noise_multiplier·l2_clip (ε and δ are recorded as
    the plan's; `plan` picks the multiplier)."""
    sigma = noise_multiplier * l2_clip
    local = sigma / math.sqrt(noise_shares)
    return DistributedDPSpec(l2_clip=l2_clip, noise_stddev=sigma, noise_shares=noise_shares,
                             max_sites=sites, granularity=granularity(l2_clip, local, sites),
                             beta=beta, epsilon=epsilon, delta=delta, rounds=rounds)


def zcdp_terms(spec: DistributedDPSpec, dim: int) -> list[tuple[float, float]]:
    """One round's (ξ, ρ)-zCDP bounds, one per term of the paper's Proposition 14, each the
    worst over survivor counts m = noise_shares..max_sites (see the module docstring)."""
    d = padded_length(dim)
    gamma = spec.granularity
    delta2 = rounded_l2_bound(spec.l2_clip / gamma, d, spec.beta)
    delta1 = delta2 * min(math.sqrt(d), delta2)
    local = spec.noise_stddev / math.sqrt(spec.noise_shares) / gamma  # a share, in ring units
    if local < 0.5:
        raise ConfigError(f"{_where('noise_stddev')} {spec.noise_stddev:g} is below half a "
                          f"ring unit (granularity {gamma:g}) per share; raise the noise")
    m = np.arange(spec.noise_shares, spec.max_sites + 1, dtype=np.float64)
    k = np.arange(1, spec.max_sites, dtype=np.float64)
    terms = np.exp(-2 * math.pi ** 2 * local ** 2 * k / (k + 1))
    tau = 10 * np.concatenate([[0.0], np.cumsum(terms)])[m.astype(np.int64) - 1]
    s2 = delta2 / (np.sqrt(m) * local)
    s1 = delta1 / (np.sqrt(m) * local)
    return [
        (float(np.max(tau * d)), float(np.max(s2 ** 2 / 2))),
        (0.0, float(np.max((s2 ** 2 + 2 * s1 * tau + tau ** 2 * d) / 2))),
        (0.0, float(np.max((s2 + tau * math.sqrt(d)) ** 2 / 2))),
    ]


def epsilon_after(spec: DistributedDPSpec, dim: int, rounds: int) -> float:
    """ε at the spec's δ after `rounds` rounds: each term's zCDP event composed `rounds` times
    with dp-accounting's RDP accountant; the smallest of the three."""
    if rounds < 0:
        raise ConfigError(f"{_where('rounds')} must be >= 0, got {rounds}")
    if rounds == 0:
        return 0.0
    from deeprad.core.privacy import _rdp_modules, make_accountant

    dp_event = _rdp_modules()[0]
    best = math.inf
    for xi, rho in zcdp_terms(spec, dim):
        accountant = make_accountant("rdp")
        accountant.compose(dp_event.ZCDpEvent(rho=rho, xi=xi), rounds)
        best = min(best, float(accountant.get_epsilon(spec.delta)))
    return best


def plan(*, epsilon: float, delta: float, rounds: int, l2_clip: float, dim: int, sites: int,
         noise_shares: int, beta: float = DEFAULT_BETA) -> DistributedDPSpec:
    """The least noise (within 0.1%) that keeps ε <= `epsilon` at `delta` after `rounds`
    rounds, for updates of `dim` values from `sites` sites, at least `noise_shares` summed."""
    _check(epsilon, delta, rounds, l2_clip, dim, sites, noise_shares, beta)

    def fits(z: float) -> bool:
        spec = mechanism(z, epsilon=epsilon, delta=delta, rounds=rounds, l2_clip=l2_clip,
                         sites=sites, noise_shares=noise_shares, beta=beta)
        return epsilon_after(spec, dim, rounds) <= epsilon

    lo, hi = 1e-3, 1.0
    while not fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1e5:
            raise ConfigError(f"{_where('epsilon')} {epsilon:g} over {rounds} round(s) needs "
                              "more noise than a 32-bit ring holds; raise the budget or plan "
                              "fewer rounds")
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return mechanism(hi, epsilon=epsilon, delta=delta, rounds=rounds, l2_clip=l2_clip,
                     sites=sites, noise_shares=noise_shares, beta=beta)


def check_share(spec: DistributedDPSpec, dim: int, round_no: int) -> None:
    """A site's own check of the spec the hub sent, before any byte leaves: the noise must
    deliver the ε the spec claims, and the round must be one of the rounds it was planned for
    (the hub picks the spec; it must not pick one quieter than it says)."""
    if round_no > spec.rounds:
        raise ConfigError(f"distributed DP: round {round_no} is past the {spec.rounds} round(s) "
                          f"the ε={spec.epsilon:g} plan covers; plan the study for more rounds")
    actual = epsilon_after(spec, dim, spec.rounds)
    if actual > spec.epsilon * (1 + 1e-6):
        raise ConfigError(f"distributed DP: the round's noise (σ={spec.noise_stddev:g}, "
                          f"{spec.noise_shares} share(s), clip {spec.l2_clip:g}) gives "
                          f"ε={actual:.4g} over {spec.rounds} round(s), not the ε="
                          f"{spec.epsilon:g} it claims; refusing to upload")


# ---- encoding at a site, decoding at the hub ------------------------------------------------


def clip_l2(x: np.ndarray, bound: float) -> tuple[np.ndarray, bool]:
    """`x` scaled down to L2 norm `bound` when above it; whether it was."""
    v = np.asarray(x, dtype=np.float64).ravel()
    if not np.isfinite(v).all():
        raise ConfigError(f"{_where('update')} holds NaN or Inf; nothing was uploaded")
    norm = float(np.linalg.norm(v))
    return (v * (bound / norm), True) if norm > bound else (v, False)


def encode(update: np.ndarray, spec: DistributedDPSpec, rotation_seed: bytes,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """One site's clipped, rotated, rounded and noised update in Z_(2^32) (uint32), of
    `padded_length(update.size)` values. `rng` only for tests: the noise must be secret."""
    rng = rng or secure_generator()
    clipped, _ = clip_l2(update, spec.l2_clip)
    scaled = rotate(clipped, rotation_seed) / spec.granularity
    bound = rounded_l2_bound(spec.l2_clip / spec.granularity, scaled.size, spec.beta)
    rounded = conditional_round(scaled, bound, rng)
    local = spec.noise_stddev / math.sqrt(spec.noise_shares) / spec.granularity
    noisy = rounded + sample_discrete_gaussian(local, scaled.size, rng)
    return noisy.astype(np.uint32)  # two's complement: mod 2^32, the modular wrap-around


def decode_mean(ring_sum: np.ndarray, spec: DistributedDPSpec, rotation_seed: bytes, dim: int,
                survivors: int) -> tuple[np.ndarray, float]:
    """The survivors' noisy mean update (float64, `dim` values) from their ring sum, and the
    L2 bound on its rounding error (the noise is the point, and is not counted)."""
    if not 1 <= survivors <= spec.max_sites:
        raise ConfigError(f"{_where('survivors')}: a sum of {survivors} site(s) with a plan "
                          f"for at most {spec.max_sites}")
    if ring_sum.dtype != np.uint32 or ring_sum.shape != (padded_length(dim),):
        raise ConfigError(f"{_where('ring sum')} must be uint32 of {padded_length(dim)} values")
    total = unrotate(ring_sum.view(np.int32).astype(np.float64) * spec.granularity,
                     rotation_seed, dim)
    rounding = math.sqrt(padded_length(dim)) * spec.granularity  # per site, in L2
    return total / survivors, rounding
