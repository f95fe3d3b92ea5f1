"""Dropout-tolerant secure aggregation (Bonawitz et al., CCS 2017), as pure state machines.

The hub learns the sum of the surviving sites' vectors in Z_(2^32) and nothing else, as long as
fewer than t sites collude with it; any t sites finish the round, so up to n - t may drop out
at any step. The threshold follows the threat model the round names (`threshold_for`):

- semi-honest (the default): the hub runs the protocol as written but would read what it can,
  as DESIGN.md's hub admin is trusted to. t = floor(n/2) + 1, a majority: the hub with any
  minority of the sites learns nothing beyond the sum, and ceil(n/2) - 1 sites may drop out
  (a 3-site round survives one dropout).
- malicious: the hub may also lie, e.g. tell two groups of sites different survivor sets so
  that one group reveals a site's self mask and the other its mask key. Step 3's signed
  consistency check stops that only when any two groups of t signers share an honest site:
  t = floor(2n/3) + 1 with fewer than n/3 sites colluding. Only ceil(n/3) - 1 sites may drop
  out (a 3-site round survives none).

SecAggConfig accepts any n/2 < t <= n: below a majority, a minority of the sites could finish
a round, and the semi-honest guarantee (the hub with any minority learns nothing) would fail.

One round, for the n sites of `SecAggConfig.roster` (hub messages relayed through work items
or the object store; every message is a versioned pydantic model, vectors travel packed):

0. AdvertiseKeys  each site u: fresh X25519 keys c_u (share encryption) and s_u (masks),
                  signed with its Ed25519 identity. Hub: U1 = valid advertisers, |U1| >= t.
1. ShareKeys      u draws a self-mask seed b_u, Shamir-shares b_u and s_u's private key
                  (threshold t, x = roster index), and encrypts each v's shares with AES-GCM
                  under HKDF(X25519(c_u, c_v)). Hub: U2 = senders, routes shares, |U2| >= t.
2. MaskedInput    y_u = x_u + PRG(b_u) + sum_{v in U2, v != u} +-PRG(s_uv)  (mod 2^32),
                  s_uv = X25519(s_u, s_v), + when u sorts before v. Hub: U3, |U3| >= t,
                  accumulates sum(y_u) in one vector.
3. Consistency    hub signs the survivor set (U3, dropped = U2 - U3); each site checks it
                  against its own view of U2 and signs it back. Hub: U4 >= t signatures.
4. Unmasking      each site checks >= t valid signatures over *the same* set (else the hub
                  told sites different sets: refuse), then reveals b-shares of survivors and
                  s-shares of dropped sites, never both for one site. Hub: U5 >= t; recovers
                  each survivor's b_v and each dropped site's s_v and removes their masks.

Fewer than t sites at any step abort with SecAggAborted naming the step, the count and who is
missing. Forged or inconsistent messages raise ProtocolViolation (or are recorded as rejected
by the hub and the round goes on without that site).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deeprad.core.errors import ConfigError
from deeprad.core.identity import Identity, KeyRegistry, PublicIdentity
from deeprad.core.layout import check_name
from deeprad.core.secagg import shamir
from deeprad.core.secagg.errors import ProtocolViolation, SecAggAborted
from deeprad.core.secagg.prg import apply_mask
from deeprad.core.secagg.threat import default_threshold, threshold_for
from deeprad.core.signing import canonical_json, sign_message, verify_message

PROTOCOL_VERSION: Literal[1] = 1


class SecAggConfig(BaseModel):
    """Everything all parties must agree on; its digest is bound into every signature, key
    derivation and PRG label, so messages of one round are useless in any other."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = PROTOCOL_VERSION
    namespace: str
    study: str
    round: int = Field(ge=1)
    roster: tuple[str, ...]
    threshold: int
    vector_length: int = Field(ge=1)

    @model_validator(mode="after")
    def _check(self) -> SecAggConfig:
        check_name("namespace", self.namespace)
        check_name("study", self.study)
        for s in self.roster:
            check_name("site", s)
        n = len(self.roster)
        if n < 1 or list(self.roster) != sorted(set(self.roster)):
            raise ValueError("secure aggregation roster must be a non-empty sorted list of "
                             "distinct site names")
        if not 2 * self.threshold > n or self.threshold > n:
            raise ValueError(f"threshold must satisfy n/2 < t <= n "
                             f"(n={n}): got t={self.threshold}; use "
                             f"t={threshold_for(n, 'semi-honest')} (semi-honest hub) or "
                             f"t={threshold_for(n, 'malicious')} (malicious hub)")
        return self

    @classmethod
    def create(cls, namespace: str, study: str, round_no: int, sites: Iterable[str],
               vector_length: int, threshold: int | None = None) -> SecAggConfig:
        """The config of one round; ConfigError, in one line, when it is not a valid one."""
        roster = tuple(sorted(set(sites)))
        try:
            return cls(namespace=namespace, study=study, round=round_no, roster=roster,
                       threshold=threshold or default_threshold(len(roster)),
                       vector_length=vector_length)
        except ValidationError as exc:
            raise ConfigError(f"secure aggregation {namespace}/{study} round {round_no}: "
                              + "; ".join(str(e["msg"]).removeprefix("Value error, ")
                                          for e in exc.errors())) from None

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(b"deeprad.io/secagg/config/v1\x00"
                              + canonical_json(self.model_dump(mode="json"))).digest()

    def index(self, site: str) -> int:
        """The site's Shamir x-coordinate: its 1-based position in the roster."""
        try:
            return self.roster.index(site) + 1
        except ValueError:
            raise ProtocolViolation(f"site {site!r} is not in this round's secure-aggregation "
                                    "roster") from None

    def where(self, step: str) -> str:
        return f"secure aggregation {self.namespace}/{self.study} round {self.round}, {step}"


# ---- messages ---------------------------------------------------------------------------------


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdvertiseKeys(_Msg):
    """Step 0, site -> hub -> all: a site's two fresh public keys, signed by its identity."""

    site: str
    share_key: str  # base64 X25519 public key c_u
    mask_key: str  # base64 X25519 public key s_u
    signature: str

    def signed_bytes(self, config: SecAggConfig) -> bytes:
        return config.digest + canonical_json(
            {"site": self.site, "share_key": self.share_key, "mask_key": self.mask_key})


class EncryptedShare(_Msg):
    """Step 1: sender's Shamir shares of (b_sender, s_sender) for one recipient, AES-GCM over
    the two shares' bytes, keyed by X25519(c_sender, c_recipient); the config digest, sender and
    recipient are the associated data."""

    sender: str
    recipient: str
    ciphertext: str  # base64 of nonce (12) | AES-GCM ciphertext


class ShareKeys(_Msg):
    """Step 1, site -> hub: one encrypted share per other advertiser."""

    site: str
    shares: list[EncryptedShare]


class SurvivorSet(_Msg):
    """Step 3, hub -> sites: who sent a masked input (survivors) and who shared keys but did not
    (dropped), signed by the hub."""

    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    signature: str

    def signed_bytes(self, config: SecAggConfig) -> bytes:
        return config.digest + canonical_json(
            {"survivors": list(self.survivors), "dropped": list(self.dropped)})


class ConsistencySignature(_Msg):
    """Step 3, site -> hub -> sites: a site's signature over the survivor set it was told."""

    site: str
    signature: str


class UnmaskingShares(_Msg):
    """Step 4, site -> hub: b-shares of survivors and s-shares of dropped sites, signed."""

    site: str
    self_mask_shares: dict[str, str]  # survivor -> base64 Shamir share of b_survivor
    mask_key_shares: dict[str, str]  # dropped site -> base64 Shamir share of s_dropped
    signature: str

    def signed_bytes(self, config: SecAggConfig) -> bytes:
        return config.digest + canonical_json(
            {"site": self.site, "self_mask_shares": self.self_mask_shares,
             "mask_key_shares": self.mask_key_shares})


@dataclass(frozen=True)
class SecAggResult:
    """The hub's outcome: the exact ring sum of the survivors' vectors."""

    sum: np.ndarray  # uint32, sum over `survivors` of x_u mod 2^32
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]  # shared keys, then sent no masked input; their masks removed
    not_joined: tuple[str, ...]  # roster sites that never got as far as sharing keys
    rejected: dict[str, str] = field(default_factory=dict)  # site -> why a message was refused


# ---- shared helpers ---------------------------------------------------------------------------

_ADVERTISE = "secagg/advertise"
_SURVIVORS = "secagg/survivors"
_CONSISTENCY = "secagg/consistency"
_UNMASK = "secagg/unmask"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(what: str, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolViolation(f"{what}: not valid base64") from None


def _pub_raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _x25519_public(what: str, text: str) -> X25519PublicKey:
    raw = _unb64(what, text)
    if len(raw) != 32:
        raise ProtocolViolation(f"{what}: an X25519 public key is 32 bytes, got {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def _exchange(private: X25519PrivateKey, public: X25519PublicKey, what: str) -> bytes:
    try:
        return private.exchange(public)
    except ValueError:  # low-order point: all-zero secret
        raise ProtocolViolation(f"{what}: key agreement with an invalid public key") from None


def _share_cipher(config: SecAggConfig, secret: bytes, a: str, b: str) -> AESGCM:
    lo, hi = sorted((a, b))
    info = b"deeprad.io/secagg/share-encryption/v1\x00" + config.digest + canonical_json([lo, hi])
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret))


def _share_aad(config: SecAggConfig, sender: str, recipient: str) -> bytes:
    return config.digest + canonical_json({"sender": sender, "recipient": recipient})


def self_mask_label(config: SecAggConfig, site: str) -> bytes:
    """PRG label of `site`'s self mask."""
    return b"self\x00" + config.digest + site.encode()


def pair_mask_label(config: SecAggConfig, a: str, b: str) -> bytes:
    """PRG label of the pairwise mask between `a` and `b` (order-independent)."""
    lo, hi = sorted((a, b))
    return b"pair\x00" + config.digest + canonical_json([lo, hi])


def _pair_sign(me: str, other: str) -> int:
    return 1 if me < other else -1


def _need(config: SecAggConfig, step: str, have: Iterable[str], of: Iterable[str]) -> None:
    have_set, pool = set(have), sorted(set(of))
    if len(have_set) < config.threshold:
        missing = [s for s in pool if s not in have_set]
        raise SecAggAborted(
            f"{config.where(step)}: {len(have_set)} of {len(pool)} site(s) took part, the "
            f"threshold is {config.threshold} (n={len(config.roster)}); missing: "
            f"{', '.join(missing) or 'none'}. The round fails rather than expose a single "
            "site's update; rerun it with the sites that are reachable")


def _site_key(registry: KeyRegistry, site: str, config: SecAggConfig, step: str
              ) -> PublicIdentity:
    public = registry.site(site)
    if public is None:
        raise ProtocolViolation(f"{config.where(step)}: site {site!r} has no registered public "
                                "keys (HospitalSite spec.identity)")
    return public


def _valid_advertisements(config: SecAggConfig, registry: KeyRegistry,
                          messages: Sequence[AdvertiseKeys]) -> tuple[
                              dict[str, AdvertiseKeys], dict[str, str]]:
    """Advertisements that are in the roster, unique and correctly signed, plus rejections."""
    good: dict[str, AdvertiseKeys] = {}
    rejected: dict[str, str] = {}
    seen_keys: set[str] = set()
    for m in messages:
        if m.site not in config.roster:
            rejected[m.site] = "advertised keys but is not in the roster"
            continue
        if m.site in good or m.site in rejected:
            rejected[m.site] = "advertised keys twice"
            good.pop(m.site, None)
            continue
        public = registry.site(m.site)
        sig = _unb64(f"{m.site} advertisement signature", m.signature)
        if public is None or not verify_message(public, _ADVERTISE, m.signed_bytes(config), sig):
            rejected[m.site] = ("advertised keys whose signature does not verify against its "
                                "registered signing key")
            continue
        _x25519_public(f"{m.site} share key", m.share_key)
        _x25519_public(f"{m.site} mask key", m.mask_key)
        if m.share_key in seen_keys or m.mask_key in seen_keys or m.share_key == m.mask_key:
            rejected[m.site] = "advertised a public key that another party also uses"
            continue
        seen_keys |= {m.share_key, m.mask_key}
        good[m.site] = m
    return good, rejected


# ---- the site's side --------------------------------------------------------------------------


class SiteSession:
    """One site's part in one round. Methods must be called in order, each at most once."""

    def __init__(self, config: SecAggConfig, identity: Identity, registry: KeyRegistry) -> None:
        config.index(identity.name)
        self.config = config
        self.site = identity.name
        self._identity = identity
        self._registry = registry
        self._share_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self._self_seed = os.urandom(32)
        self._step = 0
        self._advertised: dict[str, AdvertiseKeys] = {}
        self._held: dict[str, tuple[shamir.Share, shamir.Share]] = {}  # sender -> (b, s) shares
        self._u2: tuple[str, ...] = ()
        self._survivors: SurvivorSet | None = None

    def __repr__(self) -> str:
        return f"SiteSession(site={self.site!r}, round={self.config.round}, step={self._step})"

    def _advance(self, expected: int, step: str) -> None:
        if self._step != expected:
            raise ProtocolViolation(f"{self.config.where(step)}: called out of order at site "
                                    f"{self.site} (a session is used once, step by step)")
        self._step = expected + 1

    def advertise_keys(self) -> AdvertiseKeys:
        """Step 0: this site's signed public keys."""
        self._advance(0, "advertise keys")
        unsigned = AdvertiseKeys(site=self.site,
                                 share_key=_b64(_pub_raw(self._share_key.public_key())),
                                 mask_key=_b64(_pub_raw(self._mask_key.public_key())),
                                 signature="")
        sig = sign_message(self._identity, _ADVERTISE, unsigned.signed_bytes(self.config))
        return unsigned.model_copy(update={"signature": _b64(sig)})

    def share_keys(self, advertisements: Sequence[AdvertiseKeys]) -> ShareKeys:
        """Step 1: check every advertisement the hub relayed, then share b_u and s_u."""
        self._advance(1, "share keys")
        where = self.config.where("share keys")
        good, rejected = _valid_advertisements(self.config, self._registry, advertisements)
        if rejected:
            site, why = next(iter(rejected.items()))
            raise ProtocolViolation(f"{where}: the hub relayed a bad advertisement: site {site} "
                                    f"{why}; refusing to go on")
        mine = good.get(self.site)
        if mine is None or mine.share_key != _b64(_pub_raw(self._share_key.public_key())) \
                or mine.mask_key != _b64(_pub_raw(self._mask_key.public_key())):
            raise ProtocolViolation(f"{where}: the relayed list does not hold site "
                                    f"{self.site}'s own keys as sent")
        _need(self.config, "share keys", good, self.config.roster)
        self._advertised = good
        n, t = len(self.config.roster), self.config.threshold
        b_shares = shamir.split(self._self_seed, n, t)
        s_raw = self._mask_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        s_shares = shamir.split(s_raw, n, t)
        out = []
        for v in sorted(good):
            i = self.config.index(v) - 1
            if v == self.site:
                self._held[v] = (b_shares[i], s_shares[i])
                continue
            secret = _exchange(self._share_key, _x25519_public(v, good[v].share_key), where)
            # sender, recipient and round are bound by the key and the associated data
            body = b_shares[i].to_bytes() + s_shares[i].to_bytes()
            nonce = os.urandom(12)
            ct = _share_cipher(self.config, secret, self.site, v).encrypt(
                nonce, body, _share_aad(self.config, self.site, v))
            out.append(EncryptedShare(sender=self.site, recipient=v, ciphertext=_b64(nonce + ct)))
        return ShareKeys(site=self.site, shares=out)

    def masked_input(self, shares: Sequence[EncryptedShare], x: np.ndarray) -> np.ndarray:
        """Step 2: keep the shares addressed to this site; return y_u = x_u + masks (mod 2^32).

        `x` is the quantized update (uint32, `vector_length` values); the senders of `shares`
        plus this site are U2, the sites whose pairwise masks are added."""
        self._advance(2, "masked input")
        where = self.config.where("masked input")
        if x.dtype != np.uint32 or x.shape != (self.config.vector_length,):
            raise ValueError(f"{where}: x must be a uint32 vector of {self.config.vector_length} "
                             f"values, got {x.dtype} {x.shape}")
        for sh in shares:
            if sh.recipient != self.site:
                raise ProtocolViolation(f"{where}: the hub routed a share for {sh.recipient} "
                                        f"to {self.site}")
            if sh.sender not in self._advertised or sh.sender == self.site:
                raise ProtocolViolation(f"{where}: share from {sh.sender!r}, who did not "
                                        "advertise keys")
            if sh.sender in self._held:
                raise ProtocolViolation(f"{where}: two shares from {sh.sender}")
            self._held[sh.sender] = self._decrypt_share(sh, where)
        self._u2 = tuple(sorted(self._held))
        _need(self.config, "masked input", self._u2, self._advertised)
        y = x.copy()
        apply_mask(y, self._self_seed, self_mask_label(self.config, self.site), +1)
        for v in self._u2:
            if v == self.site:
                continue
            seed = _exchange(self._mask_key, _x25519_public(v, self._advertised[v].mask_key),
                             where)
            apply_mask(y, seed, pair_mask_label(self.config, self.site, v),
                       _pair_sign(self.site, v))
        return y

    def _decrypt_share(self, sh: EncryptedShare, where: str) -> tuple[shamir.Share, shamir.Share]:
        raw = _unb64(f"share from {sh.sender}", sh.ciphertext)
        secret = _exchange(self._share_key,
                           _x25519_public(sh.sender, self._advertised[sh.sender].share_key), where)
        try:
            body = _share_cipher(self.config, secret, sh.sender, self.site).decrypt(
                raw[:12], raw[12:], _share_aad(self.config, sh.sender, self.site))
        except InvalidTag:
            raise ProtocolViolation(f"{where}: share from {sh.sender} fails authentication "
                                    "(altered, or not from that site)") from None
        half = len(body) // 2
        b = shamir.Share.from_bytes(body[:half])
        s = shamir.Share.from_bytes(body[half:])
        if b.x != self.config.index(self.site) or s.x != b.x:
            raise ProtocolViolation(f"{where}: share from {sh.sender} is for another holder")
        return b, s

    def consistency_signature(self, survivors: SurvivorSet) -> ConsistencySignature:
        """Step 3: accept the hub-signed survivor set only if it fits this site's own view of
        U2, then sign it back so the other sites can compare."""
        self._advance(3, "consistency check")
        where = self.config.where("consistency check")
        hub = self._registry.require_hub()
        sig = _unb64("survivor set signature", survivors.signature)
        if not verify_message(hub, _SURVIVORS, survivors.signed_bytes(self.config), sig):
            raise ProtocolViolation(f"{where}: the survivor set is not signed by the hub "
                                    f"{hub.name}; refusing it")
        surv, dropped = set(survivors.survivors), set(survivors.dropped)
        if list(survivors.survivors) != sorted(surv) or list(survivors.dropped) != sorted(dropped):
            raise ProtocolViolation(f"{where}: survivor set lists are not sorted and distinct")
        if surv & dropped or surv | dropped != set(self._u2):
            raise ProtocolViolation(
                f"{where}: survivors {sorted(surv)} + dropped {sorted(dropped)} do not match the "
                f"sites that shared keys with {self.site} ({list(self._u2)}); refusing")
        if self.site not in surv:
            raise ProtocolViolation(f"{where}: {self.site} sent its masked input but is not "
                                    "listed as a survivor")
        _need(self.config, "consistency check", surv, self._u2)
        self._survivors = survivors
        mine = sign_message(self._identity, _CONSISTENCY, survivors.signed_bytes(self.config))
        return ConsistencySignature(site=self.site, signature=_b64(mine))

    def unmask(self, signatures: Sequence[ConsistencySignature]) -> UnmaskingShares:
        """Step 4: reveal shares only if at least t survivors signed this very survivor set."""
        self._advance(4, "unmasking")
        where = self.config.where("unmasking")
        assert self._survivors is not None
        payload = self._survivors.signed_bytes(self.config)
        confirmed: set[str] = set()
        for cs in signatures:
            if cs.site not in self._survivors.survivors:
                raise ProtocolViolation(f"{where}: consistency signature from {cs.site}, who is "
                                        "not a survivor")
            public = _site_key(self._registry, cs.site, self.config, "unmasking")
            if not verify_message(public, _CONSISTENCY, payload,
                                  _unb64(f"{cs.site} consistency signature", cs.signature)):
                raise ProtocolViolation(
                    f"{where}: site {cs.site} signed a different survivor set than the one "
                    f"{self.site} was given: the hub told sites inconsistent survivor sets; "
                    "refusing to reveal any share")
            confirmed.add(cs.site)
        _need(self.config, "unmasking (consistency signatures)", confirmed,
              self._survivors.survivors)
        b = {v: _b64(self._held[v][0].to_bytes()) for v in self._survivors.survivors}
        s = {v: _b64(self._held[v][1].to_bytes()) for v in self._survivors.dropped}
        unsigned = UnmaskingShares(site=self.site, self_mask_shares=b, mask_key_shares=s,
                                   signature="")
        sig = sign_message(self._identity, _UNMASK, unsigned.signed_bytes(self.config))
        return unsigned.model_copy(update={"signature": _b64(sig)})


# ---- the hub's side ---------------------------------------------------------------------------


class HubSession:
    """The hub's part in one round: relay, keep one running sum, recover the masks.

    Bad messages from a site are recorded in `rejected` and the round goes on without that
    site; any step left with fewer than t sites raises SecAggAborted.
    """

    def __init__(self, config: SecAggConfig, hub: Identity, registry: KeyRegistry) -> None:
        self.config = config
        self._hub = hub
        self._registry = registry
        self.rejected: dict[str, str] = {}
        self._u1: dict[str, AdvertiseKeys] = {}
        self._u2: tuple[str, ...] = ()
        self._acc = np.zeros(config.vector_length, dtype=np.uint32)
        self._u3: list[str] = []
        self._survivors: SurvivorSet | None = None
        self._u4: dict[str, ConsistencySignature] = {}

    def collect_advertisements(self, messages: Sequence[AdvertiseKeys]) -> list[AdvertiseKeys]:
        """Step 0: the valid advertisements, to relay to each of their senders."""
        good, rejected = _valid_advertisements(self.config, self._registry, messages)
        self.rejected.update(rejected)
        _need(self.config, "advertise keys", good, self.config.roster)
        self._u1 = good
        return [good[s] for s in sorted(good)]

    def route_shares(self, messages: Sequence[ShareKeys]) -> dict[str, list[EncryptedShare]]:
        """Step 1: U2 = sites that sent one share for every other advertiser; returns, for each
        site of U2, the shares addressed to it from U2."""
        u2: dict[str, ShareKeys] = {}
        for m in messages:
            others = sorted(s for s in self._u1 if s != m.site)
            if m.site not in self._u1:
                self.rejected[m.site] = "sent key shares without advertising keys"
            elif m.site in u2:
                self.rejected[m.site] = "sent key shares twice"
                del u2[m.site]
            elif any(sh.sender != m.site for sh in m.shares) or \
                    sorted(sh.recipient for sh in m.shares) != others:
                self.rejected[m.site] = "key shares are not one per other advertiser"
            else:
                u2[m.site] = m
        _need(self.config, "share keys", u2, self._u1)
        self._u2 = tuple(sorted(u2))
        return {v: [sh for m in u2.values() for sh in m.shares
                    if sh.recipient == v and sh.sender in u2] for v in self._u2}

    def add_masked_input(self, site: str, masked: np.ndarray) -> None:
        """Step 2: fold one site's masked vector into the running sum (memory: one vector)."""
        where = self.config.where("masked input")
        if site not in self._u2:
            raise ProtocolViolation(f"{where}: masked input from {site}, who did not share keys")
        if site in self._u3:
            raise ProtocolViolation(f"{where}: second masked input from {site}")
        if masked.dtype != np.uint32 or masked.shape != (self.config.vector_length,):
            raise ProtocolViolation(f"{where}: masked input from {site} must be uint32 of "
                                    f"{self.config.vector_length} values")
        np.add(self._acc, masked, out=self._acc)
        self._u3.append(site)

    def survivor_set(self) -> SurvivorSet:
        """Step 3: the hub-signed survivor set, the same for every site."""
        survivors = tuple(sorted(self._u3))
        _need(self.config, "masked input", survivors, self._u2)
        dropped = tuple(s for s in self._u2 if s not in self._u3)
        unsigned = SurvivorSet(survivors=survivors, dropped=dropped, signature="")
        sig = sign_message(self._hub, _SURVIVORS, unsigned.signed_bytes(self.config))
        self._survivors = unsigned.model_copy(update={"signature": _b64(sig)})
        return self._survivors

    def collect_consistency(self, signatures: Sequence[ConsistencySignature]
                            ) -> list[ConsistencySignature]:
        """Step 3: the valid signatures over the survivor set, to relay to each signer."""
        assert self._survivors is not None, "survivor_set() first"
        payload = self._survivors.signed_bytes(self.config)
        for cs in signatures:
            public = self._registry.site(cs.site)
            if cs.site not in self._survivors.survivors or public is None:
                self.rejected[cs.site] = "sent a consistency signature but is not a survivor"
            elif not verify_message(public, _CONSISTENCY, payload,
                                    _unb64("consistency signature", cs.signature)):
                self.rejected[cs.site] = "consistency signature does not verify"
            else:
                self._u4[cs.site] = cs
        _need(self.config, "consistency check", self._u4, self._survivors.survivors)
        return [self._u4[s] for s in sorted(self._u4)]

    def reconstruct(self, messages: Sequence[UnmaskingShares]) -> SecAggResult:
        """Step 4: recover the survivors' self-mask seeds and the dropped sites' mask keys from
        at least t sites' shares and return the exact sum of the survivors' inputs."""
        assert self._survivors is not None, "survivor_set() first"
        where = self.config.where("unmasking")
        surv, dropped = self._survivors.survivors, self._survivors.dropped
        u5: dict[str, UnmaskingShares] = {}
        for m in messages:
            public = self._registry.site(m.site)
            if m.site not in self._u4 or public is None or m.site in u5:
                self.rejected[m.site] = "sent unmasking shares without confirming the survivors"
            elif not verify_message(public, _UNMASK, m.signed_bytes(self.config),
                                    _unb64("unmasking signature", m.signature)):
                self.rejected[m.site] = "unmasking shares' signature does not verify"
            elif sorted(m.self_mask_shares) != list(surv) or \
                    sorted(m.mask_key_shares) != list(dropped):
                self.rejected[m.site] = "unmasking shares do not match the survivor set"
            else:
                u5[m.site] = m
        _need(self.config, "unmasking", u5, self._u4)

        def recover(owner: str, pick: str) -> bytes:
            shares = []
            for holder, m in u5.items():
                table = m.self_mask_shares if pick == "b" else m.mask_key_shares
                share = shamir.Share.from_bytes(_unb64(f"{holder}'s share", table[owner]))
                if share.x != self.config.index(holder):
                    raise ProtocolViolation(f"{where}: {holder} sent a share with another "
                                            "holder's index")
                shares.append(share)
            return shamir.combine(shares, self.config.threshold)

        acc = self._acc
        for v in surv:
            apply_mask(acc, recover(v, "b"), self_mask_label(self.config, v), -1)
        for v in dropped:
            s_v = X25519PrivateKey.from_private_bytes(recover(v, "s"))
            if _b64(_pub_raw(s_v.public_key())) != self._u1[v].mask_key:
                raise ProtocolViolation(f"{where}: the mask key recovered for dropped site {v} "
                                        "does not match the key it advertised")
            for u in surv:
                seed = _exchange(s_v, _x25519_public(u, self._u1[u].mask_key), where)
                # y_u holds _pair_sign(u, v) * PRG(s_uv): take it out.
                apply_mask(acc, seed, pair_mask_label(self.config, u, v), -_pair_sign(u, v))
        self._acc = np.zeros(0, dtype=np.uint32)  # one reconstruction per session
        return SecAggResult(sum=acc, survivors=surv, dropped=dropped,
                            not_joined=tuple(s for s in self.config.roster if s not in self._u2),
                            rejected=dict(self.rejected))
