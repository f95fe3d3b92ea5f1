"""Manifests derive the statement their signature covers from the fields `Statement` declares:
manifests stored by earlier versions read back byte for byte and still verify, and every
signed field is really covered."""

from __future__ import annotations

from pathlib import Path

import pytest

from deeprad.core.errors import CheckpointError
from deeprad.core.identity import KeyRegistry
from deeprad.core.layout import StudyLayout
from deeprad.core.manifests import verify_checkpoint_manifest
from deeprad.core.protocol import CheckpointManifest, ModelSpec, UpdateManifest
from deeprad.core.signing import (
    STATEMENT_FIELDS,
    ReplayGuard,
    Statement,
    signature_valid,
    verify_update,
)

# Written by `deeprad simulate --seed 3` before the statement had one home: round 1's update
# of hospital-2 and round 1's global checkpoint, with the public keys that signed them.
GOLDEN = Path(__file__).parent / "golden"
LAYOUT = StudyLayout("local", "simulated-study")


def _stored(name: str) -> str:
    return (GOLDEN / name).read_text().removesuffix("\n")


@pytest.fixture
def registry() -> KeyRegistry:
    return KeyRegistry.from_json((GOLDEN / "stored-public-keys.json").read_text())


def test_stored_update_manifest_reads_back_unchanged_and_verifies(
        registry: KeyRegistry) -> None:
    stored = _stored("stored-update-manifest.json")
    manifest = UpdateManifest.model_validate_json(stored)
    assert manifest.model_dump_json(indent=2) == stored
    assert manifest.parent_sha256 is not None
    verify_update(manifest.statement(), manifest.signature, registry, site="hospital-2",
                  namespace="local", study="simulated-study", round_no=1,
                  parent_sha256=manifest.parent_sha256,
                  payload_sha256=manifest.payload_sha256, replay=ReplayGuard())


def test_stored_checkpoint_manifest_reads_back_unchanged_and_verifies(
        registry: KeyRegistry) -> None:
    stored = _stored("stored-checkpoint-manifest.json")
    manifest = CheckpointManifest.model_validate_json(stored)
    assert manifest.model_dump_json(indent=2) == stored
    verify_checkpoint_manifest(manifest, registry.require_hub(), LAYOUT, 1)


# A different valid value for each signed field a manifest can change.
_ALTERED = {"namespace": "elsewhere", "study": "another-study", "round": 2, "site": "hub",
            "nonce": "0" * 32, "parent_sha256": "1" * 64, "payload_sha256": "2" * 64}


@pytest.mark.parametrize("field", sorted(STATEMENT_FIELDS - {"kind"}))
def test_every_signed_field_of_an_update_is_covered(registry: KeyRegistry, field: str) -> None:
    manifest = UpdateManifest.model_validate_json(_stored("stored-update-manifest.json"))
    public = registry.site("hospital-2")
    assert public is not None
    assert signature_valid(public, manifest.statement(), manifest.signature)
    altered = manifest.model_copy(update={field: _ALTERED[field]})
    assert not signature_valid(public, altered.statement(), manifest.signature)


@pytest.mark.parametrize("field", sorted(STATEMENT_FIELDS - {"kind", "site"}))
def test_every_signed_field_of_a_checkpoint_is_covered(registry: KeyRegistry,
                                                       field: str) -> None:
    manifest = CheckpointManifest.model_validate_json(_stored("stored-checkpoint-manifest.json"))
    hub = registry.require_hub()
    assert signature_valid(hub, manifest.statement(hub.name), manifest.signature)
    altered = manifest.model_copy(update={field: _ALTERED[field]})
    assert not signature_valid(hub, altered.statement(hub.name), manifest.signature)


def test_manifests_carry_every_signed_field() -> None:
    assert set(Statement.model_fields) - {"version"} == STATEMENT_FIELDS
    assert set(UpdateManifest.model_fields) >= STATEMENT_FIELDS
    # a checkpoint's signer is the hub, named by whoever verifies it
    assert set(CheckpointManifest.model_fields) >= STATEMENT_FIELDS - {"site"}
    manifest = CheckpointManifest.model_validate_json(_stored("stored-checkpoint-manifest.json"))
    statement = manifest.statement("hub")
    assert (statement.kind, statement.site, statement.round) == ("checkpoint", "hub", 1)


def test_a_checkpoint_without_namespace_or_nonce_cannot_be_signed() -> None:
    unsigned = CheckpointManifest(study="s", round=0, producer="t", model=ModelSpec(),
                                  payload_sha256="a" * 64, parent_sha256=None)
    with pytest.raises(CheckpointError, match="checkpoint s round 0: manifest has no namespace"):
        unsigned.statement("hub")
    bad_digest = unsigned.model_copy(update={"namespace": "ns", "nonce": "0" * 32,
                                             "payload_sha256": "not-hex"})
    with pytest.raises(CheckpointError, match="cannot form a signed statement"):
        bad_digest.statement("hub")
