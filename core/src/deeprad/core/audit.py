"""Signed audit records: what ran for a study, where, and on whose behalf.

Every training task leaves one record in the store (`StudyLayout.site_audit`), signed with the
site's key: the study, the round, the model by digest, the trainer image the hospital pinned,
the digest of the hospital's site policy, the DP-SGD steps it took (its ε at any δ), and the
update it produced from which parent. The aggregator then writes the round's record
(`StudyLayout.hub_audit`), signed with the hub's key: who created the study (the
`deeprad.io/created-by` annotation an admission policy sets from the API server's own view of
the requester), each site's registered signing key with the sha256 of its record, the new
checkpoint and the round's ε. `deeprad audit` checks the chain from one pinned key: the hub's
key → the hub's round records → the site keys they name → the site records.

A record's signature covers the canonical JSON of all its other fields behind a per-kind
domain prefix (`deeprad.core.signing.sign_message`), so it can never pass as an update's, a
checkpoint's, or the other kind of record's signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import ClassVar, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deeprad.core.errors import ConfigError, DeepRadError, ObjectNotFound
from deeprad.core.identity import Identity, PublicIdentity, Role
from deeprad.core.layout import StudyLayout
from deeprad.core.privacy import DPSteps
from deeprad.core.protocol import RoundEpsilon, utc_now
from deeprad.core.signing import canonical_json, sign_message, verify_message
from deeprad.core.store import ObjectStore

AUDIT_VERSION: Literal[1] = 1


class AuditError(DeepRadError):
    """An audit record is missing, malformed, unsigned, or does not verify."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class StudyRef(BaseModel):
    """The study a record belongs to (its uid when the store keys carry one)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str
    name: str
    uid: str | None = None

    @classmethod
    def of(cls, layout: StudyLayout) -> StudyRef:
        return cls(namespace=layout.namespace, name=layout.study, uid=layout.uid)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class SignedRecord(BaseModel):
    """A record whose `signature` (base64 Ed25519) covers every other field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    PURPOSE: ClassVar[str]  # the signing domain, one per kind of record
    SIGNER: ClassVar[Role]

    signature: str | None = None

    def signed_bytes(self) -> bytes:
        """The exact bytes the signature covers (before the domain prefix)."""
        return canonical_json(self.model_dump(mode="json", exclude={"signature"}))

    def signer_name(self) -> str:
        raise NotImplementedError

    def signed(self, identity: Identity) -> Self:
        """This record with `identity`'s signature; ConfigError when the record names another
        signer or the key has the wrong role."""
        if identity.role != self.SIGNER or identity.name != self.signer_name():
            raise ConfigError(f"a {self.PURPOSE} record for {self.signer_name()!r} is signed by "
                              f"that {self.SIGNER}'s key, not by {identity.role} "
                              f"{identity.name!r}'s; mount the right identity")
        raw = sign_message(identity, self.PURPOSE, self.signed_bytes())
        return self.model_copy(update={"signature": base64.b64encode(raw).decode("ascii")})

    def signature_valid(self, public: PublicIdentity) -> bool:
        """True when `public` signed exactly this record."""
        if not self.signature:
            return False
        try:
            raw = base64.b64decode(self.signature, validate=True)
        except (binascii.Error, ValueError):
            return False
        return len(raw) == 64 and verify_message(public, self.PURPOSE, self.signed_bytes(), raw)

    def to_bytes(self) -> bytes:
        """What is stored; the hub's record names the sha256 of these bytes."""
        return self.model_dump_json(indent=2).encode("utf-8")


class SiteTaskRecord(SignedRecord):
    """What one site ran for one round, signed by the site."""

    PURPOSE: ClassVar[str] = "audit/site-task"
    SIGNER: ClassVar[Role] = "site"

    schema_version: Literal[1] = AUDIT_VERSION
    kind: Literal["site-task"] = "site-task"
    study: StudyRef
    round: int = Field(ge=1)
    site: str
    model: str
    model_digest: str  # deeprad.core.model_catalogue.model_digest(name, kwargs)
    trainer_image: str | None  # the image the hospital configured (pinned by digest or not)
    policy_digest: str | None  # the site policy the task ran under, None without one
    privacy: DPSteps | None  # the DP-SGD steps actually taken; None trained without DP
    num_samples: int = Field(ge=0)
    parent_sha256: str  # the global checkpoint it trained from
    update_sha256: str  # the stored update envelope it produced
    created_at: str = Field(default_factory=utc_now)
    # the per-sample clipping bound (maxGradNorm) of the DP-SGD run; None without DP. Left out
    # of the signed bytes when None, so records signed before it existed still verify.
    max_grad_norm: float | None = Field(default=None, gt=0)

    def signer_name(self) -> str:
        return self.site

    def signed_bytes(self) -> bytes:
        left_out = {"signature"} | ({"max_grad_norm"} if self.max_grad_norm is None else set())
        return canonical_json(self.model_dump(mode="json", exclude=left_out))


class AuditedSite(BaseModel):
    """One site as the hub saw it in a round: its registered key and its record's digest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str
    signing_key: str | None  # base64 Ed25519 public key from its HospitalSite; None: unknown
    record_sha256: str | None  # sha256 of the site's stored record; None: no valid record
    update_sha256: str | None  # the update the round aggregated; None: it did not contribute
    problem: str | None = None  # why the hub could not vouch for the record


class HubRoundRecord(SignedRecord):
    """What the hub did in one round and on whose behalf, signed by the hub."""

    PURPOSE: ClassVar[str] = "audit/hub-round"
    SIGNER: ClassVar[Role] = "hub"

    schema_version: Literal[1] = AUDIT_VERSION
    kind: Literal["hub-round"] = "hub-round"
    study: StudyRef
    round: int = Field(ge=1)
    hub: str  # the hub identity's name
    created_by: str | None  # the study's deeprad.io/created-by (the round's, for a lone round)
    model: str
    model_digest: str
    parent_sha256: str | None
    checkpoint_sha256: str
    privacy: RoundEpsilon | None
    sites: list[AuditedSite]
    created_at: str = Field(default_factory=utc_now)

    def signer_name(self) -> str:
        return self.hub


R = TypeVar("R", bound=SignedRecord)


def read_record(store: ObjectStore, key: str, kind: type[R]) -> tuple[R, bytes] | None:
    """The record stored at `key` and its bytes; None when there is none, AuditError naming
    the key when it is not a record of `kind`."""
    try:
        data = store.get_bytes(key)
    except ObjectNotFound:
        return None
    try:
        return kind.model_validate_json(data), data
    except ValidationError as exc:
        err = exc.errors()[0]
        raise AuditError(f"{key}: not a {kind.PURPOSE} record ({err['msg']} at "
                         f"{'.'.join(str(p) for p in err['loc']) or 'top level'})") from None


def check_site_record(record: SiteTaskRecord, public: PublicIdentity, *, study: StudyRef,
                      round_no: int, site: str, parent_sha256: str | None = None,
                      update_sha256: str | None = None) -> None:
    """Raise AuditError unless `public` signed `record` as site `site`'s record of this study
    and round (and, when given, of this parent and this update)."""
    where = f"audit record of site {site}, study {study}, round {round_no}"
    if not record.signature_valid(public):
        raise AuditError(f"{where}: signature does not verify against the site's registered "
                         "signing key: altered, unsigned or signed by another key")
    if record.site != site:
        raise AuditError(f"{where}: the record is site {record.site!r}'s, copied into another "
                         "site's slot")
    if (record.study.namespace, record.study.name, record.round) != (
            study.namespace, study.name, round_no):
        raise AuditError(f"{where}: the record is for study {record.study} round "
                         f"{record.round}")
    if study.uid is not None and record.study.uid != study.uid:
        raise AuditError(f"{where}: the record is for study uid {record.study.uid}, not "
                         f"{study.uid} (an earlier study of the same name)")
    if parent_sha256 is not None and record.parent_sha256 != parent_sha256:
        raise AuditError(f"{where}: trained from parent {record.parent_sha256[:16]}…, the "
                         f"round's input is {parent_sha256[:16]}…")
    if update_sha256 is not None and record.update_sha256 != update_sha256:
        raise AuditError(f"{where}: names update {record.update_sha256[:16]}…, the round "
                         f"aggregated {update_sha256[:16]}…")


def check_hub_record(record: HubRoundRecord, hub: PublicIdentity, *, study: StudyRef,
                     round_no: int) -> None:
    """Raise AuditError unless `hub` signed `record` as its record of this study and round."""
    where = f"hub audit record of study {study}, round {round_no}"
    if record.hub != hub.name or not record.signature_valid(hub):
        raise AuditError(f"{where}: signature does not verify against the pinned hub key "
                         f"({hub.name}): altered, unsigned or written by another hub")
    if (record.study.namespace, record.study.name, record.round) != (
            study.namespace, study.name, round_no):
        raise AuditError(f"{where}: the record is for study {record.study} round "
                         f"{record.round}")
    if study.uid is not None and record.study.uid != study.uid:
        raise AuditError(f"{where}: the record is for study uid {record.study.uid}, not "
                         f"{study.uid}")


def vouched_key(entry: AuditedSite) -> PublicIdentity:
    """The site's signing key as the hub's signed record names it (the site-task check needs
    only the signing half; the key-agreement slot repeats it and is never used)."""
    if entry.signing_key is None:
        raise AuditError(f"site {entry.site}: the hub's record names no registered key for it")
    try:
        return PublicIdentity(name=entry.site, signing_key=entry.signing_key,
                              key_agreement_key=entry.signing_key)
    except ValueError as exc:
        raise AuditError(f"site {entry.site}: the hub's record names an invalid key: "
                         f"{exc}") from None


def recorded_sites(store: ObjectStore, layout: StudyLayout, round_no: int) -> list[str]:
    """Sites that left an audit record in round `round_no` (a store listing)."""
    prefix = layout.site_audits_prefix(round_no)
    names = (k[len(prefix):] for k in store.list(prefix))
    return sorted(n[: -len(".json")] for n in names if n.endswith(".json") and "/" not in n)
