"""Who is who: each site and the hub hold an Ed25519 signing key and an X25519 key-agreement key.

Private keys live in files written 0600 (`deeprad keys generate`), in a Kubernetes Secret
mounted as files, or in environment variables; they are never logged, never put into a repr,
a status, an Event or a metric. Public keys travel as base64 of their 32 raw bytes, the form a
HospitalSite carries under `spec.identity.signingKey` / `spec.identity.keyAgreementKey`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from pydantic import BaseModel, ConfigDict, field_validator

from deeprad.core.errors import ConfigError
from deeprad.core.layout import check_name

Role = Literal["site", "hub"]

# File names inside a key folder, which are also the data keys of the Kubernetes Secret.
SIGNING_KEY_FILE = "signing.key"
KEY_AGREEMENT_KEY_FILE = "key-agreement.key"
SIGNING_PUB_FILE = "signing.pub"
KEY_AGREEMENT_PUB_FILE = "key-agreement.pub"
NAME_FILE = "name"
ROLE_FILE = "role"

# Environment variables a Job can receive the keys through (base64 of the raw 32 bytes).
ENV_NAME = "DEEPRAD_IDENTITY_NAME"
ENV_ROLE = "DEEPRAD_IDENTITY_ROLE"
ENV_SIGNING_KEY = "DEEPRAD_SIGNING_KEY"
ENV_KEY_AGREEMENT_KEY = "DEEPRAD_KEY_AGREEMENT_KEY"
# A Job's mounted key folder (the identity Secret as files).
ENV_IDENTITY_DIR = "DEEPRAD_IDENTITY_DIR"

_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_NO_ENC = serialization.NoEncryption()


def b64encode(data: bytes) -> str:
    """Standard base64 with padding, as text."""
    return base64.b64encode(data).decode("ascii")


def b64decode_32(what: str, text: str) -> bytes:
    """Decode base64 text that must hold exactly 32 bytes (a raw Ed25519 / X25519 key)."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{what}: not valid base64 ({exc}); expected the base64 of a 32-byte "
                          "raw key as written by `deeprad keys generate`") from None
    if len(raw) != 32:
        raise ConfigError(f"{what}: decodes to {len(raw)} bytes, a raw key has 32; "
                          "regenerate it with `deeprad keys generate`")
    return raw


def _public_raw(key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return key.public_bytes(_RAW, _RAW_PUB)


class PublicIdentity(BaseModel):
    """The public half of an identity: what a HospitalSite carries and the registry holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    role: Role = "site"
    signing_key: str  # base64 of the raw Ed25519 public key
    key_agreement_key: str  # base64 of the raw X25519 public key

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name("identity", v)

    @field_validator("signing_key", "key_agreement_key")
    @classmethod
    def _key(cls, v: str) -> str:
        b64decode_32("public key", v)
        return v

    @classmethod
    def load(cls, folder: Path) -> PublicIdentity:
        """From the public files of a key folder (`signing.pub`, `key-agreement.pub`, `name`,
        `role`), as `deeprad keys generate` writes them or a ConfigMap mounts them."""
        folder = Path(folder)
        texts: dict[str, str] = {}
        for fname in (SIGNING_PUB_FILE, KEY_AGREEMENT_PUB_FILE, NAME_FILE):
            text = _read_optional(folder / fname)
            if not text:
                raise ConfigError(f"public key folder {folder}: {fname} is missing or empty; "
                                  "copy it from the folder `deeprad keys generate` wrote")
            texts[fname] = text
        role = _role(_read_optional(folder / ROLE_FILE) or "site", str(folder / ROLE_FILE))
        try:
            return cls(name=texts[NAME_FILE], role=role,
                       signing_key=texts[SIGNING_PUB_FILE],
                       key_agreement_key=texts[KEY_AGREEMENT_PUB_FILE])
        except ValueError as exc:
            raise ConfigError(f"public key folder {folder}: {exc}") from None

    @property
    def signing_public_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(self.signing_key))

    @property
    def key_agreement_public_key(self) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(base64.b64decode(self.key_agreement_key))

    @property
    def fingerprint(self) -> str:
        """Short digest of both public keys, for humans comparing keys out of band."""
        digest = hashlib.sha256(base64.b64decode(self.signing_key)
                                + base64.b64decode(self.key_agreement_key)).hexdigest()
        return f"sha256:{digest[:16]}"

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True when `signature` is this identity's Ed25519 signature over `data`."""
        try:
            self.signing_public_key.verify(signature, data)
        except InvalidSignature:
            return False
        return True


class Identity:
    """A site's or the hub's private keys. Never printed: repr shows name and fingerprint only."""

    __slots__ = ("_kx", "_sign", "name", "role")

    def __init__(self, name: str, role: Role, signing_key: Ed25519PrivateKey,
                 key_agreement_key: X25519PrivateKey) -> None:
        self.name = check_name("identity", name)
        if role not in ("site", "hub"):
            raise ConfigError(f"identity {name}: role must be 'site' or 'hub', got {role!r}")
        self.role: Role = role
        self._sign = signing_key
        self._kx = key_agreement_key

    # -- construction --------------------------------------------------------------------

    @classmethod
    def generate(cls, name: str, role: Role = "site") -> Identity:
        """Fresh keys from the operating system's CSPRNG."""
        return cls(name, role, Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, name: str, role: Role, signing_key: bytes,
                           key_agreement_key: bytes) -> Identity:
        """From the raw 32-byte private keys."""
        return cls(name, role, Ed25519PrivateKey.from_private_bytes(signing_key),
                   X25519PrivateKey.from_private_bytes(key_agreement_key))

    @classmethod
    def load(cls, folder: Path, name: str | None = None, role: Role | None = None) -> Identity:
        """From a key folder (`deeprad keys generate --out`, or a mounted Secret): the files
        `signing.key` and `key-agreement.key` (base64 text) and optionally `name` / `role`."""
        folder = Path(folder)
        files = {}
        for fname in (SIGNING_KEY_FILE, KEY_AGREEMENT_KEY_FILE):
            path = folder / fname
            try:
                files[fname] = path.read_text(encoding="ascii")
            except FileNotFoundError:
                raise ConfigError(f"key folder {folder}: {fname} is missing; create the keys "
                                  "with `deeprad keys generate --out DIR`") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"key file {path}: unreadable ({type(exc).__name__})") from None
        name = name or _read_optional(folder / NAME_FILE)
        if not name:
            raise ConfigError(f"key folder {folder}: no `name` file; pass the identity's name")
        role_text = role or _read_optional(folder / ROLE_FILE) or "site"
        return cls.from_private_bytes(
            name, _role(role_text, str(folder / ROLE_FILE)),
            b64decode_32(str(folder / SIGNING_KEY_FILE), files[SIGNING_KEY_FILE]),
            b64decode_32(str(folder / KEY_AGREEMENT_KEY_FILE), files[KEY_AGREEMENT_KEY_FILE]),
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Identity:
        """From DEEPRAD_IDENTITY_NAME, DEEPRAD_IDENTITY_ROLE (default site),
        DEEPRAD_SIGNING_KEY and DEEPRAD_KEY_AGREEMENT_KEY (base64 raw keys)."""
        env = os.environ if environ is None else environ
        missing = [k for k in (ENV_NAME, ENV_SIGNING_KEY, ENV_KEY_AGREEMENT_KEY) if not env.get(k)]
        if missing:
            raise ConfigError(f"identity from the environment: {', '.join(missing)} not set; "
                              "mount the site's identity Secret as environment variables")
        return cls.from_private_bytes(
            env[ENV_NAME], _role(env.get(ENV_ROLE, "site"), ENV_ROLE),
            b64decode_32(ENV_SIGNING_KEY, env[ENV_SIGNING_KEY]),
            b64decode_32(ENV_KEY_AGREEMENT_KEY, env[ENV_KEY_AGREEMENT_KEY]),
        )

    # -- use -----------------------------------------------------------------------------

    def public(self) -> PublicIdentity:
        return PublicIdentity(
            name=self.name, role=self.role,
            signing_key=b64encode(_public_raw(self._sign.public_key())),
            key_agreement_key=b64encode(_public_raw(self._kx.public_key())),
        )

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature over `data` (callers add their own domain separation)."""
        return self._sign.sign(data)

    def key_agreement(self, peer: X25519PublicKey) -> bytes:
        """The raw X25519 shared secret with `peer` (feed it to HKDF, never use it directly)."""
        return self._kx.exchange(peer)

    @property
    def key_agreement_private_key(self) -> X25519PrivateKey:
        """For decrypting envelopes addressed to this identity."""
        return self._kx

    def private_files(self) -> dict[str, str]:
        """File name -> content of the secret files (base64 text): for writing a key folder or
        a Kubernetes Secret, nothing else."""
        return {
            SIGNING_KEY_FILE: b64encode(self._sign.private_bytes(_RAW, _RAW_PRIV, _NO_ENC)) + "\n",
            KEY_AGREEMENT_KEY_FILE:
                b64encode(self._kx.private_bytes(_RAW, _RAW_PRIV, _NO_ENC)) + "\n",
        }

    def public_files(self) -> dict[str, str]:
        pub = self.public()
        return {SIGNING_PUB_FILE: pub.signing_key + "\n",
                KEY_AGREEMENT_PUB_FILE: pub.key_agreement_key + "\n",
                NAME_FILE: self.name + "\n", ROLE_FILE: self.role + "\n"}

    def save(self, folder: Path, overwrite: bool = False) -> list[Path]:
        """Write the key folder: private files 0600, public files 0644; refuses to overwrite
        existing keys unless asked. Returns the paths written."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not overwrite:
            clash = [f for f in (SIGNING_KEY_FILE, KEY_AGREEMENT_KEY_FILE) if (folder / f).exists()]
            if clash:
                raise ConfigError(f"key folder {folder} already holds {', '.join(clash)}; "
                                  "refusing to overwrite keys (pass --force to replace them)")
        written = []
        for files, mode in ((self.private_files(), 0o600), (self.public_files(), 0o644)):
            for fname, content in files.items():
                path = folder / fname
                _write_with_mode(path, content, mode)
                written.append(path)
        return written

    def __repr__(self) -> str:
        return f"Identity(name={self.name!r}, role={self.role!r}, {self.public().fingerprint})"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        # Private keys must not leave the process by accident (multiprocessing, caches).
        raise TypeError("an Identity holds private keys and cannot be pickled; load it from "
                        "its key folder or environment in each process")


def load_job_identity(folder: str | None, role: Role,
                      environ: Mapping[str, str] | None = None) -> Identity:
    """A Job's identity: from `folder` (the task's mounted key folder), else the folder named
    by DEEPRAD_IDENTITY_DIR, else the DEEPRAD_*_KEY variables; refused unless it has `role`."""
    env = os.environ if environ is None else environ
    where = folder or env.get(ENV_IDENTITY_DIR)
    ident = Identity.load(Path(where)) if where else Identity.from_env(env)
    if ident.role != role:
        raise ConfigError(f"identity {ident.name} is a {ident.role} identity; this Job needs "
                          f"the {role}'s keys (check the mounted key folder)")
    return ident


def _write_with_mode(path: Path, content: str, mode: int) -> None:
    """Create `path` with `mode` from the start, so a secret is never briefly world-readable."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, content.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_optional(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def _role(text: str, where: str) -> Role:
    if text == "site":
        return "site"
    if text == "hub":
        return "hub"
    raise ConfigError(f"{where}: role must be 'site' or 'hub', got {text!r}")


@dataclass(frozen=True)
class KeyRegistry:
    """Registered public identities: the hub's and each site's, by name.

    The operator builds it from HospitalSite objects (`from_hospital_sites`) and hands it to
    the aggregator; trainers need the hub's entry and, for secure aggregation, their peers'.
    """

    sites: Mapping[str, PublicIdentity]
    hub: PublicIdentity | None = None

    @classmethod
    def of(cls, identities: Iterable[PublicIdentity]) -> KeyRegistry:
        """From a list of public identities; at most one may have role 'hub'."""
        sites: dict[str, PublicIdentity] = {}
        hub: PublicIdentity | None = None
        for ident in identities:
            if ident.role == "hub":
                if hub is not None:
                    raise ConfigError(f"key registry: two hub identities ({hub.name}, "
                                      f"{ident.name}); keep one")
                hub = ident
            else:
                if ident.name in sites:
                    raise ConfigError(f"key registry: site {ident.name} registered twice")
                sites[ident.name] = ident
        return cls(sites=dict(sites), hub=hub)

    @classmethod
    def from_hospital_sites(cls, objects: Iterable[Mapping[str, Any]],
                            hub: PublicIdentity | None = None) -> KeyRegistry:
        """From HospitalSite objects (dicts as the Kubernetes API returns them)."""
        out = []
        for obj in objects:
            name = str(obj.get("metadata", {}).get("name", "?"))
            ident = (obj.get("spec") or {}).get("identity") or {}
            for field in ("signingKey", "keyAgreementKey"):
                if not ident.get(field):
                    raise ConfigError(f"HospitalSite {name}: spec.identity.{field} is missing; "
                                      f"run `deeprad site register {name} --keys DIR`")
            try:
                out.append(PublicIdentity(name=name, signing_key=ident["signingKey"],
                                          key_agreement_key=ident["keyAgreementKey"]))
            except ValueError as exc:
                raise ConfigError(f"HospitalSite {name}: spec.identity is invalid: {exc}") from None
        return cls.of([*out, *([hub] if hub else [])])

    def site(self, name: str) -> PublicIdentity | None:
        """The registered site `name`, or None."""
        return self.sites.get(name)

    def require_hub(self) -> PublicIdentity:
        if self.hub is None:
            raise ConfigError("key registry has no hub identity; configure the hub's public keys")
        return self.hub

    def __iter__(self) -> Iterator[PublicIdentity]:
        yield from self.sites.values()
        if self.hub is not None:
            yield self.hub

    def to_json(self) -> str:
        """For passing to a Job (public keys only)."""
        return json.dumps([p.model_dump() for p in self], sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KeyRegistry:
        """The inverse of `to_json`."""
        try:
            items = json.loads(text)
            return cls.of(PublicIdentity.model_validate(i) for i in items)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"key registry JSON is invalid: {exc}") from None
