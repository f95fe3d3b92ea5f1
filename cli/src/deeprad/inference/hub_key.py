"""Which hub a checkpoint must come from: `deeprad export` and `predict` check the hub's
signature over a checkpoint's manifest against a pinned hub key before they use it.

The key is `--hub-key` (the hub's public key folder, or its `signing.pub`), else the
`keys/hub` folder `deeprad simulate` writes into its output folder, looked for from the
checkpoint's folder upwards, so `deeprad export runs/demo/final.json` works on the run that
made it. A key found that way vouches only as much as the folder it was found in: for a
checkpoint from anywhere else, pass the hub key you got from the hub's admins.
`--insecure-skip-signature` checks the payload digest only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from deeprad.core.errors import CheckpointError, ConfigError
from deeprad.core.identity import (
    KEY_AGREEMENT_PUB_FILE,
    NAME_FILE,
    ROLE_FILE,
    SIGNING_PUB_FILE,
    PublicIdentity,
    b64decode_32,
)
from deeprad.core.protocol import CheckpointManifest
from deeprad.core.signing import verify_checkpoint

# Where `deeprad simulate` keeps its hub's key folder inside its output folder
# (deeprad.simulate.study: <output>/keys/<HUB_NAME>).
RUN_HUB_KEYS = Path("keys") / "hub"
DEFAULT_HUB_NAME = "hub"  # the hub's name when only its signing.pub is given
FIX = ("pass --hub-key with the public key folder (or signing.pub) of the hub that produced "
       "it, or --insecure-skip-signature to use it unverified")


@dataclass(frozen=True)
class PinnedHub:
    """The hub a checkpoint must be signed by, and the file or folder its key came from."""

    identity: PublicIdentity
    source: Path

    def describe(self) -> str:
        """Name, signing key (as the site chart's hubSigningKey spells it) and source."""
        key = self.identity.signing_key
        return f"hub {self.identity.name!r} (signing key {key[:12]}…, from {self.source})"


@dataclass(frozen=True)
class SkipSignature:
    """`--insecure-skip-signature`: the payload digest is still checked, the signature not."""


HubTrust = PinnedHub | SkipSignature


def load_hub_key(path: Path, what: str = "--hub-key") -> PinnedHub:
    """The hub's public key from its public key folder (`signing.pub`, `key-agreement.pub`,
    `name`, `role`) or from a `signing.pub` file: the one half a signature check needs, named
    by a `name` file beside it, else 'hub'. `what` names the key's origin in errors."""
    path = Path(path)
    where = f"{what} {path}"
    if path.is_dir():
        identity = PublicIdentity.load(path)
        if not (path / ROLE_FILE).is_file():  # a public folder copied without its role file
            identity = identity.model_copy(update={"role": "hub"})
    elif path.is_file():
        identity = _from_signing_pub(path, where)
    else:
        raise ConfigError(f"{where} does not exist; give the hub's public key folder or its "
                          f"{SIGNING_PUB_FILE}")
    if identity.role != "hub":
        raise ConfigError(f"{where} holds a site's keys ({identity.name}), not the hub's; give "
                          "the hub's public key folder")
    return PinnedHub(identity, path)


def _from_signing_pub(path: Path, where: str) -> PublicIdentity:
    """A hub identity from a lone `signing.pub` (its `name` and `key-agreement.pub` beside it
    when there)."""
    name_file, agreement_file = path.with_name(NAME_FILE), path.with_name(KEY_AGREEMENT_PUB_FILE)
    try:
        signing = path.read_text(encoding="ascii").strip()
        name = (name_file.read_text(encoding="utf-8").strip() if name_file.is_file()
                else "") or DEFAULT_HUB_NAME
        # A signature check reads the signing key only; without the key-agreement half
        # beside it, the signing key fills that slot and is never used as one.
        agreement = (agreement_file.read_text(encoding="ascii").strip()
                     if agreement_file.is_file() else signing)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: unreadable ({type(exc).__name__}); give the hub's "
                          f"{SIGNING_PUB_FILE}") from None
    b64decode_32(where, signing)
    try:
        return PublicIdentity(name=name, role="hub", signing_key=signing,
                              key_agreement_key=agreement)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {exc.errors()[0]['msg']}") from None


def find_run_hub_key(manifest_path: Path) -> Path | None:
    """The nearest `keys/hub` folder with a `signing.pub`, from the checkpoint's folder up."""
    folder = manifest_path.resolve().parent
    for candidate in (folder, *folder.parents):
        keys = candidate / RUN_HUB_KEYS
        if (keys / SIGNING_PUB_FILE).is_file():
            return keys
    return None


def hub_trust(checkpoint: Path, hub_key: Path | None = None,
              skip_signature: bool = False) -> HubTrust:
    """What a checkpoint's signature is checked against: `hub_key`, else a simulate run's
    hub key found beside it; SkipSignature only when asked. ConfigError naming the fix when
    there is no key."""
    if skip_signature:
        if hub_key is not None:
            raise ConfigError("--hub-key and --insecure-skip-signature contradict each other; "
                              "give one")
        return SkipSignature()
    if hub_key is not None:
        return load_hub_key(hub_key)
    found = find_run_hub_key(checkpoint)
    if found is None:
        raise ConfigError(f"{checkpoint}: no hub key to check the checkpoint's signature "
                          f"against (none given, no {RUN_HUB_KEYS}/ beside it as `deeprad "
                          f"simulate` leaves); {FIX}")
    return load_hub_key(found, "hub key folder (found beside the checkpoint)")


def verify_hub_signature(manifest: CheckpointManifest, manifest_path: Path,
                         trust: HubTrust) -> None:
    """Raise CheckpointError, one line naming the fix, unless the pinned hub signed this
    manifest (its study, round and payload digest); nothing to check with SkipSignature."""
    if isinstance(trust, SkipSignature):
        return
    hub = trust.identity
    if not manifest.signature or manifest.namespace is None or manifest.nonce is None:
        raise CheckpointError(f"{manifest_path}: the checkpoint carries no hub signature, so "
                              f"nothing says {trust.describe()} produced it; refusing it: {FIX}")
    try:
        verify_checkpoint(manifest.statement(hub.name), manifest.signature, hub,
                          namespace=manifest.namespace, study=manifest.study,
                          round_no=manifest.round, payload_sha256=manifest.payload_sha256)
    except CheckpointError as exc:
        raise CheckpointError(f"{manifest_path}: not signed by {trust.describe()} ({exc}); "
                              f"refusing it: {FIX}") from None
