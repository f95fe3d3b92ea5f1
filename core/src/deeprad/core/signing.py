"""Signed statements: what a site says about its update and the hub about a checkpoint.

A signature covers one canonical statement (kind, namespace, study, round, site, nonce, parent
digest, payload digest), serialised as sorted compact JSON behind a domain-separation prefix
with a version, so a signature made for one purpose can never be replayed for another. The
aggregator rejects unsigned, forged, foreign, replayed, stale and altered updates with
`UpdateRejected`; a trainer refuses a checkpoint the hub did not sign with `CheckpointError`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
import secrets
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deeprad.core.errors import CheckpointError, ConfigError, UpdateRejected
from deeprad.core.identity import Identity, KeyRegistry, PublicIdentity

STATEMENT_VERSION: Literal[1] = 1
_STATEMENT_DOMAIN = b"deeprad.io/signed-statement/v1\x00"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NONCE = re.compile(r"^[0-9a-f]{32}$")


def new_nonce() -> str:
    """128 random bits as 32 lowercase hex characters."""
    return secrets.token_hex(16)


def canonical_json(value: object) -> bytes:
    """Sorted keys, no whitespace, ASCII only: one byte string per value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


class Statement(BaseModel):
    """The fields a signature covers. `site` is the signer: the site for an update, the hub's
    identity name for a checkpoint. `parent_sha256` is None only for a study's round-0 model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = STATEMENT_VERSION
    kind: Literal["update", "checkpoint"]
    namespace: str
    study: str
    round: int = Field(ge=0)
    site: str
    nonce: str = Field(default_factory=new_nonce)
    parent_sha256: str | None
    payload_sha256: str

    @field_validator("nonce")
    @classmethod
    def _nonce(cls, v: str) -> str:
        if not _NONCE.match(v):
            raise ValueError("nonce must be 32 lowercase hex characters (128 random bits)")
        return v

    @field_validator("parent_sha256", "payload_sha256")
    @classmethod
    def _digest(cls, v: str | None) -> str | None:
        if v is not None and not _HEX64.match(v):
            raise ValueError("a sha256 digest is 64 lowercase hex characters")
        return v

    def to_bytes(self) -> bytes:
        """The exact bytes that are signed."""
        return _STATEMENT_DOMAIN + canonical_json(self.model_dump(mode="json"))


# The fields a statement takes from the manifest it covers (`version` is the statement
# format's own); `deeprad.core.protocol.SignedManifest` reads them from here.
STATEMENT_FIELDS: frozenset[str] = frozenset(Statement.model_fields) - {"version"}


def sign_statement(identity: Identity, statement: Statement) -> str:
    """Base64 Ed25519 signature of `statement` by `identity`, who must be its signer."""
    if statement.site != identity.name:
        raise ConfigError(f"statement names signer {statement.site!r} but the key is "
                          f"{identity.name!r}'s; sign with the identity the statement names")
    want = "site" if statement.kind == "update" else "hub"
    if identity.role != want:
        raise ConfigError(f"a {statement.kind} is signed by a {want} identity, "
                          f"{identity.name} is a {identity.role}")
    return base64.b64encode(identity.sign(statement.to_bytes())).decode("ascii")


def _decode_signature(signature: str | None) -> bytes | None:
    if not signature:
        return None
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 64 else None


def signature_valid(public: PublicIdentity, statement: Statement, signature: str | None) -> bool:
    """True when `signature` (base64) is `public`'s signature over `statement`."""
    raw = _decode_signature(signature)
    return raw is not None and public.verify(raw, statement.to_bytes())


# ---- generic signed messages (secure-aggregation key material, survivor sets) -----------------


def _message_domain(purpose: str) -> bytes:
    if not re.match(r"^[a-z0-9][a-z0-9./-]*$", purpose):
        raise ValueError(f"signing purpose {purpose!r}: lowercase letters, digits, . / - only")
    return f"deeprad.io/{purpose}/v1".encode("ascii") + b"\x00"


def sign_message(identity: Identity, purpose: str, payload: bytes) -> bytes:
    """Ed25519 over `payload` behind a per-purpose domain prefix."""
    return identity.sign(_message_domain(purpose) + payload)


def verify_message(public: PublicIdentity, purpose: str, payload: bytes,
                   signature: bytes) -> bool:
    """The inverse of `sign_message`."""
    return public.verify(signature, _message_domain(purpose) + payload)


# ---- replay protection ------------------------------------------------------------------------


class ReplayGuard:
    """Nonces already accepted in a study. The aggregator loads them from the store, checks
    each update, and writes `seen` back after the round, so a replay is refused in any round."""

    def __init__(self, seen: Iterable[str] = ()) -> None:
        self._seen: set[str] = set(seen)

    def check(self, site: str, nonce: str) -> None:
        """Raise UpdateRejected when `nonce` was accepted before."""
        if nonce in self._seen:
            raise UpdateRejected(site, f"nonce {nonce} was already used: a replayed update")

    def record(self, nonce: str) -> None:
        self._seen.add(nonce)

    @property
    def seen(self) -> frozenset[str]:
        return frozenset(self._seen)


# ---- verification ---------------------------------------------------------------------------


def parse_statement(site: str, data: dict[str, object]) -> Statement:
    """A statement from untrusted JSON fields, UpdateRejected when malformed."""
    try:
        return Statement.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UpdateRejected(site, f"signed statement is malformed: {err['msg']} at "
                                   f"{'.'.join(str(p) for p in err['loc'])}") from None


def verify_update(
    statement: Statement,
    signature: str | None,
    registry: KeyRegistry,
    *,
    site: str,
    namespace: str,
    study: str,
    round_no: int,
    parent_sha256: str,
    payload_sha256: str,
    replay: ReplayGuard,
) -> None:
    """Accept `statement` as `site`'s update for this round or raise UpdateRejected.

    `site` is where the update was found (its store key), `parent_sha256` the digest of the
    round's input checkpoint and `payload_sha256` the digest actually computed over the stored
    payload. The nonce is recorded in `replay` only when everything else passed.
    """
    if _decode_signature(signature) is None:
        raise UpdateRejected(site, "update is unsigned or its signature is not 64 bytes of "
                                   "base64; the trainer must sign it with the site's key")
    if statement.kind != "update":
        raise UpdateRejected(site, f"statement kind is {statement.kind!r}, not 'update'")
    if statement.site != site:
        raise UpdateRejected(site, f"update is signed as site {statement.site!r}: a foreign "
                                   "update copied into this site's slot")
    public = registry.site(site)
    if public is None:
        raise UpdateRejected(site, "site is not registered: no HospitalSite with public keys; "
                                   "register it with `deeprad site register`")
    if not signature_valid(public, statement, signature):
        raise UpdateRejected(site, "signature does not verify against HospitalSite "
                                   f"{site}'s spec.identity.signingKey: altered or signed by "
                                   "another key")
    if (statement.namespace, statement.study) != (namespace, study):
        raise UpdateRejected(site, f"update belongs to study {statement.namespace}/"
                                   f"{statement.study}, not {namespace}/{study}")
    if statement.round != round_no:
        raise UpdateRejected(site, f"update is for round {statement.round}, this is round "
                                   f"{round_no}")
    if statement.parent_sha256 != parent_sha256:
        raise UpdateRejected(site, "update was trained from a stale global model (parent "
                                   f"{(statement.parent_sha256 or 'none')[:16]}…, expected "
                                   f"{parent_sha256[:16]}…)")
    if not hmac.compare_digest(statement.payload_sha256, payload_sha256):
        raise UpdateRejected(site, f"payload sha256 {payload_sha256[:16]}… differs from the "
                                   f"signed {statement.payload_sha256[:16]}…: altered in transit "
                                   "or at rest")
    replay.check(site, statement.nonce)
    replay.record(statement.nonce)


def verify_checkpoint(
    statement: Statement,
    signature: str | None,
    hub: PublicIdentity,
    *,
    namespace: str,
    study: str,
    round_no: int,
    payload_sha256: str,
    parent_sha256: str | None = None,
) -> None:
    """Accept a global checkpoint only when the hub signed exactly these bytes for this study
    and round (and, when given, this parent); raise CheckpointError otherwise."""
    where = f"checkpoint {namespace}/{study} round {round_no}"
    if _decode_signature(signature) is None:
        raise CheckpointError(f"{where} is unsigned; only checkpoints signed by the hub are used")
    if statement.kind != "checkpoint" or statement.site != hub.name:
        raise CheckpointError(f"{where}: statement is a {statement.kind} by "
                              f"{statement.site!r}, not a checkpoint by the hub {hub.name!r}")
    if not signature_valid(hub, statement, signature):
        raise CheckpointError(f"{where}: signature does not verify against the hub's public "
                              "signing key; do not train from it")
    if (statement.namespace, statement.study, statement.round) != (namespace, study, round_no):
        raise CheckpointError(f"{where}: signed for {statement.namespace}/{statement.study} "
                              f"round {statement.round}")
    if not hmac.compare_digest(statement.payload_sha256, payload_sha256):
        raise CheckpointError(f"{where}: payload sha256 {payload_sha256[:16]}… differs from the "
                              f"signed {statement.payload_sha256[:16]}…; the object was altered")
    if parent_sha256 is not None and statement.parent_sha256 != parent_sha256:
        raise CheckpointError(f"{where}: signed parent {(statement.parent_sha256 or 'none')[:16]}"
                              f"… is not the expected {parent_sha256[:16]}…")
